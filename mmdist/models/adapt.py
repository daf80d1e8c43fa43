"""What trains: freezing components of the fused model, LoRA adapters through ``peft``, and
merging the adapters into plain weights when the model is consolidated.

Every parameter belongs to exactly one component (``model.freeze`` names them):

    text_encoder / image_encoder / audio_encoder   encoders.<m>.*, less the encoder's projector
    video_frame_encoder                            encoders.video.frame.*: the image encoder run
                                                   on every frame (its own weights, not the image
                                                   modality's), less its projector
    video_temporal                                 encoders.video.{time,mixer}: across the frames
                                                   (none for model.video_temporal=mean)
    decoder                                        the LM inside a task's decoder
    projectors                                     the rest: each encoder's projector (``proj``,
                                                   ``norm``), fusion, trunk, the LM's memory
                                                   projector, task heads, missing-modality tokens

``video_encoder`` in ``model.freeze`` is both video parts (``config_parts.FREEZE_GROUPS``).

    freeze(model, ["image_encoder", "decoder"])      # requires_grad False: not in the optimizer
    add_lora(model, cfg.model.lora)                   # LoRA on the LM: only adapters train
    merged = merge_lora(state_dict, lora_layers(model))  # plain weights, loadable without peft
"""

from __future__ import annotations

import warnings
from collections import Counter
from pathlib import Path
from typing import Any

from torch import Tensor, nn

from mmdist.config_parts import FREEZE_GROUPS

ENCODER_PROJECTOR = ("proj", "norm")  # children of an encoder that are its projector
LORA_PARTS = ("lora_A", "lora_B", "lora_embedding_A", "lora_embedding_B", "lora_magnitude_vector")


def is_adapter(name: str) -> bool:
    """Whether a parameter name is a LoRA adapter's."""
    return any(part in name.split(".") for part in LORA_PARTS)


def component_of(name: str) -> str:
    """The component (``model.freeze`` name) a parameter of the fused model belongs to."""
    parts = name.split(".")
    if parts[:2] == ["encoders", "video"] and len(parts) > 2:
        if parts[2] != "frame":
            return "video_temporal"
        return ("projectors" if len(parts) > 3 and parts[3] in ENCODER_PROJECTOR
                else "video_frame_encoder")
    if parts[0] == "encoders" and len(parts) > 2:
        return "projectors" if parts[2] in ENCODER_PROJECTOR else f"{parts[1]}_encoder"
    if parts[0] == "tasks" and len(parts) > 3 and parts[2] == "decoder":
        return "projectors" if parts[3] == "memory_proj" else "decoder"
    return "projectors"


def expand(components: list[str]) -> list[str]:
    """``model.freeze`` names -> components (``video_encoder``: both video parts)."""
    return [c for name in components for c in FREEZE_GROUPS.get(name, (name,))]


def freeze(model: nn.Module, components: list[str]) -> dict[str, int]:
    """Stop the parameters of ``components`` from training (``requires_grad=False``: they take
    no gradient and no optimizer state). Returns frozen parameter counts per component."""
    components = expand(components)
    frozen: Counter[str] = Counter()
    for name, p in model.named_parameters():
        c = component_of(name)
        if c in components and not is_adapter(name):  # LoRA adapters train on a frozen part
            p.requires_grad_(False)
            frozen[c] += p.ds_numel if hasattr(p, "ds_numel") else p.numel()
    return dict(frozen)


def peft_targets(names: list[str]) -> str | list[str]:
    """``model.lora.target_modules`` as peft takes it (``all-linear`` is a word of its own)."""
    return "all-linear" if list(names) == ["all-linear"] else list(names)


def lora_targets(model: nn.Module, components: list[str]) -> dict[str, nn.Module]:
    """The pretrained modules LoRA adapts: the LM for ``decoder``, each encoder's ``backbone``."""
    out = {}
    for c in components:
        if c == "decoder":
            for t, task in model.tasks.items():
                lm = getattr(getattr(task, "decoder", None), "lm", None)
                if lm is not None:
                    out[f"tasks.{t}.decoder.lm"] = lm
        else:
            m = c.removesuffix("_encoder")
            enc = model.encoders[m] if m in model.encoders else None
            if enc is not None and hasattr(enc, "backbone"):
                out[f"encoders.{m}.backbone"] = enc.backbone
    return out


def add_lora(model: nn.Module, lora: Any) -> int:
    """Inject LoRA adapters (``peft``) into the pretrained parts ``lora.components`` names; the
    adapted parts' own weights stop training. Returns the number of adapter parameters.

    Raises:
        ValueError: a component has no pretrained part to adapt, or no module matched
            ``lora.target_modules``.
    """
    from peft import LoraConfig, inject_adapter_in_model  # heavy: only LoRA runs need it

    targets = lora_targets(model, list(lora.components))
    missing = [c for c in lora.components if not any(
        k.startswith("tasks." if c == "decoder" else f"encoders.{c.removesuffix('_encoder')}.")
        for k in targets)]
    if missing:
        raise ValueError(f"model.lora.components={list(lora.components)}: no pretrained part for "
                         f"{missing} in this model")
    added = 0
    for prefix, module in targets.items():
        config = LoraConfig(r=lora.r, lora_alpha=lora.alpha, lora_dropout=lora.dropout,
                            target_modules=peft_targets(lora.target_modules), bias="none")
        try:
            with warnings.catch_warnings():  # GPT-2's Conv1D: peft transposes, and says so
                warnings.filterwarnings("ignore", message="fan_in_fan_out")
                inject_adapter_in_model(config, module)
        except ValueError as e:
            raise ValueError(f"model.lora.target_modules={lora.target_modules!r} on {prefix}: "
                             f"{e}") from None
        for name, p in module.named_parameters():
            p.requires_grad_(is_adapter(name))
            if is_adapter(name):
                added += p.ds_numel if hasattr(p, "ds_numel") else p.numel()
    return added


def lora_layers(model: nn.Module) -> dict[str, tuple[float, bool]]:
    """Per LoRA-adapted module of ``model`` (by name): its scaling and whether its base weight
    is stored transposed (GPT-2's Conv1D), what :func:`merge_lora` needs."""
    try:
        from peft.tuners.lora import LoraLayer  # heavy: only LoRA runs need it
    except ImportError:  # pragma: no cover - peft is a dependency
        return {}
    return {name: (float(m.scaling["default"]), bool(getattr(m, "fan_in_fan_out", False)))
            for name, m in model.named_modules()
            if isinstance(m, LoraLayer) and "default" in getattr(m, "scaling", {})}


def merge_lora(state: dict[str, Tensor], layers: dict[str, tuple[float, bool]]
               ) -> dict[str, Tensor]:
    """A state dict with every LoRA layer merged (``W + scale * B @ A``) under the base layer's
    own names (``q_proj.weight``), adapters dropped: the weights of the model without peft.

    Raises:
        ValueError: an adapter of a kind this cannot merge (embedding LoRA, DoRA).
    """
    out = dict(state)
    for prefix, (scale, transposed) in layers.items():
        a = out.pop(f"{prefix}.lora_A.default.weight", None)
        b = out.pop(f"{prefix}.lora_B.default.weight", None)
        if a is None or b is None:
            raise ValueError(f"{prefix}: LoRA weights not found in the state dict (embedding "
                             "LoRA and DoRA are not merged by mmdist)")
        for kind in ("weight", "bias"):
            base = out.pop(f"{prefix}.base_layer.{kind}", None)
            if base is None:
                continue
            if kind == "weight":
                delta = (b.float() @ a.float()) * scale
                base = (base.float() + (delta.T if transposed else delta)).to(base.dtype)
            out[f"{prefix}.{kind}"] = base
    left = sorted(k for k in out if any(f".{p}." in k for p in LORA_PARTS))
    if left:
        raise ValueError(f"LoRA weights left after merging: {left[:5]}")
    return out


def adapter_state(state: dict[str, Tensor], prefix: str) -> dict[str, Tensor]:
    """The LoRA tensors under ``prefix`` (e.g. ``tasks.lm.decoder.lm``), named as peft saves an
    adapter (``base_model.model.<name>``, no adapter name), for ``PeftModel.from_pretrained``."""
    out = {}
    for k, v in state.items():
        if k.startswith(prefix + ".") and any(f".{p}." in k for p in LORA_PARTS):
            name = k[len(prefix) + 1:].replace(".default.", ".")
            out[f"base_model.model.{name}"] = v
    return out


def save_adapters(state: dict[str, Tensor], cfg: Any, directory: str | Path) -> list[str]:
    """Write each adapted part's LoRA weights alone, as peft saves an adapter
    (``<dir>/<component>/adapter_model.safetensors`` + ``adapter_config.json``): the decoder's
    loads onto the original LM with ``PeftModel.from_pretrained(lm, dir)``. Returns the parts."""
    from peft import LoraConfig  # heavy: only LoRA runs need it
    from safetensors.torch import save_file

    lora, written = cfg.model.lora, []
    for c in lora.components:
        if c == "decoder":  # one LM per task that holds one (multitask: lm and vqa)
            owners = sorted({k.split(".decoder.lm.")[0] + ".decoder.lm" for k in state
                             if k.startswith("tasks.") and ".decoder.lm." in k and ".lora_" in k})
        else:
            owners = [f"encoders.{c.removesuffix('_encoder')}.backbone"]
        for owner in owners:
            tensors = adapter_state(state, owner)
            if not tensors:
                continue
            out = Path(directory) / (c if len(owners) == 1 else f"{c}-{owner.split('.')[1]}")
            out.mkdir(parents=True, exist_ok=True)
            save_file({k: v.contiguous() for k, v in tensors.items()},
                      str(out / "adapter_model.safetensors"), metadata={"format": "pt"})
            base = getattr(cfg.model, f"{c.removesuffix('_encoder')}_pretrained", None)
            LoraConfig(r=lora.r, lora_alpha=lora.alpha, lora_dropout=lora.dropout,
                       target_modules=peft_targets(lora.target_modules), bias="none",
                       base_model_name_or_path=base).save_pretrained(str(out))
            written.append(c)
    return written


def trainable_summary(model: nn.Module) -> dict[str, dict[str, int]]:
    """Per component: total and trainable parameter counts (ZeRO-3 aware)."""
    out: dict[str, dict[str, int]] = {}
    for name, p in model.named_parameters():
        n = p.ds_numel if hasattr(p, "ds_numel") else p.numel()
        c = out.setdefault(component_of(name.replace(".base_layer.", ".")),
                           {"total": 0, "trainable": 0})
        c["total"] += n
        c["trainable"] += n if p.requires_grad else 0
    return out
