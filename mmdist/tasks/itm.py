"""Image-text matching: does this text belong with these other modalities? A binary head on
the fused vector of all modalities; negatives pair each text with the next sample's image and
audio (the batch rolled by one)."""

from __future__ import annotations

import math
from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F
from torch import Tensor

from mmdist.config import Config, ModelConfig
from mmdist.models.accounting import Cost, mlp_head_cost
from mmdist.models.fused import Encoded, FusedModel
from mmdist.models.heads import MLPHead
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
                "modality; add 'image' or 'audio'"]
    return []


class ITM(Task):
    name = "itm"
    fusion_passes = 2

    def __init__(self, dim: int, rolled: list[str]):
        super().__init__()
        self.head = MLPHead(dim, 1)
        self.rolled = rolled  # negatives: these modalities come from the batch's next sample

    @classmethod
    def config_problems(cls, m: ModelConfig, role: str) -> list[str]:
        return pair_problems(m, role)

    @classmethod
    def constant_loss(cls, cfg: Config, labels: dict | None) -> float:
        return math.log(2)  # as many negatives as positives

    @classmethod
    def build(cls, ctx: BuildContext) -> ITM:
        m = ctx.cfg.model
        return cls(ctx.dim, m.match[1:] or [x for x in m.modalities if x != "text"])

    @classmethod
    def head_cost(cls, cfg: Config, spec: SizeSpec, vocab_size: int, memory_tokens: int) -> Cost:
        return mlp_head_cost(spec.hidden, 1, 2)

    @classmethod
    def metrics(cls, m: ModelConfig, vocab: dict) -> TaskMetrics:
        from mmdist.models import (
            metrics,  # torchmetrics (5 s): at evaluation only
        )
        return metrics.MatchAccuracy()

    def loss(self, model: FusedModel, enc: Encoded, batch: dict[str, Tensor],
             evaluating: bool) -> TaskOutput:
        _, _, pos = model.fuse("all", enc)
        _, _, neg = model.fuse("all", enc, roll=self.rolled)
        logits = self.head(torch.cat([pos, neg], 0)).squeeze(-1).float()
        b = pos.shape[0]
        target = torch.cat([torch.ones(b), torch.zeros(b)]).to(logits.device)
        per = F.binary_cross_entropy_with_logits(logits, target, reduction="none")
        per_sample = (per[:b] + per[b:]) / 2
        return TaskOutput(per_sample.mean(), per_sample,
                          {"logit_pos": logits[:b], "logit_neg": logits[b:]})

    def predict(self, model: FusedModel, enc: Encoded, batch: dict[str, Tensor],
                max_new_tokens: int, num_beams: int) -> dict[str, Tensor]:
        _, _, pooled = model.fuse("all", enc)
        return {"score": torch.sigmoid(self.head(pooled).squeeze(-1).float())}
