"""Contrastive matching (CLIP-style): the text and the fused non-text modalities projected into
one embedding space, a symmetric InfoNCE loss over the batch, recall@K both ways.

The two directions are named ``t2i`` (text -> the other side) and ``i2t`` (back), whatever the
other side holds (image, audio or both), except where a side holds video: then by the sides'
initials, ``t2v`` / ``v2t`` for text and video (:func:`directions`)."""

from __future__ import annotations

import math
from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F
from torch import Tensor

from mmdist.config import Config, ModelConfig
from mmdist.models.accounting import Cost, linear_cost, ln_cost
from mmdist.models.blocks import masked_mean
from mmdist.models.fused import Encoded, FusedModel
from mmdist.models.heads import ContrastiveHead
from mmdist.models.sizes import SizeSpec
from mmdist.tasks.base import BuildContext, Task, TaskOutput

if TYPE_CHECKING:  # torchmetrics takes 5 s to import; a model is built without it
    from mmdist.models.metrics import TaskMetrics
from mmdist.tasks.itm import pair_problems


def directions(m: ModelConfig) -> tuple[str, str]:
    """Names of the two retrieval directions, side a -> side b and back: ``("t2i", "i2t")``
    unless video is on a side; then by initials (a side of several modalities with video is
    ``v``): text vs video ``("t2v", "v2t")``, ``model.match=[video, audio]`` ``("v2a", "a2v")``."""
    a, b = (m.match if m.match else ("text", [x for x in m.modalities if x != "text"]))
    sides = [[x] if isinstance(x, str) else x for x in (a, b)]
    if not any("video" in side for side in sides):
        return ("t2i", "i2t")
    a, b = ("v" if "video" in side else side[0][0] for side in sides)
    return (f"{a}2{b}", f"{b}2{a}")


class Contrastive(Task):
    name = "contrastive"
    group = "context"
    primary_metric = "val_r1_mean"

    def __init__(self, dim: int, match: list[str]):
        super().__init__()
        self.head = ContrastiveHead(dim, dim)
        self.match = match  # [a, b]: modality a against modality b; []: text against the rest

    @classmethod
    def config_problems(cls, m: ModelConfig, role: str) -> list[str]:
        return pair_problems(m, role)

    @classmethod
    def constant_loss(cls, cfg: Config, labels: dict | None) -> float:
        return math.log(cfg.train.micro_batch_size)  # uniform over the in-batch candidates

    @classmethod
    def build(cls, ctx: BuildContext) -> Contrastive:
        return cls(ctx.dim, list(ctx.cfg.model.match))

    @classmethod
    def groups(cls, m: ModelConfig) -> set[str]:
        return set() if m.match else {cls.group}

    @classmethod
    def head_cost(cls, cfg: Config, spec: SizeSpec, vocab_size: int, memory_tokens: int) -> Cost:
        d = spec.hidden
        return ln_cost(d) + linear_cost(d, d) + ln_cost(d) + linear_cost(d, d) + Cost(1)

    @classmethod
    def metrics(cls, m: ModelConfig, vocab: dict) -> TaskMetrics:
        from mmdist.models import (
            metrics,  # torchmetrics (5 s): at evaluation only
        )
        return metrics.Retrieval(directions(m))

    def embed(self, model: FusedModel, enc: Encoded) -> tuple[Tensor, Tensor, Tensor]:
        if self.match:
            a, b = self.match
            return self.head(masked_mean(*enc[a]), masked_mean(*enc[b]))
        _, _, other = model.fuse("context", enc)
        return self.head(masked_mean(*enc["text"]), other)

    def loss(self, model: FusedModel, enc: Encoded, batch: dict[str, Tensor],
             evaluating: bool) -> TaskOutput:
        t, o, scale = self.embed(model, enc)
        logits = scale * t @ o.t()
        labels = torch.arange(t.shape[0], device=t.device)
        per_sample = (F.cross_entropy(logits, labels, reduction="none")
                      + F.cross_entropy(logits.t(), labels, reduction="none")) / 2
        return TaskOutput(per_sample.mean(), per_sample, {"text_emb": t, "other_emb": o})

    def predict(self, model: FusedModel, enc: Encoded, batch: dict[str, Tensor],
                max_new_tokens: int, num_beams: int) -> dict[str, Tensor]:
        t, o, _ = self.embed(model, enc)
        return {"text_emb": t, "other_emb": o}
