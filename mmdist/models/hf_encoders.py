"""Pretrained Hugging Face encoders from local directories, as mmdist encoders.

Each wrapper keeps mmdist's encoder contract, ``forward(x) -> (tokens (B, T, D), mask (B, T)
bool)``, and has exactly two children: ``backbone`` (the pretrained transformers module) and
``proj`` (a LLaVA-style projector to the model width, :func:`projector`), so training code can
freeze ``encoders.<m>.backbone`` and train ``encoders.<m>.proj``. What is not learned (image
mean/std, frames Whisper takes) is kept as plain attributes, never in the state dict.

============  ==========================================  ===================================
modality      model types (``config.json``)               input
============  ==========================================  ===================================
image         clip, siglip (their vision towers), vit,    uint8 ``(B, 3, S, S)``
              dinov2
audio         whisper (encoder only)                      log-mel ``(B, n_mels, F)``
              wav2vec2, hubert, wavlm                     waveform ``(B, N)``
              audio-spectrogram-transformer               fbank ``(B, max_length, n_mels)``
text          bert, roberta, xlm-roberta, distilbert,     ids + mask ``(B, L)``
              modernbert
============  ==========================================  ===================================

The audio features come from :class:`mmdist.data.hf_audio.AudioFeatures` (the feature extractor
saved with the model); image sizes and mean/std from :func:`image_processor_facts`.

Weights load from safetensors only (mmdist never unpickles), from local files only. A saved
mmdist model rebuilds its backbone from :func:`backbone_config` (``load_backbone(path, role,
config)``) with no file access, its weights following from the model file. transformers is
imported on first use (``mmdist.models.transformers_init``).
"""

from __future__ import annotations

import importlib
import inspect
import math
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError
from torch import Tensor, nn

from mmdist.data.hf_audio import AUDIO_KINDS, read_json
from mmdist.models.transformers_init import (
    build_transformers_model,
    importable_here,
    local_model_dir,
)

# model type -> (transformers module under transformers.models, class of the backbone,
# modality, keyword arguments of the class)
FAMILIES: dict[str, tuple[str, str, str, dict[str, Any]]] = {
    "clip": ("clip", "CLIPVisionModel", "image", {}),
    "clip_vision_model": ("clip", "CLIPVisionModel", "image", {}),
    "siglip": ("siglip", "SiglipVisionModel", "image", {}),
    "siglip_vision_model": ("siglip", "SiglipVisionModel", "image", {}),
    "vit": ("vit", "ViTModel", "image", {"add_pooling_layer": False}),
    "dinov2": ("dinov2", "Dinov2Model", "image", {}),
    "whisper": ("whisper", "WhisperEncoder", "audio", {}),
    "wav2vec2": ("wav2vec2", "Wav2Vec2Model", "audio", {}),
    "hubert": ("hubert", "HubertModel", "audio", {}),
    "wavlm": ("wavlm", "WavLMModel", "audio", {}),
    "audio-spectrogram-transformer": ("audio_spectrogram_transformer", "ASTModel", "audio", {}),
    "bert": ("bert", "BertModel", "text", {"add_pooling_layer": False}),
    "roberta": ("roberta", "RobertaModel", "text", {"add_pooling_layer": False}),
    "xlm-roberta": ("xlm_roberta", "XLMRobertaModel", "text", {"add_pooling_layer": False}),
    "distilbert": ("distilbert", "DistilBertModel", "text", {}),
    "modernbert": ("modernbert", "ModernBertModel", "text", {}),
}
# full two-tower configs -> the vision tower's sub-config
_TOWERS = {"clip": "vision_config", "siglip": "vision_config"}
# config changes applied to every build: the pooling head of SigLIP's vision tower is not used
# (tokens are last_hidden_state), and unused parameters only cost memory and ZeRO trouble
_CONFIG_CHANGES = {"siglip": {"vision_use_head": False},
                   "siglip_vision_model": {"vision_use_head": False}}
# Whisper checkpoints hold the whole encoder-decoder: keep the encoder's weights, unprefixed
_WHISPER_KEYS = {r"^(model\.)?encoder\.": ""}


def supported_types(modality: str | None = None) -> list[str]:
    """The model types :func:`load_backbone` takes (of one ``modality``: image, audio, text)."""
    return sorted(t for t, f in FAMILIES.items() if modality in (None, f[2]))


def _family(model_type: Any, role: str, path: str) -> tuple[str, str, str, dict[str, Any]]:
    if model_type not in FAMILIES:
        kinds = "; ".join(f"{m}: {', '.join(supported_types(m))}"
                          for m in ("image", "audio", "text"))
        raise ValueError(f"{role}={path!r}: model type {model_type!r} is not supported; "
                         f"supported ({kinds})")
    return FAMILIES[model_type]


def transformers_class(module: str, name: str) -> type:
    modeling = f"transformers.models.{module}.modeling_{module}"
    importable_here(modeling)
    # heavy: on first use, see transformers_init
    return getattr(importlib.import_module(modeling), name)


def load_backbone(path: str, role: str, config: dict | None = None) -> nn.Module:
    """The pretrained module in the local directory ``path`` (its vision tower for CLIP and
    SigLIP, its encoder for Whisper), float32.

    Args:
        path: a directory saved with ``save_pretrained`` (``config.json`` + safetensors).
        role: the config key ``path`` came from (``"model.image_pretrained"``), for errors.
        config: a :func:`backbone_config` dict: build that architecture with random init and
            no file access (the weights follow from a saved mmdist model); ``path`` is then
            only named in errors.

    Raises:
        FileNotFoundError: ``path`` is not a directory, has no ``config.json`` or no weights.
        ValueError: an unsupported model type (the message lists the supported ones); only
            pickled weights (``pytorch_model.bin``); weights that do not fit the architecture.
    """
    if config is not None:
        return _build_from_config(dict(config), role, path)
    config_file = Path(path) / "config.json"
    if config_file.is_file():  # an unsupported model is named before missing weights
        _family(read_json(config_file).get("model_type"), role, path)
    d = local_model_dir(path, role)
    model_type = read_json(d / "config.json").get("model_type")
    module, name, _, kwargs = _family(model_type, role, path)
    cls = transformers_class(module, name)
    # keyword arguments of the class, then config changes (from_pretrained applies those)
    extra: dict[str, Any] = {**kwargs, **_CONFIG_CHANGES.get(model_type, {})}
    if model_type == "whisper":
        extra["key_mapping"] = _WHISPER_KEYS
    try:
        model, info = cls.from_pretrained(str(d), use_safetensors=True, local_files_only=True,
                                          dtype=torch.float32, output_loading_info=True, **extra)
    except (OSError, ValueError, RuntimeError, KeyError, SafetensorError) as e:
        raise ValueError(f"{role}={path!r}: cannot load {name} from it: {e}") from None
    missing = sorted(info.get("missing_keys") or [])
    mismatched = list(info.get("mismatched_keys") or [])
    if missing or mismatched:
        raise ValueError(f"{role}={path!r}: the weights do not fit {name}: missing "
                         f"{missing[:5]}{'...' if len(missing) > 5 else ''}, mismatched "
                         f"{mismatched[:5]}")
    return model


def _build_from_config(config: dict[str, Any], role: str, path: str) -> nn.Module:
    model_type = config.get("model_type")
    module, name, _, kwargs = _family(model_type, role, path)
    cls = transformers_class(module, name)
    from transformers.models.auto.configuration_auto import CONFIG_MAPPING

    cfg = CONFIG_MAPPING[model_type].from_dict(config)
    if model_type in _TOWERS:
        cfg = getattr(cfg, _TOWERS[model_type])
    for key, value in _CONFIG_CHANGES.get(model_type, {}).items():
        setattr(cfg, key, value)
    return build_transformers_model(cls, cfg, **kwargs)


def preload_backbone(path: str) -> None:
    """Import the transformers module of the model in ``path`` (before ``zero.Init``)."""
    config = Path(path) / "config.json"
    if config.is_file() and read_json(config).get("model_type") in FAMILIES:
        module, name, _, _ = FAMILIES[read_json(config)["model_type"]]
        transformers_class(module, name)


def backbone_config(module: nn.Module) -> dict[str, Any]:
    """What :func:`load_backbone` needs to build ``module``'s architecture again without
    files (its transformers config as a JSON-able dict)."""
    return module.config.to_dict()


def projector(width: int, dim: int) -> nn.Sequential:
    """LLaVA-style projector from backbone width to model width: Linear, GELU, Linear,
    LayerNorm."""
    return nn.Sequential(nn.Linear(width, dim), nn.GELU(), nn.Linear(dim, dim), nn.LayerNorm(dim))


def _width(backbone: nn.Module) -> int:
    # from the config, never weight shapes: under ZeRO-3 the weights are partitioned (empty)
    return int(backbone.config.hidden_size)


def _check_modality(backbone: nn.Module, modality: str, wrapper: str) -> str:
    model_type = getattr(backbone.config, "model_type", None)
    if model_type not in FAMILIES or FAMILIES[model_type][2] != modality:
        kinds = ", ".join(supported_types(modality))
        raise ValueError(f"{wrapper} takes a {modality} model ({kinds}), not {model_type!r}")
    return model_type


def _all_true(tokens: Tensor) -> Tensor:
    return torch.ones(tokens.shape[:2], dtype=torch.bool, device=tokens.device)


class HFImageEncoder(nn.Module):
    """A pretrained vision transformer (CLIP/SigLIP vision tower, ViT, DINOv2) over uint8
    images: every output token (class token included where the model has one), projected.

    Args:
        backbone: the vision model (from :func:`load_backbone`).
        dim: output width D.
        mean: per-channel mean the model was trained with (:func:`image_processor_facts`).
        std: per-channel std, likewise.

    Raises:
        ValueError: ``backbone`` is not a supported vision model.
    """

    def __init__(self, backbone: nn.Module, dim: int, mean: tuple[float, ...] | list[float],
                 std: tuple[float, ...] | list[float]):
        super().__init__()
        _check_modality(backbone, "image", "HFImageEncoder")
        self.backbone = backbone
        self.proj = projector(_width(backbone), dim)
        self.mean = tuple(float(m) for m in mean)
        self.std = tuple(float(s) for s in std)
        self.image_size = int(getattr(backbone.config, "image_size", 0) or 0)
        # CLIP, SigLIP and ViT take other sizes only when asked (DINOv2 always interpolates)
        self.can_interpolate = "interpolate_pos_encoding" in inspect.signature(
            backbone.forward).parameters

    def features(self, image: Tensor) -> tuple[Tensor, Tensor]:
        """The frozen part: uint8 ``(B, 3, S, S)`` -> backbone output ``(B, T, W)``, mask."""
        dtype = self.proj[0].weight.dtype
        mean = torch.tensor(self.mean, device=image.device, dtype=dtype).view(1, 3, 1, 1)
        std = torch.tensor(self.std, device=image.device, dtype=dtype).view(1, 3, 1, 1)
        x = (image.to(dtype) / 255.0 - mean) / std
        kwargs = {}
        if self.can_interpolate and self.image_size and tuple(x.shape[-2:]) != (
                self.image_size, self.image_size):
            kwargs["interpolate_pos_encoding"] = True
        h = self.backbone(pixel_values=x, **kwargs).last_hidden_state
        return h, _all_true(h)

    def forward(self, image: Tensor) -> tuple[Tensor, Tensor]:
        """uint8 ``(B, 3, S, S)`` -> tokens ``(B, T, D)`` and an all-true mask."""
        return self.from_features(*self.features(image))

    def from_features(self, h: Tensor, mask: Tensor) -> tuple[Tensor, Tensor]:
        """The trained part: backbone output ``(B, T, W)`` (live or from the feature cache,
        ``mmdist.data.feature_cache``) -> projected tokens and the mask."""
        return self.proj(h.to(self.proj[0].weight.dtype)), mask.bool()


def audio_kind(path_or_config: Any) -> str:
    """The input kind (``log_mel``, ``waveform``, ``fbank``) of an audio model: given its
    directory, its config dict, or its transformers config.

    Raises:
        FileNotFoundError: a path that is not a directory with a ``config.json``.
        ValueError: not an audio model mmdist supports.
    """
    if isinstance(path_or_config, str | Path):
        d = Path(path_or_config)
        if not (d / "config.json").is_file():
            raise FileNotFoundError(f"{str(path_or_config)!r}: no config.json")
        model_type = read_json(d / "config.json").get("model_type")
    elif isinstance(path_or_config, dict):
        model_type = path_or_config.get("model_type")
    else:
        model_type = getattr(path_or_config, "model_type", None)
    if model_type not in AUDIO_KINDS:
        raise ValueError(f"model type {model_type!r} is not an audio encoder mmdist supports; "
                         f"supported: {sorted(AUDIO_KINDS)}")
    return AUDIO_KINDS[model_type]


class HFAudioEncoder(nn.Module):
    """A pretrained audio encoder over the features its extractor makes
    (:class:`mmdist.data.hf_audio.AudioFeatures`), projected.

    Kinds: ``log_mel`` (Whisper's encoder): ``(B, n_mels, F)`` padded (with each clip's
    minimum, silence in Whisper's log-mel) or cut to the frames the encoder takes; tokens past
    the clip's ``ceil(F / 2)`` are masked out. ``waveform`` (wav2vec2, HuBERT, WavLM):
    ``(B, N)``, all tokens. ``fbank`` (AST): ``(B, max_length, n_mels)``, all tokens.

    Args:
        backbone: the audio model (from :func:`load_backbone`).
        dim: output width D.
        kind: its input kind (:func:`audio_kind`).
        expected_frames: ``log_mel`` only: frames the encoder takes (default
            ``config.max_source_positions * 2``, Whisper's 30 s window).

    Raises:
        ValueError: an unknown kind, or one the backbone does not take.
    """

    def __init__(self, backbone: nn.Module, dim: int, kind: str,
                 expected_frames: int | None = None):
        super().__init__()
        model_type = _check_modality(backbone, "audio", "HFAudioEncoder")
        if AUDIO_KINDS.get(model_type) != kind:
            raise ValueError(f"HFAudioEncoder: a {model_type} model takes "
                             f"{AUDIO_KINDS.get(model_type)!r} input, not {kind!r}")
        self.backbone = backbone
        self.proj = projector(_width(backbone), dim)
        self.kind = kind
        cfg = backbone.config
        self.expected_frames = (int(expected_frames or 2 * cfg.max_source_positions)
                                if kind == "log_mel" else None)

    def forward(self, audio: Tensor) -> tuple[Tensor, Tensor]:
        """Features -> tokens ``(B, T, D)`` and mask ``(B, T)`` (bool)."""
        return self.from_features(*self.features(audio))

    def from_features(self, h: Tensor, mask: Tensor) -> tuple[Tensor, Tensor]:
        """The trained part: backbone output ``(B, T, W)`` -> projected tokens, mask."""
        return self.proj(h.to(self.proj[0].weight.dtype)), mask.bool()

    def features(self, audio: Tensor) -> tuple[Tensor, Tensor]:
        """The frozen part: extractor features -> backbone output ``(B, T, W)``, mask."""
        dtype = self.proj[0].weight.dtype
        x = audio.to(dtype)
        cfg = self.backbone.config
        if self.kind == "log_mel":
            return self._log_mel(x)
        if self.kind == "waveform":
            if x.dim() != 2:
                raise ValueError(f"{cfg.model_type} takes waveforms (B, N), got "
                                 f"{tuple(x.shape)}")
            h = self.backbone(input_values=x).last_hidden_state
        else:
            want = (cfg.max_length, cfg.num_mel_bins)
            if x.dim() != 3 or tuple(x.shape[1:]) != want:
                raise ValueError(f"AST takes filterbanks (B, {want[0]}, {want[1]}), got "
                                 f"{tuple(x.shape)}: make them with the feature extractor "
                                 "saved with the model")
            h = self.backbone(input_values=x).last_hidden_state
        return h, _all_true(h)

    def _log_mel(self, x: Tensor) -> tuple[Tensor, Tensor]:
        n_mels = self.backbone.config.num_mel_bins
        if x.dim() != 3 or x.shape[1] != n_mels:
            raise ValueError(f"Whisper takes log-mel features (B, {n_mels}, F), got "
                             f"{tuple(x.shape)}: make them with the feature extractor saved "
                             "with the model")
        frames, expected = x.shape[-1], self.expected_frames
        if frames < expected:
            silence = x.amin(dim=(1, 2), keepdim=True) if frames else torch.zeros_like(x[..., :1])
            x = torch.cat([x, silence.expand(x.shape[0], n_mels, expected - frames)], dim=-1)
        elif frames > expected:
            x = x[..., :expected]
        h = self.backbone(input_features=x).last_hidden_state
        real = math.ceil(min(frames, expected) / 2)
        mask = (torch.arange(h.shape[1], device=h.device) < real).expand(h.shape[0], -1)
        return h, mask.contiguous()


class HFTextEncoder(nn.Module):
    """A pretrained text encoder (BERT, RoBERTa, XLM-R, DistilBERT, ModernBERT, MiniLM):
    its last hidden states, projected.

    Args:
        backbone: the text model (from :func:`load_backbone`).
        dim: output width D.

    Raises:
        ValueError: ``backbone`` is not a supported text model.
    """

    def __init__(self, backbone: nn.Module, dim: int):
        super().__init__()
        _check_modality(backbone, "text", "HFTextEncoder")
        self.backbone = backbone
        self.proj = projector(_width(backbone), dim)

    def forward(self, input_ids: Tensor, attention_mask: Tensor) -> tuple[Tensor, Tensor]:
        """``(B, L)`` ids and mask -> tokens ``(B, L, D)`` and mask ``(B, L)`` (bool)."""
        return self.from_features(*self.features(input_ids, attention_mask))

    def features(self, input_ids: Tensor, attention_mask: Tensor) -> tuple[Tensor, Tensor]:
        """The frozen part: ids and mask -> backbone output ``(B, L, W)``, mask."""
        h = self.backbone(input_ids=input_ids, attention_mask=attention_mask).last_hidden_state
        return h, attention_mask.bool()

    def from_features(self, h: Tensor, mask: Tensor) -> tuple[Tensor, Tensor]:
        """The trained part: backbone output -> projected tokens, mask."""
        return self.proj(h.to(self.proj[0].weight.dtype)), mask.bool()


__all__ = ["FAMILIES", "HFAudioEncoder", "HFImageEncoder", "HFTextEncoder", "audio_kind",
           "backbone_config", "load_backbone", "preload_backbone", "projector",
           "supported_types"]
