"""Image-text matching: does this text belong with these other modalities? A binary head on
the fused vector of all modalities.

Negatives pair each text with another sample's image and audio: the nearest following sample
of the batch whose per-modality labels (``label_image`` / ``label_audio``, when the data has
them) differ, so a negative is never secretly a match (with rolled negatives, one in ten real
digit pairs shows the same digit). Hard negatives (``model.hard_negatives``, when two or more
modalities are swapped): one more negative per modality with only that modality swapped, from a
sample whose label for it differs; the pair is wrong in one attribute only, so the model must
check every modality instead of the easiest one.

Align before fuse (ALBEF, ``model.align_weight``): a contrastive loss between the pooled encoder
outputs of the text and of each swapped modality, so the encoders agree on what a caption
describes before the fusion has to learn it. A matching head alone has no first-order signal
to start from: on real digits it sat at ln 2 for whole runs with some fusion methods.
"""

from __future__ import annotations

import math
from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from mmdist.config import Config, ModelConfig
from mmdist.models.accounting import Cost, linear_cost, ln_cost, mlp_head_cost
from mmdist.models.blocks import masked_mean
from mmdist.models.fused import Encoded, FusedModel
from mmdist.models.heads import ContrastiveHead, MLPHead
from mmdist.models.sizes import SizeSpec
from mmdist.tasks.base import BuildContext, Task, TaskOutput

if TYPE_CHECKING:  # torchmetrics takes 5 s to import; a model is built without it
    from mmdist.models.metrics import TaskMetrics


def pair_problems(m: ModelConfig, role: str) -> list[str]:
    """Rules of a task that matches two sides (itm, contrastive): ``model.match`` (checked by
    the config) or text against the other modalities."""
    if m.match:
        return []
    if "text" not in m.modalities:
        return [f"model.modalities={m.modalities}: {role} needs 'text'"]
    if len(m.modalities) < 2:
        return [f"model.modalities={m.modalities}: {role} matches text against another "
                "modality; add 'image', 'audio' or 'video'"]
    return []


class ITM(Task):
    name = "itm"
    fusion_passes = 2

    def __init__(self, dim: int, side: str, rolled: list[str], hard: bool = True,
                 align_weight: float = 1.0):
        super().__init__()
        self.head = MLPHead(dim, 1)
        self.side = side  # the modality matched against the others (text by default)
        self.rolled = rolled  # negatives: these modalities come from another sample
        self.hard = hard and len(rolled) > 1
        self.align_weight = align_weight
        self.align = nn.ModuleDict({m: ContrastiveHead(dim, dim) for m in rolled}
                                   if align_weight > 0 else {})

    @classmethod
    def config_problems(cls, m: ModelConfig, role: str) -> list[str]:
        return pair_problems(m, role)

    @classmethod
    def constant_loss(cls, cfg: Config, labels: dict | None) -> float:
        return math.log(2)  # as many negatives as positives

    @classmethod
    def build(cls, ctx: BuildContext) -> ITM:
        m = ctx.cfg.model
        return cls(ctx.dim, m.match[0] if m.match else "text", cls.swapped(m),
                   m.hard_negatives, m.align_weight)

    @staticmethod
    def swapped(m: ModelConfig) -> list[str]:
        """The modalities a negative takes from another sample."""
        return m.match[1:] or [x for x in m.modalities if x != "text"]

    @classmethod
    def passes(cls, m: ModelConfig) -> int:
        n = len(cls.swapped(m))
        return 2 + (n if m.hard_negatives and n > 1 else 0)

    @classmethod
    def head_cost(cls, cfg: Config, spec: SizeSpec, vocab_size: int, memory_tokens: int) -> Cost:
        m, d = cfg.model, spec.hidden
        cost = mlp_head_cost(d, 1, cls.passes(m))
        if m.align_weight > 0:
            for _ in cls.swapped(m):
                cost = cost + ln_cost(d) + linear_cost(d, d) + ln_cost(d) + linear_cost(d, d) + Cost(1)
        return cost

    @classmethod
    def metrics(cls, m: ModelConfig, vocab: dict) -> TaskMetrics:
        from mmdist.models import (
            metrics,  # torchmetrics (5 s): at evaluation only
        )
        return metrics.MatchAccuracy(hard=m.hard_negatives and len(cls.swapped(m)) > 1)

    def loss(self, model: FusedModel, enc: Encoded, batch: dict[str, Tensor],
             evaluating: bool) -> TaskOutput:
        _, _, pos = model.fuse("all", enc)
        b = pos.shape[0]
        labels = {m: batch.get(f"label_{m}") for m in self.rolled}
        donor = different_partner([labels[m] for m in self.rolled], b, pos.device)
        fused = [pos, model.fuse("all", enc, swap={m: donor for m in self.rolled})[2]]
        if self.hard:
            fused += [model.fuse("all", enc, swap={m: different_partner([labels[m]], b,
                                                                        pos.device)})[2]
                      for m in self.rolled]
        logits = self.head(torch.cat(fused, 0)).squeeze(-1).float().view(len(fused), b)
        target = torch.zeros_like(logits)
        target[0] = 1
        per = F.binary_cross_entropy_with_logits(logits, target, reduction="none")
        per_sample = (per[0] + per[1:].mean(0)) / 2  # positives and negatives weigh the same
        out = {"logit_pos": logits[0], "logit_neg": logits[1]}
        if self.hard:
            out["logit_hard"] = logits[2:].t()  # (B, one per swapped modality)
        extra = {}
        if self.align and not evaluating:
            extra["align"] = self.align_weight * torch.stack(
                [self.align_loss(model, enc, m) for m in self.rolled]).mean()
        return TaskOutput(per_sample.mean(), per_sample, out, extra)

    def align_loss(self, model: FusedModel, enc: Encoded, m: str) -> Tensor:
        """Symmetric InfoNCE between the pooled ``side`` and ``m`` encoder outputs over the
        samples that have both (others are neither queries nor candidates)."""
        a, b, scale = self.align[m](masked_mean(*enc[self.side]), masked_mean(*enc[m]))
        valid = (model.has(self.side) & model.has(m)).to(a.device)
        logits = (scale * a @ b.t()).masked_fill(~(valid[:, None] & valid[None, :]), -1e4)
        labels = torch.arange(a.shape[0], device=a.device)
        per = (F.cross_entropy(logits, labels, reduction="none")
               + F.cross_entropy(logits.t(), labels, reduction="none")) / 2
        return (per * valid).sum() / valid.sum().clamp_min(1)

    def predict(self, model: FusedModel, enc: Encoded, batch: dict[str, Tensor],
                max_new_tokens: int, num_beams: int) -> dict[str, Tensor]:
        _, _, pooled = model.fuse("all", enc)
        return {"score": torch.sigmoid(self.head(pooled).squeeze(-1).float())}


def different_partner(labels: list[Tensor | None], b: int, device: torch.device) -> Tensor:
    """For each row ``i``, the nearest following row (cyclically) that differs from it in at
    least one of ``labels`` (``-1`` or a missing column: unknown, so any row differs): the
    negatives' donors. Row ``i + 1`` when nothing is known; deterministic, so evaluation is."""
    offsets = torch.arange(1, max(b, 2), device=device)
    idx = (torch.arange(b, device=device)[:, None] + offsets[None, :]) % b  # (B, B-1)
    differs = torch.zeros(idx.shape, dtype=torch.bool, device=device)
    for lab in labels:
        if lab is None:
            return idx[:, 0]
        lab = lab.to(device)
        known = (lab >= 0)[:, None] & (lab[idx] >= 0)
        differs |= ~known | (lab[idx] != lab[:, None])
    first = torch.where(differs.any(1), differs.float().argmax(1), torch.zeros_like(idx[:, 0]))
    return idx.gather(1, first[:, None]).squeeze(1)
