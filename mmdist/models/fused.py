"""The fused multimodal model: encoders -> fusion (early/mid/late) -> tasks.

Build it with ``mmdist.models.builder.build_model``. Each task (``mmdist.tasks``) owns its head, loss, eval outputs and prediction; this module only
encodes the modalities and fuses them for the group a task reads. ZeRO-3 safety: every encoder
runs on every step whatever the batch holds. A missing modality (``has_<m>=False``) is replaced
per sample by a learned "missing" embedding with ``torch.where``; no Python branch depends on
batch content, and no parameter is used outside ``forward``.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from mmdist.models.blocks import masked_cross_entropy, masked_mean
from mmdist.models.decoder import generate

# Per modality: tokens (B, T, D) and mask (B, T), missing samples replaced.
Encoded = dict[str, tuple[Tensor, Tensor]]


def pool_tokens(tokens: Tensor, mask: Tensor, n: int) -> tuple[Tensor, Tensor]:
    """At most ``n`` tokens: masked averages over ``n`` consecutive windows (a grid's patches
    in row order, an audio clip's frames in time order); ``n`` or fewer pass unchanged."""
    if tokens.shape[1] <= n:
        return tokens, mask
    w = mask.to(tokens.dtype).unsqueeze(-1)
    total = F.adaptive_avg_pool1d((tokens * w).transpose(1, 2), n).transpose(1, 2)
    weight = F.adaptive_avg_pool1d(w.transpose(1, 2), n).transpose(1, 2)
    return total / weight.clamp_min(1e-6), weight[..., 0] > 0


class Fuser(nn.Module):
    """One fusion path: (late: per-modality heads) -> fusion method -> trunk -> pooled vector.

    Args:
        fusion: a fusion method (``mmdist.models.fusion``).
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
    """Modality encoders, one fusion path per modality group, and the tasks.

    Args:
        encoders: per modality (``text``/``image``/``audio``), a module returning tokens + mask.
        fusers: ``"all"`` (every modality) and/or ``"context"`` (non-text ones) fusion paths.
        tasks: task name -> task module (``mmdist.tasks``), in training order.
        weights: task name -> loss weight.
        aux: per modality, a linear head classifying that modality's pooled tokens alone
            (its ``label_<modality>``); trained with weight ``aux_weight`` beside the tasks.
        aux_weight: weight of the auxiliary losses.
        modalities: modalities in config order (text first when present).
        dim: shared width D.
        modality_dropout: per-sample probability of dropping each non-text modality in training.
        max_text_len: L, for generation length.
        vocab: ``vocab_size``, ``pad_id``, ``bos_id``, ``eos_id``, ``special_ids``.
        config: the full mmdist config dict (saved with the weights).
        extra: other facts needed to rebuild the model (e.g. a pretrained BERT's config).
        context_memory: a task reads the non-text group and there is none (text-only lm).
        modality_tokens: modality -> most tokens its encoder hands on (average-pooled), so a
            256-patch image does not flood a short caption.
    """

    def __init__(self, *, encoders: nn.ModuleDict, fusers: nn.ModuleDict, tasks: nn.ModuleDict,
                 weights: dict[str, float], aux: nn.ModuleDict, aux_weight: float,
                 modalities: list[str], dim: int,
                 modality_dropout: float, max_text_len: int, vocab: dict[str, Any],
                 config: dict[str, Any], extra: dict[str, Any] | None = None,
                 context_memory: bool = False, modality_tokens: dict[str, int] | None = None):
        super().__init__()
        self.encoders = encoders
        self.fusers = fusers
        self.tasks = tasks
        self.weights = dict(weights)
        self.aux = aux
        self.aux_weight = aux_weight
        self.modalities = list(modalities)
        self.dim = dim
        self.modality_dropout = modality_dropout
        self.max_text_len = max_text_len
        self.vocab = dict(vocab)
        self.config = config
        self.extra = extra if extra is not None else {}  # parts built later add to it
        self.modality_tokens = dict(modality_tokens or {})
        self.missing = nn.ParameterDict(
            {m: nn.Parameter(torch.randn(1, 1, dim) * 0.02) for m in self.modalities})
        if context_memory:
            # text-only lm: the decoder is conditioned on one learned null token
            self.null_memory = nn.Parameter(torch.zeros(1, 1, dim))

    @property
    def dtype(self) -> torch.dtype:
        return next(self.parameters()).dtype

    # ---- encoding and fusion --------------------------------------------------------------
    def encode(self, batch: dict[str, Tensor]) -> Encoded:
        """Per modality: tokens ``(B, T, D)`` and mask, with missing ones replaced."""
        out = {}
        self._batch_size = batch["input_ids"].shape[0]
        present = self._present = self.present(batch)
        for m in self.modalities:
            if m not in self.encoders:
                continue
            enc = self.encoders[m]
            if f"{m}_features" in batch:  # the frozen backbone's output, from the feature cache
                tokens, mask = enc.from_features(batch[f"{m}_features"],
                                                 batch[f"{m}_feature_mask"])
            elif m == "text":
                tokens, mask = enc(batch["input_ids"], batch["attention_mask"])
            else:
                tokens, mask = enc(batch[m])
            if m in self.modality_tokens:
                tokens, mask = pool_tokens(tokens, mask, self.modality_tokens[m])
            missing = self.missing[m].to(tokens.dtype).expand_as(tokens)
            here = present[m].to(tokens.device)
            tokens = torch.where(here[:, None, None], tokens, missing)
            mask = torch.where(here[:, None], mask, torch.ones_like(mask))
            out[m] = (tokens, mask)
        return out

    def present(self, batch: dict[str, Tensor]) -> dict[str, Tensor]:
        """Per modality, which samples have it: ``has_<m>``, less modality dropout in training.
        Dropout never removes a sample's last non-text modality (a matching or correspondence
        target would become unanswerable and teach the model to output a constant)."""
        present = {m: batch[f"has_{m}"].bool() for m in self.modalities}
        others = [m for m in self.modalities if m != "text" and m in self.encoders]
        if not (self.training and self.modality_dropout > 0 and others):
            return present
        keep = {m: torch.rand(present[m].shape, device=present[m].device)
                >= self.modality_dropout for m in others}
        any_left = torch.stack([present[m] & keep[m] for m in others]).any(0)
        had_any = torch.stack([present[m] for m in others]).any(0)
        undo = had_any & ~any_left  # every remaining one would go: keep them all
        return {m: present[m] & (keep[m] | undo) if m in keep else present[m]
                for m in self.modalities}

    def fuse(self, group: str, enc: Encoded, swap: Mapping[str, Tensor] | None = None
             ) -> tuple[Tensor, Tensor, Tensor]:
        """Fused tokens, mask and pooled vector of one modality group (``all`` / ``context``);
        a modality in ``swap`` comes from other samples of the batch: row ``i`` takes sample
        ``swap[m][i]``'s (matching negatives)."""
        mods = self.modalities if group == "all" else [m for m in self.modalities if m != "text"]
        if group == "context" and "context" not in self.fusers:
            b = self._batch_size
            mem = self.null_memory.to(self.dtype).expand(b, 1, -1)
            mask = torch.ones(b, 1, dtype=torch.bool, device=mem.device)
            return mem, mask, mem[:, 0]
        tokens, masks = [], []
        for m in mods:
            t, k = enc[m]
            if swap and m in swap:
                t, k = t[swap[m]], k[swap[m]]
            tokens.append(t)
            masks.append(k)
        return self.fusers[group](tokens, masks)

    def generate_from(self, decoder: nn.Module, memory: Tensor, mask: Tensor,
                      max_new_tokens: int, num_beams: int,
                      prompt: tuple[Tensor, Tensor] | None = None) -> Tensor:
        """Token ids a decoder generates from fused memory (and a prompt), with this model's
        special ids: a pretrained LM through its own ``generate`` (KV cache)."""
        v = self.vocab
        if hasattr(decoder, "generate_ids"):
            return decoder.generate_ids(memory, mask, prompt, max_new_tokens, num_beams,
                                        v["bos_id"], v["eos_id"], v["pad_id"])
        if prompt is not None:
            raise ValueError("a prompt needs a pretrained decoder (model.decoder_pretrained)")
        return generate(decoder, memory, mask, max_new_tokens, v["bos_id"], v["eos_id"],
                        v["pad_id"], num_beams)

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
        for name, task in self.tasks.items():
            r = task.loss(self, enc, batch, evaluating=False)
            out[f"{name}_loss"] = r.loss.detach()
            loss = r.loss.float()
            for part, value in r.extra.items():
                out[f"{name}_{part}_loss"] = value.detach()
                loss = loss + value.float()
            total = total + self.weights[name] * loss
        for m, head in self.aux.items():
            loss = self.aux_loss(m, head, enc, batch)
            out[f"aux_{m}_loss"] = loss.detach()
            total = total + self.aux_weight * loss
        out["loss"] = total
        return out

    def has(self, m: str) -> Tensor:
        """Which samples of the batch last encoded have modality ``m`` (after dropout)."""
        return self._present[m]

    def aux_loss(self, m: str, head: nn.Module, enc: Encoded, batch: dict[str, Tensor]) -> Tensor:
        """Cross-entropy of modality ``m``'s own label from its pooled tokens, over the samples
        that have both (the head runs every step either way, as ZeRO-3 needs)."""
        label = batch.get(f"label_{m}", torch.full_like(batch["label"], -1))
        return masked_cross_entropy(head(masked_mean(*enc[m])).float(), label,
                                    self._present[m])

    def eval_outputs(self, batch: dict[str, Tensor]) -> dict[str, Tensor]:
        """Per-sample outputs (first dim B, deterministic) for the tasks' metrics.

        Keys: ``loss`` (weighted per-sample loss) and ``<task>.<name>`` per task, e.g.
        ``itm.logit_pos``/``itm.logit_neg`` (negatives: the other modalities rolled by one),
        ``classify.logits``/``classify.label``, ``contrastive.text_emb``/``other_emb``,
        ``lm.nll_sum``/``lm.n_tokens``/``lm.generated``/``lm.target``.
        """
        enc = self.encode(batch)
        out: dict[str, Tensor] = {}
        total = None
        for name, task in self.tasks.items():
            r = task.loss(self, enc, batch, evaluating=True)
            weighted = self.weights[name] * r.per_sample
            total = weighted if total is None else total + weighted
            out.update({f"{name}.{k}": v for k, v in r.outputs.items()})
        out["loss"] = total
        return out

    @torch.no_grad()
    def predict(self, batch: dict[str, Tensor], max_new_tokens: int | None = None,
                num_beams: int = 1) -> dict[str, Tensor]:
        """Inference outputs: itm ``score`` (match probability of the given pairs), classify
        ``probs`` / vqa ``answer_probs``, contrastive ``text_emb``/``other_emb``, lm / vqa
        ``tokens`` (generated ids, PAD after EOS)."""
        enc = self.encode(batch)
        out: dict[str, Tensor] = {}
        for task in self.tasks.values():
            out.update(task.predict(self, enc, batch, max_new_tokens or self.max_text_len - 1,
                                    num_beams))
        return out

    @torch.no_grad()
    def generate(self, batch: dict[str, Tensor], max_new_tokens: int | None = None,
                 num_beams: int = 1) -> Tensor:
        """Generated token ids ``(B, max_new_tokens)`` (greedy, or beam search).

        Raises:
            ValueError: no task holds a decoder (task is not lm / vqa generation).
        """
        task = next((t for t in self.tasks.values() if getattr(t, "decoder", None) is not None),
                    None)
        if task is None:
            raise ValueError(f"generate() needs a decoder; this model's tasks are "
                             f"{list(self.tasks)} (use task lm, or vqa with generation)")
        return task.predict(self, self.encode(batch), batch,
                            max_new_tokens or self.max_text_len - 1, num_beams)["tokens"]

