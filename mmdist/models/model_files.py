"""A fused model on disk: ``model.safetensors`` (never pickle) + ``config.json`` (the full mmdist
config, the tokenizer's special ids, facts to rebuild the architecture) + ``tokenizer/``.

    save_model(model, "out/", tokenizer_dir="shards/tokenizer")
    model = load_model("out/")
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file
from torch import Tensor, nn

from mmdist.config import Config, task_class
from mmdist.models.builder import build_model, make_vocab, rebuild_extra
from mmdist.models.fused import FusedModel

WEIGHTS_NAME = "model.safetensors"
CONFIG_NAME = "config.json"
FORMAT = "mmdist-fused-model/3"
OLD_FORMATS = (  # still load: the architecture they were trained with is rebuilt
    "mmdist-fused-model/1",  # heads.<task>.* and decoder.* at the top level
    "mmdist-fused-model/2",  # before QK-norm, residual convs, CNN positions, late-fusion norm
)
# extra["architecture"] of a model built as files before format 3 describe it
LEGACY_ARCHITECTURE = 2
AUDIO_PROCESSOR_DIR = "audio_processor"  # a pretrained audio encoder's feature extractor settings
PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".pkl", ".pickle", ".ckpt")


def save_model(model: FusedModel, directory: str | Path,
               tokenizer_dir: str | Path | None = None) -> None:
    """Write ``model.safetensors`` + ``config.json`` and, when given, a copy of the tokenizer
    directory as ``tokenizer/``."""
    state = {k: v.detach().cpu() for k, v in model.state_dict().items()}
    save_state_dict(state, model.config, model.vocab, directory, extra=model.extra,
                    tokenizer_dir=tokenizer_dir)


def save_state_dict(state: dict[str, Tensor], cfg: Config | dict[str, Any], vocab: dict[str, Any],
                    directory: str | Path, extra: dict[str, Any] | None = None,
                    tokenizer_dir: str | Path | None = None) -> None:
    """Save a (consolidated) state dict as :func:`save_model` does; for weights gathered from
    ZeRO shards without building a model on one process.

    Tensors sharing storage (tied embeddings) are written once; loading re-ties them.
    """
    cfg_dict = cfg.to_dict() if isinstance(cfg, Config) else dict(cfg)
    if extra is None:
        extra = rebuild_extra(Config.from_dict(cfg_dict))
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    seen: set[tuple] = set()
    tensors: dict[str, Tensor] = {}
    for name, t in state.items():
        key = (t.untyped_storage().data_ptr(), t.storage_offset(), tuple(t.shape))
        if t.numel() and key in seen:
            continue
        seen.add(key)
        tensors[name] = t.detach().cpu().contiguous().clone()
    save_file(tensors, str(directory / WEIGHTS_NAME), metadata={"format": "pt"})
    meta = {"format": FORMAT, "config": cfg_dict, "vocab": make_vocab(**vocab), "extra": extra}
    (directory / CONFIG_NAME).write_text(json.dumps(meta, indent=1))
    if tokenizer_dir is not None:
        shutil.copytree(tokenizer_dir, directory / "tokenizer", dirs_exist_ok=True)


def copy_processors(cfg: Config, directory: str | Path) -> None:
    """Copy what preprocessing needs of pretrained encoders into a model directory, so the model
    predicts offline without them: the audio feature extractor's settings (the image
    processor's size, mean and std are in the config and ``extra``)."""
    m = cfg.model
    if m.audio_pretrained and Path(m.audio_pretrained).is_dir():
        out = Path(directory) / AUDIO_PROCESSOR_DIR
        out.mkdir(parents=True, exist_ok=True)
        for name in ("preprocessor_config.json", "processor_config.json"):
            if (Path(m.audio_pretrained) / name).is_file():
                shutil.copy2(Path(m.audio_pretrained) / name, out / name)


def read_meta(directory: str | Path) -> dict[str, Any]:
    """``config.json`` of a model directory: ``config``, ``vocab`` (special ids included)."""
    path = Path(directory) / CONFIG_NAME
    if not path.exists():
        raise FileNotFoundError(f"{directory}: no {CONFIG_NAME}")
    meta = json.loads(path.read_text())
    if meta.get("format") != FORMAT and meta.get("format") not in OLD_FORMATS:
        raise ValueError(f"{path}: not an mmdist model (format {meta.get('format')!r}, "
                         f"expected {FORMAT!r})")
    meta["vocab"] = make_vocab(**meta["vocab"])
    return meta


def load_model(directory: str | Path, map_location: str = "cpu") -> FusedModel:
    """Load a model saved by :func:`save_model` (safetensors only, never pickle).

    Raises:
        FileNotFoundError: no ``config.json`` / ``model.safetensors`` in ``directory``.
        ValueError: the weights are a pickle (refused, never unpickled) or do not fit.
    """
    directory = Path(directory)
    weights = directory / WEIGHTS_NAME
    pickles = sorted(p.name for p in directory.glob("*") if p.suffix in PICKLE_SUFFIXES)
    if not weights.exists():
        if pickles:
            raise ValueError(f"{directory}: holds pickled weights {pickles} and no "
                             f"{WEIGHTS_NAME}; mmdist never unpickles weights (unpickling "
                             "runs arbitrary code). Convert them to safetensors first.")
        raise FileNotFoundError(f"{directory}: no {WEIGHTS_NAME}")
    meta = read_meta(directory)
    try:
        state = load_file(str(weights), device=map_location)
    except SafetensorError as e:  # a pickle / torch.save file renamed, or corrupt
        raise ValueError(f"{weights}: not a valid safetensors file ({e}); mmdist never "
                         "unpickles weights (unpickling runs arbitrary code)") from None
    extra = dict(meta.get("extra") or {})
    config = meta["config"]
    if meta["format"] in OLD_FORMATS:
        extra["architecture"] = LEGACY_ARCHITECTURE
        config = {**config, "model": {"align_weight": 0.0, **config.get("model", {})}}
    cfg = Config.from_dict(config)
    model = build_model(cfg, **meta["vocab"], extra=extra, load_pretrained=False)
    if extra.get("architecture") == LEGACY_ARCHITECTURE:
        legacy_architecture(model)
    if meta["format"] == OLD_FORMATS[0]:
        state = _from_format_1(state, cfg)
    load_weights(model, state)
    return model


def legacy_architecture(model: FusedModel) -> FusedModel:
    """Turn a freshly built model into the architecture of files before format 3: no QK-norm,
    no residual convs or positions in the CNN and the early-fusion stem, no LayerNorm after the
    late-fusion heads (so models registered before these changes load and predict as they
    did). ``model.extra["architecture"]`` records it, so saving the model again keeps it."""
    # light, but only old files need them
    from mmdist.models.blocks import Attention
    from mmdist.models.fused import Fuser
    from mmdist.models.image_encoder import CNNImageEncoder, ResidualConv
    from mmdist.models.input_embeddings import PatchEmbedding

    for module in list(model.modules()):
        if isinstance(module, Attention):
            module.q_norm, module.k_norm = nn.Identity(), nn.Identity()
        elif isinstance(module, (CNNImageEncoder, PatchEmbedding)):
            name = "features" if isinstance(module, CNNImageEncoder) else "stem"
            layers = [m for m in getattr(module, name) if not isinstance(m, ResidualConv)]
            setattr(module, name, nn.Sequential(*layers))
            if isinstance(module, CNNImageEncoder):
                module.pos = None
        elif isinstance(module, Fuser) and module.late_heads is not None:
            module.late_heads = nn.ModuleList(h[0] for h in module.late_heads)
    model.extra = {**model.extra, "architecture": LEGACY_ARCHITECTURE}
    return model


def _from_format_1(state: dict[str, Tensor], cfg: Config) -> dict[str, Tensor]:
    """Format 1 kept task heads under ``heads.<task>.`` and the decoder under ``decoder.``."""
    m = cfg.model
    tasks = task_class(m.task).components(m)
    owner = next((t for t in tasks if task_class(t).uses_decoder(m)), None)
    out = {}
    for k, v in state.items():
        if k.startswith("heads."):
            task, rest = k[len("heads."):].split(".", 1)
            k = f"tasks.{task}.head.{rest}"
        elif k.startswith("decoder.") and owner:
            k = f"tasks.{owner}.{k}"
        out[k] = v
    return out


def load_weights(model: FusedModel, state: dict[str, Tensor]) -> None:
    """Load a state dict saved by :func:`save_state_dict` (tied weights may be absent;
    non-persistent buffers may be present).

    Raises:
        ValueError: keys or shapes do not match this model.
    """
    own = model.state_dict()
    params = dict(model.named_parameters())  # deduplicated: tied copies are left out
    tied = {k for k in own if k not in params and k not in dict(model.named_buffers())}
    non_persistent = {k for k, _ in model.named_buffers() if k not in own}
    state = {k: v for k, v in state.items() if k not in non_persistent}
    missing = sorted(set(own) - set(state) - tied)
    unexpected = sorted(set(state) - set(own))
    if missing or unexpected:
        raise ValueError(f"weights do not fit this model: missing {missing[:10]}, "
                         f"unexpected {unexpected[:10]}")
    result = model.load_state_dict(state, strict=False)
    if set(result.missing_keys) - tied:
        raise ValueError(f"weights do not fit this model: missing {result.missing_keys}")


def init_weights(model: nn.Module, directory: str | Path) -> int:
    """Start ``model`` from the weights of the mmdist model saved in ``directory``
    (``model.init_from``: stage 2 from stage 1). LoRA adapters the new model adds start fresh
    (``X.base_layer.weight`` takes the saved ``X.weight``); every other tensor must be there
    with its shape. ZeRO-3 partitioned parameters are filled through a gather. Returns the
    number of tensors loaded.

    Raises:
        ValueError: the saved model has another architecture or tokenizer (names the keys).
    """
    directory = Path(directory)
    meta = read_meta(directory)
    try:
        state = load_file(str(directory / WEIGHTS_NAME))
    except (SafetensorError, FileNotFoundError) as e:
        raise ValueError(f"model.init_from: {directory / WEIGHTS_NAME}: {e}") from None
    vocab = getattr(model, "vocab", None)
    if vocab and meta["vocab"]["vocab_size"] != vocab["vocab_size"]:
        raise ValueError(f"model.init_from: {directory} was trained with a tokenizer of "
                         f"{meta['vocab']['vocab_size']} tokens, this run's has "
                         f"{vocab['vocab_size']}; prepare the data with the same tokenizer")
    lora = (".lora_A.", ".lora_B.", ".lora_embedding_", ".lora_magnitude")
    own = model.state_dict().keys()  # non-persistent buffers (rotary tables) are not saved
    targets = {**dict(model.named_parameters()),
               **{k: b for k, b in model.named_buffers() if k in own}}
    missing, wrong, plan = [], [], []
    for name, t in targets.items():
        if any(x in name for x in lora):
            continue
        src = name.replace(".base_layer.", ".")
        if src not in state:
            missing.append(name)
            continue
        shape = tuple(t.ds_shape) if hasattr(t, "ds_shape") else tuple(t.shape)
        if tuple(state[src].shape) != shape:
            wrong.append(f"{name} {tuple(state[src].shape)} != {shape}")
            continue
        plan.append((t, state[src]))
    tied = {k for k in own if k not in targets}
    missing = [k for k in missing if k not in tied]
    if missing or wrong:
        raise ValueError(f"model.init_from: {directory} does not fit this model: missing "
                         f"{missing[:8]}, other shapes {wrong[:8]}")
    for t, value in plan:
        if hasattr(t, "ds_id"):  # ZeRO-3 partitioned: gather, set, re-partition
            import deepspeed  # heavy: only ZeRO-3 runs get here

            with deepspeed.zero.GatheredParameters([t], modifier_rank=0), torch.no_grad():
                t.copy_(value.to(t.dtype))
        else:
            with torch.no_grad():
                t.copy_(value.to(t.dtype))
    return len(plan)
