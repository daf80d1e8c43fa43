"""Build the fused model a config describes: encoders (or early-fusion input embeddings), one
fusion path per modality group the tasks read, and the tasks (``mmdist.registry.TASKS``).

    model = build_model(cfg, vocab_size=2000)
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from torch import nn

from mmdist.config import Config, task_class, torchvision_file
from mmdist.data.image_processor import image_processor_facts
from mmdist.data.schema import SPECIAL_TOKENS, audio_frames
from mmdist.models.activation_checkpointing import enable_activation_checkpointing
from mmdist.models.adapt import add_lora, freeze
from mmdist.models.audio_encoder import build_audio_encoder
from mmdist.models.blocks import TransformerStack
from mmdist.models.fused import FusedModel, Fuser
from mmdist.models.fusion import build_fusion
from mmdist.models.heads import MLPHead
from mmdist.models.image_encoder import build_image_encoder
from mmdist.models.input_embeddings import FrameEmbedding, PatchEmbedding, TextEmbedding
from mmdist.models.sizes import SizeSpec, size_spec
from mmdist.models.text_encoder import BertTextEncoder, build_text_encoder
from mmdist.models.transformers_init import build_transformers_model, hf, outside_zero_init
from mmdist.models.video_encoder import VideoEncoder

# Aligned slots the element-wise fusion methods combine, per stage.
SLOTS = {"early": 8, "mid": 4, "late": 1}
DECODER_POSITIONS = 1024  # memory prefix + text positions of the decoder LM


@dataclass(frozen=True)
class BuildContext:
    """What a task's parts are built from (``Task.build``)."""

    cfg: Config
    spec: SizeSpec
    vocab: dict[str, Any]  # vocab_size, pad_id, bos_id, eos_id, special_ids
    decoder_positions: int  # memory prefix + text positions a decoder LM must cover
    # facts saved with a model to rebuild pretrained parts without their directories; a part
    # built from its directory adds its own (``decoder_config``, ``<m>_backbone``)
    extra: dict[str, Any] = field(default_factory=dict)

    @property
    def dim(self) -> int:
        return self.spec.hidden


def make_vocab(vocab_size: int, pad_id: int = 0, bos_id: int = 2, eos_id: int = 3,
               special_ids: list[int] | None = None) -> dict[str, Any]:
    """The tokenizer facts a model is built with; without ``special_ids``, mmdist's own
    tokenizer's (``schema.SPECIAL_TOKENS`` at ids 0..5)."""
    special = range(len(SPECIAL_TOKENS)) if special_ids is None else special_ids
    return {"vocab_size": int(vocab_size), "pad_id": int(pad_id), "bos_id": int(bos_id),
            "eos_id": int(eos_id), "special_ids": sorted({int(i) for i in special}
                                                         | {int(pad_id), int(bos_id), int(eos_id)})}


def encoded_modalities(modalities: list[str], tasks: list[str]) -> list[str]:
    """Modalities that get an encoder: text only when a task reads it as input (for ``lm``
    alone the text is the decoder's token stream, and an unused encoder would hold parameters
    without gradients)."""
    text_read = any(task_class(t).reads_text for t in tasks)
    return [m for m in modalities if m != "text" or text_read]


def rebuild_extra(cfg: Config) -> dict[str, Any]:
    """Facts beyond the config needed to rebuild the architecture without the pretrained dirs
    (what :func:`build_model` records while it loads them; built here when not at hand)."""
    m = cfg.model
    if any(getattr(m, f"{p}_pretrained") for p in ("decoder", "text", "image", "audio")):
        return build_model(cfg, vocab_size=1).extra  # the vocabulary does not matter here
    return {}


def build_model(cfg: Config, vocab_size: int, pad_id: int = 0, bos_id: int = 2, eos_id: int = 3,
                special_ids: list[int] | None = None, extra: dict[str, Any] | None = None,
                load_pretrained: bool = True) -> FusedModel:
    """Build the fused model ``cfg.model`` describes for the data dims in ``cfg.data``.

    Args:
        cfg: the full (validated) config.
        vocab_size, pad_id, bos_id, eos_id, special_ids: the tokenizer's size and special ids.
        extra: facts saved with a model (:func:`rebuild_extra`); None -> read them now.
        load_pretrained: read ``model.*_pretrained`` weights (False when weights follow).
    """
    m, d = cfg.model, cfg.data
    spec = size_spec(m.size, m.hidden_size)
    vocab = make_vocab(vocab_size, pad_id, bos_id, eos_id, special_ids)
    mods = [x for x in ("text", "image", "audio", "video") if x in m.modalities]
    extra = dict(extra) if extra is not None else {}  # pretrained parts record theirs
    weights = task_class(m.task).components(m)
    encoders = _encoders(cfg, spec, vocab, encoded_modalities(mods, list(weights)), extra,
                         load_pretrained)
    fusers = nn.ModuleDict()
    groups = set().union(*(task_class(t).groups(m) for t in weights))
    for group in sorted(groups):
        group_mods = mods if group == "all" else [x for x in mods if x != "text"]
        if group_mods:
            fusers[group] = _fuser(cfg, spec, len(group_mods))
    ctx = BuildContext(cfg, spec, vocab, DECODER_POSITIONS, extra)
    # heads before decoders: the order parameters are created in (and so their initial values)
    order = sorted(weights, key=lambda t: task_class(t).uses_decoder(m))
    built = {t: task_class(t).build(ctx) for t in order}
    model = FusedModel(encoders=encoders, fusers=fusers,
                       tasks=nn.ModuleDict({t: built[t] for t in weights}), weights=weights,
                       aux=_aux_heads(cfg, spec, list(encoders)), aux_weight=m.aux_weight,
                       modalities=mods, dim=spec.hidden, modality_dropout=m.modality_dropout,
                       max_text_len=d.max_text_len, vocab=vocab, config=cfg.to_dict(),
                       extra=extra, context_memory="context" in groups and "context" not in fusers,
                       modality_tokens=m.modality_tokens)
    if m.lora is not None:  # an architecture change: checkpoints hold the adapters
        with outside_zero_init():  # peft initialises the adapters it makes; ZeRO-3 partitions
            add_lora(model, m.lora)  # them in deepspeed.initialize
    freeze(model, list(m.freeze))
    if m.activation_checkpointing:  # the trunk blocks checkpoint themselves (TransformerStack)
        enable_activation_checkpointing(model)
    return model


def aux_modalities(cfg: Config, encoded: list[str]) -> dict[str, int]:
    """Modalities with an auxiliary classification head and their class counts."""
    m = cfg.model
    if m.aux_weight <= 0:
        return {}
    return {k: n for k, n in sorted(m.aux_classes.items()) if k in encoded}


def _aux_heads(cfg: Config, spec: SizeSpec, encoded: list[str]) -> nn.ModuleDict:
    return nn.ModuleDict({k: nn.Linear(spec.hidden, n)
                          for k, n in aux_modalities(cfg, encoded).items()})


def _encoders(cfg: Config, spec: SizeSpec, vocab: dict[str, Any], mods: list[str],
              extra: dict[str, Any], load_pretrained: bool) -> nn.ModuleDict:
    m, d, dim = cfg.model, cfg.data, spec.hidden
    frames = audio_frames(d.sample_rate, d.audio_seconds, d.hop_length)
    encoders = nn.ModuleDict()
    for mod in mods:
        if mod == "video":  # the image encoder of this stage per frame, then across time
            frame = _encoders(cfg, spec, vocab, ["image"], extra, load_pretrained)["image"]
            encoders[mod] = VideoEncoder(frame, m.video_temporal, d.video_frames, dim,
                                         spec.heads, spec.enc_layers)
        elif m.fusion_stage == "early":
            encoders[mod] = {
                "text": lambda: TextEmbedding(vocab["vocab_size"], dim, d.max_text_len,
                                              vocab["pad_id"]),
                "image": lambda: PatchEmbedding(d.image_size, dim),
                "audio": lambda: FrameEmbedding(d.n_mels, frames, dim)}[mod]()
        elif hf_part(m, mod, extra):
            encoders[mod] = _hf_encoder(m, mod, dim, extra, vocab["vocab_size"])
        elif mod == "text":
            encoders[mod] = _text(m.text_encoder, vocab, spec, d.max_text_len,
                                  m.text_pretrained if load_pretrained else None,
                                  extra.get("bert_config"))
        elif mod == "image":
            encoders[mod] = build_image_encoder(m.image_encoder, dim, spec.cnn_channels,
                                                d.image_size,
                                                m.image_pretrained if load_pretrained else None)
        else:
            encoders[mod] = build_audio_encoder(m.audio_encoder, d.n_mels, frames, dim,
                                                spec.heads, spec.enc_layers, spec.cnn_channels)
    return encoders


def hf_part(m: Any, mod: str, extra: dict[str, Any]) -> bool:
    """Whether modality ``mod``'s encoder is a pretrained Hugging Face model: its directory is
    configured (an image file, not a directory, holds torchvision weights), or a saved model recorded its
    architecture. A text encoder saved before (``bert_config``) stays a BERT encoder."""
    path = getattr(m, f"{mod}_pretrained")
    if f"{mod}_backbone" in extra:
        return True
    if not path or (mod == "text" and "bert_config" in extra):
        return False
    return not (mod == "image" and torchvision_file(path))


def _hf_encoder(m: Any, mod: str, dim: int, extra: dict[str, Any], vocab_size: int
                ) -> nn.Module:
    """A pretrained encoder from ``model.<mod>_pretrained`` (or, without loading, from the
    architecture and processor settings ``extra`` recorded when it was trained)."""
    # transformers: on first use (see transformers_init)
    from mmdist.models.hf_encoders import (
        HFAudioEncoder,
        HFImageEncoder,
        HFTextEncoder,
        audio_kind,
        backbone_config,
        load_backbone,
    )

    key, path = f"model.{mod}_pretrained", getattr(m, f"{mod}_pretrained")
    with outside_zero_init():
        backbone = load_backbone(path, key, config=extra.get(f"{mod}_backbone"))
    extra[f"{mod}_backbone"] = backbone_config(backbone)
    if mod == "text":
        if backbone.config.vocab_size < vocab_size:
            raise ValueError(f"{key}={path!r}: its vocabulary has {backbone.config.vocab_size} "
                             f"tokens but the run's tokenizer has {vocab_size}; the text encoder "
                             "reads the run's token ids: prepare the data with its tokenizer "
                             "(data.tokenizer)")
        return HFTextEncoder(backbone, dim)
    if mod == "image":
        facts = extra.get("image_processor") or image_processor_facts(path)
        extra["image_processor"] = facts
        return HFImageEncoder(backbone, dim, facts["mean"], facts["std"])
    kind = audio_kind(extra[f"{mod}_backbone"])
    return HFAudioEncoder(backbone, dim, kind)


def preload_pretrained(cfg: Config) -> None:
    """Import the transformers model modules of every configured pretrained part (they cannot
    be imported inside ``deepspeed.zero.Init``; see ``transformers_init``)."""
    # transformers: on first use (see transformers_init)
    from mmdist.models.hf_encoders import preload_backbone
    from mmdist.models.pretrained_lm import preload_causal_lm

    m = cfg.model
    for mod in ("text", "image", "audio"):
        path = getattr(m, f"{mod}_pretrained")
        if path and not torchvision_file(path):
            preload_backbone(path)
    if m.decoder_pretrained:
        preload_causal_lm(m.decoder_pretrained)


def _fuser(cfg: Config, spec: SizeSpec, n_modalities: int) -> Fuser:
    m = cfg.model
    late = None
    if m.fusion_stage == "late":
        # normalised: the fusion methods expect unit-scale tokens (a product or an attention
        # over raw MLP outputs diverged at lr 5e-3 on real digits, docs/fusion_real.md)
        late = nn.ModuleList(nn.Sequential(MLPHead(spec.hidden, spec.hidden),
                                           nn.LayerNorm(spec.hidden))
                             for _ in range(n_modalities))
    fusion = build_fusion(m.fusion, spec.hidden, n_modalities, spec.heads, SLOTS[m.fusion_stage],
                          spec.fusion_layers)
    trunk_layers = spec.trunk_layers + (spec.enc_layers if m.fusion_stage == "early" else 0)
    trunk = TransformerStack(spec.hidden, spec.heads, trunk_layers, m.activation_checkpointing)
    return Fuser(fusion, trunk, late)


def _text(kind: str, vocab: dict[str, Any], spec: SizeSpec, max_len: int,
          pretrained: str | None, bert_config: dict | None) -> nn.Module:
    if kind == "bert" and bert_config and not pretrained:
        config = hf("BertConfig").from_dict(bert_config)
        bert = build_transformers_model(hf("BertModel"), config, add_pooling_layer=False)
        return BertTextEncoder(bert, spec.hidden)
    return build_text_encoder(kind, vocab["vocab_size"], spec.hidden, spec.enc_layers,
                              spec.heads, max_len, vocab["pad_id"], pretrained)


def count_parameters(model: nn.Module, trainable_only: bool = False) -> int:
    """Number of (unique) parameters of a built model."""
    return sum(p.numel() for p in model.parameters() if p.requires_grad or not trainable_only)
