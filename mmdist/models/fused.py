"""The fused multimodal model: encoders -> fusion (early/mid/late) -> task heads / decoder LM.

    model = build_model(cfg, vocab_size=2000)
    out = model(batch)                 # {"loss": scalar float32, ...}
    per_sample = model.eval_outputs(batch)   # concatenable across batches and ranks
    model.predict(batch)               # itm "score", classify "probs", lm "tokens", ...

ZeRO-3 safety: every encoder runs on every step whatever the batch holds. A missing modality
(``has_<m>=False``) is replaced per sample by a learned "missing" embedding with ``torch.where``;
no Python branch depends on batch content, and no parameter is used outside ``forward``.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from mmdist.config import Config
from mmdist.models.activation_checkpointing import enable_activation_checkpointing
from mmdist.models.audio_encoder import build_audio_encoder
from mmdist.models.blocks import TransformerStack, masked_mean
from mmdist.models.decoder import build_decoder, generate, sequence_nll
from mmdist.models.fusion import build_fusion
from mmdist.models.heads import ContrastiveHead, MLPHead
from mmdist.models.image_encoder import build_image_encoder
from mmdist.models.input_embeddings import FrameEmbedding, PatchEmbedding, TextEmbedding
from mmdist.models.sizes import size_spec
from mmdist.models.text_encoder import BertTextEncoder, build_text_encoder
from mmdist.models.transformers_init import build_transformers_model, hf

WEIGHTS_NAME = "model.safetensors"
CONFIG_NAME = "config.json"
FORMAT = "mmdist-fused-model/1"
PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".pkl", ".pickle", ".ckpt")

# Aligned slots the element-wise fusion methods combine, per stage.
SLOTS = {"early": 8, "mid": 4, "late": 1}
# Which modality group each task reads: all modalities, or the non-text context.
TASK_GROUP = {"itm": "all", "classify": "all", "vqa": "all", "contrastive": "context",
              "lm": "context"}
DEFAULT_MULTITASK = {"lm": 1.0, "classify": 1.0}
DECODER_POSITIONS = 1024  # memory prefix + text positions of the decoder LM


def task_list(task: str, task_weights: dict[str, float]) -> dict[str, float]:
    """The tasks a model trains and their loss weights (one task at weight 1 unless multitask)."""
    if task != "multitask":
        return {task: 1.0}
    weights = {k: float(w) for k, w in (task_weights or DEFAULT_MULTITASK).items() if w > 0}
    return weights


def encoded_modalities(modalities: list[str], tasks: dict[str, float]) -> list[str]:
    """Modalities that get an encoder: text only when a task reads it as input (for ``lm``
    alone the text is the decoder's token stream, and an unused encoder would hold parameters
    without gradients)."""
    text_read = any(t != "lm" for t in tasks)
    return [m for m in modalities if m != "text" or text_read]


class Fuser(nn.Module):
    """One fusion path: (late: per-modality heads) -> fusion method -> trunk -> pooled vector.

    Args:
        fusion: a module from ``FUSIONS``.
        trunk: the transformer trunk after fusion (0 layers: a LayerNorm).
        late_heads: per-modality MLPs for ``late`` fusion (None for early/mid).
    """

    def __init__(self, fusion: nn.Module, trunk: nn.Module, late_heads: nn.ModuleList | None):
        super().__init__()
        self.fusion = fusion
        self.trunk = trunk
        self.late_heads = late_heads

    def forward(self, tokens: list[Tensor], masks: list[Tensor]) -> tuple[Tensor, Tensor, Tensor]:
        """M token sequences -> fused tokens ``(B, T, D)``, mask ``(B, T)``, pooled ``(B, D)``."""
        if self.late_heads is not None:
            tokens = [h(masked_mean(t, m)).unsqueeze(1)
                      for h, t, m in zip(self.late_heads, tokens, masks)]
            masks = [torch.ones(t.shape[:2], dtype=torch.bool, device=t.device) for t in tokens]
        x, mask = self.fusion(tokens, masks)
        x = self.trunk(x, mask)
        return x, mask, masked_mean(x, mask)


class FusedModel(nn.Module):
    """Text/image/audio encoders, fusion, and the heads of one task (or several, multitask).

    Build it with :func:`build_model`; the constructor takes the built parts.

    Args:
        encoders: per modality (``text``/``image``/``audio``), a module returning tokens + mask.
        fusers: ``"all"`` (every modality) and/or ``"context"`` (non-text ones) fusion paths.
        heads: task heads by task name (``itm``, ``classify``, ``vqa``, ``contrastive``).
        decoder: the decoder LM for ``lm`` / ``vqa`` generation, or None.
        modalities: modalities in config order (text first when present).
        tasks: task -> loss weight.
        dim: shared width D.
        num_classes: classes of the classify / vqa-classification head.
        modality_dropout: per-sample probability of dropping each non-text modality in training.
        max_text_len: L, for generation length.
        vocab: ``vocab_size``, ``pad_id``, ``bos_id``, ``eos_id``.
        config: the full mmdist config dict (saved with the weights).
        extra: other facts needed to rebuild the model (e.g. a pretrained BERT's config).
    """

    def __init__(self, *, encoders: nn.ModuleDict, fusers: nn.ModuleDict, heads: nn.ModuleDict,
                 decoder: nn.Module | None, modalities: list[str], tasks: dict[str, float],
                 dim: int, num_classes: int, modality_dropout: float, max_text_len: int,
                 vocab: dict[str, int], config: dict[str, Any],
                 extra: dict[str, Any] | None = None):
        super().__init__()
        self.encoders = encoders
        self.fusers = fusers
        self.heads = heads
        self.decoder = decoder
        self.modalities = list(modalities)
        self.tasks = dict(tasks)
        self.dim = dim
        self.num_classes = num_classes
        self.modality_dropout = modality_dropout
        self.max_text_len = max_text_len
        self.vocab = dict(vocab)
        self.config = config
        self.extra = dict(extra or {})
        self.missing = nn.ParameterDict(
            {m: nn.Parameter(torch.randn(1, 1, dim) * 0.02) for m in self.modalities})
        if "context" in self.tasks_groups() and "context" not in fusers:
            # text-only lm: the decoder is conditioned on one learned null token
            self.null_memory = nn.Parameter(torch.zeros(1, 1, dim))

    # ---- structure ----------------------------------------------------------------------
    def tasks_groups(self) -> set[str]:
        """Modality groups the tasks read: ``all`` and/or ``context`` (non-text)."""
        return {TASK_GROUP[t] for t in self.tasks}

    @property
    def dtype(self) -> torch.dtype:
        return next(self.parameters()).dtype

    # ---- encoding -----------------------------------------------------------------------
    def encode(self, batch: dict[str, Tensor]) -> dict[str, tuple[Tensor, Tensor]]:
        """Per modality: tokens ``(B, T, D)`` and mask, with missing ones replaced."""
        out = {}
        self._batch_size = batch["input_ids"].shape[0]
        for m in self.modalities:
            if m not in self.encoders:
                continue
            enc = self.encoders[m]
            if m == "text":
                tokens, mask = enc(batch["input_ids"], batch["attention_mask"])
            else:
                tokens, mask = enc(batch[m])
            present = batch[f"has_{m}"].to(tokens.device).bool()
            if self.training and self.modality_dropout > 0 and m != "text":
                keep = torch.rand(present.shape, device=present.device) >= self.modality_dropout
                present = present & keep
            missing = self.missing[m].to(tokens.dtype).expand_as(tokens)
            tokens = torch.where(present[:, None, None], tokens, missing)
            mask = torch.where(present[:, None], mask, torch.ones_like(mask))
            out[m] = (tokens, mask)
        return out

    def _fuse(self, group: str, enc: dict[str, tuple[Tensor, Tensor]],
              roll_others: bool = False) -> tuple[Tensor, Tensor, Tensor]:
        mods = self.modalities if group == "all" else [m for m in self.modalities if m != "text"]
        if group == "context" and "context" not in self.fusers:
            b = self._batch_size
            mem = self.null_memory.to(self.dtype).expand(b, 1, -1)
            mask = torch.ones(b, 1, dtype=torch.bool, device=mem.device)
            return mem, mask, mem[:, 0]
        tokens, masks = [], []
        for m in mods:
            t, k = enc[m]
            if roll_others and m != "text":
                t, k = t.roll(1, 0), k.roll(1, 0)
            tokens.append(t)
            masks.append(k)
        return self.fusers[group](tokens, masks)

    # ---- tasks: each returns (scalar loss, per-sample loss, eval outputs) ------------------
    def _itm(self, enc):
        _, _, pos = self._fuse("all", enc)
        _, _, neg = self._fuse("all", enc, roll_others=True)
        logits = self.heads["itm"](torch.cat([pos, neg], 0)).squeeze(-1).float()
        b = pos.shape[0]
        target = torch.cat([torch.ones(b), torch.zeros(b)]).to(logits.device)
        per = F.binary_cross_entropy_with_logits(logits, target, reduction="none")
        per_sample = (per[:b] + per[b:]) / 2
        return per_sample.mean(), per_sample, {"logit_pos": logits[:b], "logit_neg": logits[b:]}

    def _contrastive(self, enc):
        text_tokens, text_mask = enc["text"]
        _, _, other = self._fuse("context", enc)
        t, o, scale = self.heads["contrastive"](masked_mean(text_tokens, text_mask), other)
        logits = scale * t @ o.t()
        labels = torch.arange(t.shape[0], device=t.device)
        per_sample = (F.cross_entropy(logits, labels, reduction="none")
                      + F.cross_entropy(logits.t(), labels, reduction="none")) / 2
        return per_sample.mean(), per_sample, {"text_emb": t, "other_emb": o}

    def _classify(self, enc, batch, name: str):
        _, _, pooled = self._fuse("all", enc)
        logits = self.class_logits(self.heads[name](pooled).float())
        label = batch["label"].to(logits.device)
        valid = label >= 0
        per_sample = F.cross_entropy(logits, label.clamp_min(0), reduction="none") * valid
        loss = per_sample.sum() / valid.sum().clamp_min(1)
        return loss, per_sample, {"logits": logits, "label": label}

    def class_logits(self, raw: Tensor) -> Tensor:
        """Head output -> class logits; a binary head's single sigmoid logit z becomes [0, z]."""
        if raw.shape[-1] == 1:
            return torch.cat([torch.zeros_like(raw), raw], -1)
        return raw

    def _lm(self, enc, batch, group: str, with_generation: bool):
        memory, mask, _ = self._fuse(group, enc)
        ids, tmask = batch["target_ids"], batch["target_mask"]
        logits = self.decoder(ids[:, :-1], memory, mask)
        nll, n = sequence_nll(logits, ids, tmask)
        per_sample = nll / n.clamp_min(1)
        loss = nll.sum() / n.sum().clamp_min(1)
        pred = logits.argmax(-1)
        valid = tmask[:, 1:].bool()
        correct = ((pred == ids[:, 1:]) | ~valid).all(1) & valid.any(1)
        outs = {"nll_sum": nll, "n_tokens": n, "exact_match": correct.float(),
                "target": ids}
        if with_generation:
            outs["generated"] = self._generate(memory, mask, self.max_text_len - 1, 1)
        return loss, per_sample, outs

    def _generate(self, memory, mask, max_new_tokens, num_beams):
        v = self.vocab
        return generate(self.decoder, memory, mask, max_new_tokens, v["bos_id"], v["eos_id"],
                        v["pad_id"], num_beams)

    def _run_task(self, task: str, enc, batch, evaluating: bool):
        if task == "itm":
            return self._itm(enc)
        if task == "contrastive":
            return self._contrastive(enc)
        if task == "classify":
            return self._classify(enc, batch, "classify")
        if task == "vqa" and "vqa" in self.heads:
            return self._classify(enc, batch, "vqa")
        group = "all" if task == "vqa" else "context"
        return self._lm(enc, batch, group, with_generation=evaluating and task == "lm")

    # ---- public API -----------------------------------------------------------------------
    def forward(self, batch: dict[str, Tensor], mode: str = "train") -> dict[str, Tensor]:
        """Loss and outputs for one batch (see the batch contract in ``mmdist.data.schema``).

        Args:
            batch: the model batch; float inputs are cast to the parameter dtype here.
            mode: ``"train"`` -> ``{"loss", "<task>_loss"...}``; ``"eval"`` -> per-sample
                outputs (:meth:`eval_outputs`); ``"predict"`` -> :meth:`predict`.
        """
        if mode == "eval":
            return self.eval_outputs(batch)
        if mode == "predict":
            return self.predict(batch)
        if mode != "train":
            raise ValueError(f"mode={mode!r}: choose from ['train', 'eval', 'predict']")
        enc = self.encode(batch)
        out: dict[str, Tensor] = {}
        total = torch.zeros((), dtype=torch.float32, device=batch["input_ids"].device)
        for task, weight in self.tasks.items():
            loss, _, _ = self._run_task(task, enc, batch, evaluating=False)
            out[f"{task}_loss"] = loss.detach()
            total = total + weight * loss.float()
        out["loss"] = total
        return out

    def eval_outputs(self, batch: dict[str, Tensor]) -> dict[str, Tensor]:
        """Per-sample outputs (first dim B, deterministic) for :func:`compute_metrics`.

        Keys: ``loss`` (weighted per-sample loss) and ``<task>.<name>`` per task, e.g.
        ``itm.logit_pos``/``itm.logit_neg`` (negatives: the other modalities rolled by one),
        ``classify.logits``/``classify.label``, ``contrastive.text_emb``/``other_emb``,
        ``lm.nll_sum``/``lm.n_tokens``/``lm.generated``/``lm.target``.
        """
        enc = self.encode(batch)
        out: dict[str, Tensor] = {}
        total = None
        for task, weight in self.tasks.items():
            _, per_sample, outs = self._run_task(task, enc, batch, evaluating=True)
            total = weight * per_sample if total is None else total + weight * per_sample
            out.update({f"{task}.{k}": v for k, v in outs.items()})
        out["loss"] = total
        return out

    @torch.no_grad()
    def predict(self, batch: dict[str, Tensor], max_new_tokens: int | None = None,
                num_beams: int = 1) -> dict[str, Tensor]:
        """Inference outputs: itm ``score`` (match probability of the given pairs), classify /
        vqa-classification ``probs``, contrastive ``text_emb``/``other_emb``, lm / vqa
        ``tokens`` (generated ids, PAD after EOS)."""
        enc = self.encode(batch)
        out: dict[str, Tensor] = {}
        for task in self.tasks:
            if task == "itm":
                _, _, pooled = self._fuse("all", enc)
                out["score"] = torch.sigmoid(self.heads["itm"](pooled).squeeze(-1).float())
            elif task == "contrastive":
                _, _, other = self._fuse("context", enc)
                t, o, _ = self.heads["contrastive"](masked_mean(*enc["text"]), other)
                out["text_emb"], out["other_emb"] = t, o
            elif task == "classify" or (task == "vqa" and "vqa" in self.heads):
                _, _, pooled = self._fuse("all", enc)
                logits = self.class_logits(self.heads[task](pooled).float())
                out["probs" if task == "classify" else "answer_probs"] = logits.softmax(-1)
            else:
                memory, mask, _ = self._fuse("all" if task == "vqa" else "context", enc)
                out["tokens"] = self._generate(memory, mask,
                                               max_new_tokens or self.max_text_len - 1,
                                               num_beams)
        return out

    @torch.no_grad()
    def generate(self, batch: dict[str, Tensor], max_new_tokens: int | None = None,
                 num_beams: int = 1) -> Tensor:
        """Generated token ids ``(B, max_new_tokens)`` (greedy, or beam search).

        Raises:
            ValueError: the model has no decoder (task is not lm / vqa generation).
        """
        if self.decoder is None:
            raise ValueError(f"generate() needs a decoder; this model's tasks are "
                             f"{list(self.tasks)} (use task lm, or vqa with generation)")
        enc = self.encode(batch)
        group = "context" if "lm" in self.tasks else "all"
        memory, mask, _ = self._fuse(group, enc)
        return self._generate(memory, mask, max_new_tokens or self.max_text_len - 1, num_beams)

    # ---- save / load ----------------------------------------------------------------------
    def save_pretrained(self, directory: str | Path, tokenizer_dir: str | Path | None = None) -> None:
        """Write ``model.safetensors`` + ``config.json`` (full mmdist config, vocab and special
        ids) and, when given, a copy of the tokenizer directory as ``tokenizer/``."""
        state = {k: v.detach().cpu() for k, v in self.state_dict().items()}
        self.save_state_dict_pretrained(state, self.config, self.vocab, directory,
                                        extra=self.extra, tokenizer_dir=tokenizer_dir)

    @staticmethod
    def save_state_dict_pretrained(state: dict[str, Tensor], cfg: Config | dict[str, Any],
                                   vocab: dict[str, int], directory: str | Path,
                                   extra: dict[str, Any] | None = None,
                                   tokenizer_dir: str | Path | None = None) -> None:
        """Save a (consolidated) state dict the way :meth:`save_pretrained` does; for weights
        gathered from ZeRO shards without building a model on one process.

        Tensors sharing storage (tied embeddings) are written once; loading re-ties them.
        """
        import shutil

        from safetensors.torch import save_file

        cfg_dict = cfg.to_dict() if isinstance(cfg, Config) else dict(cfg)
        if extra is None:
            extra = _rebuild_extra(Config.from_dict(cfg_dict))
        directory = Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        seen: dict[tuple, str] = {}
        tensors: dict[str, Tensor] = {}
        for name, t in state.items():
            key = (t.untyped_storage().data_ptr(), t.storage_offset(), tuple(t.shape))
            if t.numel() and key in seen:
                continue
            seen[key] = name
            tensors[name] = t.detach().cpu().contiguous().clone()
        save_file(tensors, str(directory / WEIGHTS_NAME), metadata={"format": "pt"})
        meta = {"format": FORMAT, "config": cfg_dict,
                "vocab": {k: int(vocab[k]) for k in ("vocab_size", "pad_id", "bos_id", "eos_id")
                          if k in vocab},
                "extra": extra}
        (directory / CONFIG_NAME).write_text(json.dumps(meta, indent=1))
        if tokenizer_dir is not None:
            shutil.copytree(tokenizer_dir, directory / "tokenizer", dirs_exist_ok=True)

    @classmethod
    def from_pretrained(cls, directory: str | Path, map_location: str = "cpu") -> FusedModel:
        """Load a model saved by :meth:`save_pretrained` (safetensors only, never pickle).

        Raises:
            FileNotFoundError: no ``config.json`` / ``model.safetensors`` in ``directory``.
            ValueError: the weights are a pickle (refused, never unpickled) or do not fit.
        """
        from safetensors import SafetensorError
        from safetensors.torch import load_file

        directory = Path(directory)
        weights = directory / WEIGHTS_NAME
        pickles = sorted(p.name for p in directory.glob("*") if p.suffix in PICKLE_SUFFIXES)
        if not weights.exists():
            if pickles:
                raise ValueError(f"{directory}: holds pickled weights {pickles} and no "
                                 f"{WEIGHTS_NAME}; mmdist never unpickles weights (unpickling "
                                 "runs arbitrary code). Convert them to safetensors first.")
            raise FileNotFoundError(f"{directory}: no {WEIGHTS_NAME}")
        if not (directory / CONFIG_NAME).exists():
            raise FileNotFoundError(f"{directory}: no {CONFIG_NAME}")
        meta = json.loads((directory / CONFIG_NAME).read_text())
        if meta.get("format") != FORMAT:
            raise ValueError(f"{directory / CONFIG_NAME}: not an mmdist model "
                             f"(format {meta.get('format')!r}, expected {FORMAT!r})")
        try:
            state = load_file(str(weights), device=map_location)
        except SafetensorError as e:  # a pickle / torch.save file renamed, or corrupt
            raise ValueError(f"{weights}: not a valid safetensors file ({e}); mmdist never "
                             "unpickles weights (unpickling runs arbitrary code)") from None
        cfg = Config.from_dict(meta["config"])
        model = _build(cfg, **meta["vocab"], extra=meta.get("extra") or {}, load_pretrained=False)
        model.load_weights(state)
        return model

    def load_weights(self, state: dict[str, Tensor]) -> None:
        """Load a state dict saved by :meth:`save_state_dict_pretrained` (tied weights may be
        absent; non-persistent buffers may be present).

        Raises:
            ValueError: keys or shapes do not match this model.
        """
        own = self.state_dict()
        params = dict(self.named_parameters())  # deduplicated: tied copies are left out
        tied = {k for k in own if k not in params and k not in dict(self.named_buffers())}
        non_persistent = {k for k, _ in self.named_buffers() if k not in own}
        state = {k: v for k, v in state.items() if k not in non_persistent}
        missing = sorted(set(own) - set(state) - tied)
        unexpected = sorted(set(state) - set(own))
        if missing or unexpected:
            raise ValueError(f"weights do not fit this model: missing {missing[:10]}, "
                             f"unexpected {unexpected[:10]}")
        result = self.load_state_dict(state, strict=False)
        if set(result.missing_keys) - tied:
            raise ValueError(f"weights do not fit this model: missing {result.missing_keys}")


def count_parameters(model: nn.Module, trainable_only: bool = False) -> int:
    """Number of (unique) parameters of a built model."""
    return sum(p.numel() for p in model.parameters() if p.requires_grad or not trainable_only)


# ---- building ------------------------------------------------------------------------------


def _rebuild_extra(cfg: Config) -> dict[str, Any]:
    """Facts beyond the config needed to rebuild the architecture without the pretrained dirs."""
    m = cfg.model
    if m.text_pretrained and m.text_encoder == "bert" and "text" in m.modalities \
            and m.fusion_stage != "early":
        return {"bert_config": hf("BertConfig").from_pretrained(m.text_pretrained).to_dict()}
    return {}


def build_model(cfg: Config, vocab_size: int, pad_id: int = 0, bos_id: int = 2,
                eos_id: int = 3) -> FusedModel:
    """Build the fused model ``cfg.model`` describes for the data dims in ``cfg.data``.

    Args:
        cfg: the full (validated) config.
        vocab_size: tokenizer size.
        pad_id: padding id.
        bos_id: begin-of-sequence id (generation starts from it).
        eos_id: end-of-sequence id.
    """
    return _build(cfg, vocab_size, pad_id, bos_id, eos_id, extra=None, load_pretrained=True)


def _build(cfg: Config, vocab_size: int, pad_id: int = 0, bos_id: int = 2, eos_id: int = 3,
           extra: dict[str, Any] | None = None, load_pretrained: bool = True) -> FusedModel:
    from mmdist.data.schema import audio_frames

    m, d = cfg.model, cfg.data
    spec = size_spec(m.size, m.hidden_size)
    dim = spec.hidden
    frames = audio_frames(d.sample_rate, d.audio_seconds, d.hop_length)
    mods = [x for x in ("text", "image", "audio") if x in m.modalities]
    extra = dict(extra) if extra is not None else (_rebuild_extra(cfg) if load_pretrained else {})

    tasks = task_list(m.task, m.task_weights)
    encoders = nn.ModuleDict()
    for mod in encoded_modalities(mods, tasks):
        if m.fusion_stage == "early":
            encoders[mod] = {"text": lambda: TextEmbedding(vocab_size, dim, d.max_text_len, pad_id),
                             "image": lambda: PatchEmbedding(d.image_size, dim),
                             "audio": lambda: FrameEmbedding(d.n_mels, frames, dim)}[mod]()
        elif mod == "text":
            encoders[mod] = _build_text(m.text_encoder, vocab_size, spec, d.max_text_len,
                                        pad_id, m.text_pretrained if load_pretrained else None,
                                        extra.get("bert_config"))
        elif mod == "image":
            encoders[mod] = build_image_encoder(m.image_encoder, dim, spec.cnn_channels,
                                                d.image_size,
                                                m.image_pretrained if load_pretrained else None)
        else:
            encoders[mod] = build_audio_encoder(m.audio_encoder, d.n_mels, frames, dim,
                                                spec.heads, spec.enc_layers, spec.cnn_channels)

    vqa_classify = m.task == "vqa" and m.vqa_answer == "classify"
    groups = {"all" if (t == "vqa" or TASK_GROUP[t] == "all") else "context" for t in tasks}
    trunk_layers = spec.trunk_layers + (spec.enc_layers if m.fusion_stage == "early" else 0)
    fusers = nn.ModuleDict()
    for group in sorted(groups):
        group_mods = mods if group == "all" else [x for x in mods if x != "text"]
        if not group_mods:
            continue
        late = None
        if m.fusion_stage == "late":
            late = nn.ModuleList(MLPHead(dim, dim) for _ in group_mods)
        fusion = build_fusion(m.fusion, dim, len(group_mods), spec.heads, SLOTS[m.fusion_stage],
                              spec.fusion_layers)
        trunk = TransformerStack(dim, spec.heads, trunk_layers, m.activation_checkpointing)
        fusers[group] = Fuser(fusion, trunk, late)

    heads = nn.ModuleDict()
    n_out = 1 if m.num_classes == 2 else m.num_classes  # binary: one sigmoid logit
    for t in tasks:
        if t == "itm":
            heads["itm"] = MLPHead(dim, 1)
        elif t == "classify":
            heads["classify"] = MLPHead(dim, n_out)
        elif t == "vqa" and vqa_classify:
            heads["vqa"] = MLPHead(dim, n_out)
        elif t == "contrastive":
            heads["contrastive"] = ContrastiveHead(dim, dim)
    decoder = None
    if "lm" in tasks or (m.task == "vqa" and not vqa_classify):
        decoder = build_decoder(m.decoder, vocab_size, spec.dec_width, spec.dec_layers,
                                spec.dec_heads, spec.dec_ffn, DECODER_POSITIONS + d.max_text_len,
                                dim, m.lm_conditioning, pad_id, bos_id, eos_id)
    model = FusedModel(encoders=encoders, fusers=fusers, heads=heads, decoder=decoder,
                      modalities=mods, tasks=tasks, dim=dim, num_classes=m.num_classes,
                      modality_dropout=m.modality_dropout, max_text_len=d.max_text_len,
                      vocab={"vocab_size": vocab_size, "pad_id": pad_id, "bos_id": bos_id,
                             "eos_id": eos_id},
                      config=cfg.to_dict(), extra=extra)
    if m.activation_checkpointing:  # the trunk blocks checkpoint themselves (TransformerStack)
        enable_activation_checkpointing(model)
    return model


def _build_text(kind: str, vocab_size: int, spec, max_len: int, pad_id: int,
                pretrained: str | None, bert_config: dict | None) -> nn.Module:
    if kind == "bert" and bert_config and not pretrained:
        config = hf("BertConfig").from_dict(bert_config)
        bert = build_transformers_model(hf("BertModel"), config, add_pooling_layer=False)
        return BertTextEncoder(bert, spec.hidden)
    return build_text_encoder(kind, vocab_size, spec.hidden, spec.enc_layers, spec.heads,
                              max_len, pad_id, pretrained)
