"""Size presets: the widths and depths behind ``model.size``.

``tiny`` is for unit tests (< 1M parameters with the default encoders), ``small`` for the CPU
demo, ``base`` for one GPU, ``1b`` / ``7b`` put a GPT-2/Llama-sized decoder behind the fused
encoders for GPU clusters under ZeRO-3. Torchvision backbones (resnet18/50, vit_b_16) keep their
published architecture at every size; only their output projection follows ``hidden``.
"""

from __future__ import annotations

from dataclasses import dataclass, replace


@dataclass(frozen=True)
class SizeSpec:
    """Widths and depths of one size preset.

    Attributes:
        hidden: shared width D every encoder projects to (fusion, trunk, task heads).
        heads: attention heads at width ``hidden``.
        enc_layers: layers of the bert / lstm / gru text encoder and the audio transformer.
        trunk_layers: transformer layers after fusion (mid/late); early fusion adds enc_layers.
        fusion_layers: layers inside the ``transformer`` fusion method.
        cnn_channels: channels of the small image / audio conv stacks.
        dec_width: decoder LM width.
        dec_layers: decoder LM layers.
        dec_heads: decoder LM attention heads.
        dec_ffn: decoder feed-forward width (GPT-2 uses 4 * dec_width, Llama this value).
    """

    hidden: int
    heads: int
    enc_layers: int
    trunk_layers: int
    fusion_layers: int
    cnn_channels: tuple[int, ...]
    dec_width: int
    dec_layers: int
    dec_heads: int
    dec_ffn: int


SIZES = {
    "tiny": SizeSpec(32, 2, 1, 1, 1, (8, 16, 32), 32, 1, 2, 86),
    "small": SizeSpec(128, 4, 2, 1, 1, (16, 32, 64), 128, 2, 4, 344),
    "base": SizeSpec(768, 12, 12, 2, 2, (32, 64, 128), 768, 12, 12, 2048),
    "1b": SizeSpec(1024, 16, 12, 2, 2, (64, 128, 256), 2048, 22, 16, 5632),
    "7b": SizeSpec(1024, 16, 24, 2, 2, (64, 128, 256), 4096, 32, 32, 11008),
}


def size_spec(size: str, hidden_size: int = 0) -> SizeSpec:
    """The preset for ``size``; ``hidden_size > 0`` overrides the shared width.

    The head count is lowered to the largest divisor of the width that is not above the
    preset's, so any width builds.
    """
    if size not in SIZES:
        raise ValueError(f"unknown size {size!r}; choose from {sorted(SIZES)}")
    spec = SIZES[size]
    if hidden_size:
        heads = max(h for h in range(1, spec.heads + 1) if hidden_size % h == 0)
        spec = replace(spec, hidden=hidden_size, heads=heads)
    return spec
