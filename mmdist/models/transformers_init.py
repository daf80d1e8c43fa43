"""Building transformers models from a config, also inside ``deepspeed.zero.Init``.

Under ZeRO-3 the trainer builds the whole fused model inside ``zero.Init``: every submodule's
parameters are partitioned (emptied) as soon as it is constructed, so the weight init that a
transformers model runs at the end of its constructor would index empty tensors. There the
model is built with its init switched off, then initialised by transformers' ZeRO-3 routine
that gathers each module's parameters first.

transformers is imported on first use, not with ``mmdist.models``: its model modules cost
seconds of start-up per process (docs/performance.md), which every training worker of an
LSTM/GRU + CNN model (the demo's) would pay for nothing; torchvision's models likewise (they
import ``torch._dynamo``). Importing those modules inside an open ``zero.Init`` fails
(DeepSpeed's patched tensor constructors break them), so code that opens one calls
:func:`preload` first; a build inside ``zero.Init`` without it stops with an error saying so.
"""

from __future__ import annotations

import sys
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from torch import nn

# the transformers classes mmdist builds models from -> the model family they belong to
HF_NAMES = {"BertConfig": "bert", "BertModel": "bert", "GPT2Config": "gpt2",
            "GPT2LMHeadModel": "gpt2", "LlamaConfig": "llama", "LlamaForCausalLM": "llama"}


PICKLED = ("pytorch_model.bin", "pytorch_model.bin.index.json")


def local_model_dir(path: str, key: str) -> Path:
    """The local directory ``path`` of a model saved with ``save_pretrained``, checked: it holds
    ``config.json`` and safetensors weights (nothing is downloaded, nothing unpickled).

    Raises:
        FileNotFoundError: not a directory, no ``config.json`` or no weights; names ``key``.
        ValueError: pickled weights only (unpickling runs arbitrary code).
    """
    p = Path(path).expanduser()
    if not p.is_dir():
        raise FileNotFoundError(f"{key}={path!r}: not a directory (a local Hugging Face model "
                                "directory, as save_pretrained writes; nothing is downloaded)")
    if not (p / "config.json").is_file():
        raise FileNotFoundError(f"{key}={path!r}: no config.json (not a directory written by "
                                "save_pretrained)")
    if not any(p.glob("*.safetensors")):
        if any((p / n).is_file() for n in PICKLED):
            raise ValueError(f"{key}={path!r}: only pickled weights (pytorch_model.bin); mmdist "
                             "never unpickles weights (unpickling runs arbitrary code): save the "
                             "model again with save_pretrained, which writes safetensors")
        raise FileNotFoundError(f"{key}={path!r}: no model.safetensors")
    return p


def importable_here(module: str) -> None:
    """Raise a clear error if ``module`` is not imported yet and a ``zero.Init`` is open."""
    if module not in sys.modules and inside_zero_init():
        raise RuntimeError(
            f"{module} cannot be imported inside deepspeed.zero.Init (DeepSpeed's patched tensor "
            "constructors break it): call mmdist.models.transformers_init.preload() before "
            "opening zero.Init, as mmdist's trainer does")


def hf(name: str) -> Any:
    """``transformers.<name>`` for one of :data:`HF_NAMES`, imported on first use."""
    if name not in HF_NAMES:
        raise KeyError(f"{name!r} is not one of the transformers classes mmdist uses: "
                       f"{sorted(HF_NAMES)}")
    family = HF_NAMES[name]
    importable_here(f"transformers.models.{family}.modeling_{family}")
    import transformers  # heavy: on first use, see the module docstring

    return getattr(transformers, name)


def preload() -> None:
    """Import every optional model library a build may need (transformers' model classes and
    ZeRO-3 init, torchvision's models): call before opening ``deepspeed.zero.Init``."""
    # heavy, imported here on purpose (see the module docstring)
    import torchvision.models  # noqa: F401
    from transformers import initialization  # noqa: F401
    from transformers.integrations.deepspeed import initialize_weights_zero3  # noqa: F401

    for name in HF_NAMES:
        hf(name)


def inside_zero_init() -> bool:
    """True while a ``deepspeed.zero.Init`` context is open (without importing deepspeed)."""
    pp = sys.modules.get("deepspeed.runtime.zero.partition_parameters")
    return pp is not None and getattr(pp, "zero_init_context", 0) > 0


@contextmanager
def outside_zero_init() -> Iterator[None]:
    """Suspend an open ``deepspeed.zero.Init`` while loading a pretrained encoder: transformers'
    ZeRO-3 loading of some encoders breaks (Whisper's sinusoidal init reads a partitioned
    shape). Encoders are small beside the LM; ``deepspeed.initialize`` partitions them after."""
    if not inside_zero_init():
        yield
        return
    from deepspeed.runtime.zero import partition_parameters as pp  # heavy: ZeRO-3 only

    pp.shutdown_init_context()
    try:
        yield
    finally:
        pp.restore_init_context()


def build_transformers_model(cls: type, config, **kwargs) -> nn.Module:
    """``cls(config, **kwargs)`` with correct weight init inside or outside ``zero.Init``."""
    if not inside_zero_init():
        return cls(config, **kwargs)
    # heavy: imported on first use (see the module docstring)
    from transformers import initialization as hf_init
    from transformers.integrations.deepspeed import initialize_weights_zero3

    with hf_init.no_init_weights():
        model = cls(config, **kwargs)
    initialize_weights_zero3(model)
    model.tie_weights()
    return model
