"""Classification of the fused vector of all modalities into ``model.num_classes`` labels
(the row's ``label``; rows without one, label -1, are left out of loss and accuracy)."""

from __future__ import annotations

import math
from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from mmdist.config import Config, ModelConfig
from mmdist.models.accounting import Cost, mlp_head_cost
from mmdist.models.fused import Encoded, FusedModel
from mmdist.models.heads import MLPHead
from mmdist.models.sizes import SizeSpec
from mmdist.tasks.base import BuildContext, Task, TaskOutput

if TYPE_CHECKING:  # torchmetrics takes 5 s to import; a model is built without it
    from mmdist.models.metrics import TaskMetrics


def known_classes(m: ModelConfig) -> int:
    """``model.num_classes`` once the data has decided it (training, sweeps and evaluation set
    it from the shards' labels when it is 0); a model cannot be built before."""
    if m.num_classes == 0:
        raise ValueError("model.num_classes=0 (from the data) but this model is built without "
                         "shards to read the labels from: set model.num_classes")
    return m.num_classes


def head_outputs(num_classes: int) -> int:
    """Width of a classification head: one sigmoid logit for two classes."""
    return 1 if num_classes == 2 else num_classes


def class_logits(raw: Tensor) -> Tensor:
    """Head output -> class logits; a binary head's single sigmoid logit z becomes [0, z]."""
    if raw.shape[-1] == 1:
        return torch.cat([torch.zeros_like(raw), raw], -1)
    return raw


def classify(head: nn.Module, pooled: Tensor, batch: dict[str, Tensor]) -> TaskOutput:
    """Cross-entropy of ``head(pooled)`` against ``batch["label"]`` (label -1: no label)."""
    logits = class_logits(head(pooled).float())
    label = batch["label"].to(logits.device)
    valid = label >= 0
    per_sample = F.cross_entropy(logits, label.clamp_min(0), reduction="none") * valid
    loss = per_sample.sum() / valid.sum().clamp_min(1)
    return TaskOutput(loss, per_sample, {"logits": logits, "label": label})


def label_entropy(labels: dict | None) -> float | None:
    """Entropy of the label distribution (``{"counts": {label: rows}}``): the cross-entropy of
    always predicting the label frequencies."""
    counts = [c for c in ((labels or {}).get("counts") or {}).values() if c > 0]
    if not counts:
        return None
    total = sum(counts)
    return -sum(c / total * math.log(c / total) for c in counts)


class Classify(Task):
    name = "classify"

    def __init__(self, dim: int, num_classes: int):
        super().__init__()
        self.head = MLPHead(dim, head_outputs(num_classes))

    @classmethod
    def config_problems(cls, m: ModelConfig, role: str) -> list[str]:
        if m.num_classes == 1:
            return [f"model.num_classes=1: must be >= 2 for {role} (or 0: from the data)"]
        return []

    @classmethod
    def reads_labels(cls, m: ModelConfig) -> bool:
        return True

    @classmethod
    def constant_loss(cls, cfg: Config, labels: dict | None) -> float | None:
        return label_entropy(labels)

    @classmethod
    def build(cls, ctx: BuildContext) -> Classify:
        return cls(ctx.dim, known_classes(ctx.cfg.model))

    @classmethod
    def head_cost(cls, cfg: Config, spec: SizeSpec, vocab_size: int, memory_tokens: int) -> Cost:
        return mlp_head_cost(spec.hidden, head_outputs(cfg.model.num_classes))

    @classmethod
    def metrics(cls, m: ModelConfig, vocab: dict) -> TaskMetrics:
        from mmdist.models import (
            metrics,  # torchmetrics (5 s): at evaluation only
        )
        return metrics.ClassAccuracy(m.num_classes)

    def loss(self, model: FusedModel, enc: Encoded, batch: dict[str, Tensor],
             evaluating: bool) -> TaskOutput:
        return classify(self.head, model.fuse("all", enc)[2], batch)

    def predict(self, model: FusedModel, enc: Encoded, batch: dict[str, Tensor],
                max_new_tokens: int, num_beams: int) -> dict[str, Tensor]:
        _, _, pooled = model.fuse("all", enc)
        return {"probs": class_logits(self.head(pooled).float()).softmax(-1)}
