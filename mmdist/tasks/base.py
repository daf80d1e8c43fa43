"""What a task is: the contract every file in ``mmdist.tasks`` implements.

A task reads one modality group of the fused model (``all`` modalities, or the non-text
``context``), owns its head (or decoder), computes its loss and per-sample eval outputs, answers
``predict``, declares its primary metric and direction, builds its torchmetrics, sizes its head
for the FLOPs accounting, and states the config rules that protect it. The fused model calls
it; it never dispatches on task names.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, ClassVar, Literal

from torch import Tensor, nn

from mmdist.config import Config, ModelConfig
from mmdist.models.accounting import Cost
from mmdist.models.builder import BuildContext
from mmdist.models.fused import Encoded, FusedModel
from mmdist.models.sizes import SizeSpec

if TYPE_CHECKING:  # torchmetrics takes 5 s to import; a model is built without it
    from mmdist.models.metrics import TaskMetrics


@dataclass
class TaskOutput:
    """One task on one batch: scalar loss, per-sample loss ``(B,)``, per-sample eval outputs,
    and auxiliary losses the task adds to the training total (already weighted; logged as
    ``<task>_<name>_loss``, left out of ``loss``, which the collapse watch compares with
    :meth:`Task.constant_loss`)."""

    loss: Tensor
    per_sample: Tensor
    outputs: dict[str, Tensor]
    extra: dict[str, Tensor] = field(default_factory=dict)


class Task(nn.Module):
    """Base class of a task; subclasses set the class attributes and implement the methods."""

    name: ClassVar[str]
    group: ClassVar[Literal["all", "context"]] = "all"  # the modalities its fusion path reads
    reads_text: ClassVar[bool] = True  # text is an encoder input (lm: the decoder's stream)
    primary_metric: ClassVar[str] = "val_accuracy"
    mode: ClassVar[Literal["min", "max"]] = "max"  # direction of the primary metric
    fusion_passes: ClassVar[int] = 1  # fused forward passes per sample (itm: 2, negatives)

    # ---- configuration (class level: no model needed) ------------------------------------
    @classmethod
    def groups(cls, m: ModelConfig) -> set[str]:
        """The fusion paths the task reads (``all`` and/or ``context``; none: it pools each
        modality's encoder output itself)."""
        return {cls.group}

    @classmethod
    def passes(cls, m: ModelConfig) -> int:
        """Fused forward passes per sample under this config (for the FLOPs accounting)."""
        return cls.fusion_passes

    @classmethod
    def components(cls, m: ModelConfig) -> dict[str, float]:
        """The tasks a model with ``model.task=<this>`` trains, and their loss weights."""
        return {cls.name: 1.0}

    @classmethod
    def config_problems(cls, m: ModelConfig, role: str) -> list[str]:
        """Broken config rules, each naming its dotted key; ``role`` is ``"task 'x'"`` or
        ``"multitask 'x'"`` for the messages."""
        return []

    @classmethod
    def constant_loss(cls, cfg: Config, labels: dict[str, Any] | None) -> float | None:
        """The training loss a constant prediction reaches (``labels``: the manifest's label
        summary), or None where it is not known; ``mmdist.train.collapse`` warns at it."""
        return None

    @classmethod
    def uses_decoder(cls, m: ModelConfig) -> bool:
        """Whether the task holds a decoder LM (it then answers ``generate``)."""
        return False

    @classmethod
    def reads_labels(cls, m: ModelConfig) -> bool:
        """Whether the task trains a class head on the row's ``label`` (checked before start)."""
        return False

    @classmethod
    def build(cls, ctx: BuildContext) -> Task:
        """The task with its head, for the config and sizes in ``ctx``."""
        raise NotImplementedError

    @classmethod
    def head_cost(cls, cfg: Config, spec: SizeSpec, vocab_size: int, memory_tokens: int) -> Cost:
        """Parameters and forward FLOPs per sample of the head (the fusion path excluded)."""
        raise NotImplementedError

    @classmethod
    def metrics(cls, m: ModelConfig, vocab: dict[str, Any]) -> TaskMetrics:
        """Fresh torchmetrics for the per-sample outputs of :meth:`loss` at eval time."""
        raise NotImplementedError

    # ---- the model side -------------------------------------------------------------------
    def loss(self, model: FusedModel, enc: Encoded, batch: dict[str, Tensor],
             evaluating: bool) -> TaskOutput:
        raise NotImplementedError

    def predict(self, model: FusedModel, enc: Encoded, batch: dict[str, Tensor],
                max_new_tokens: int, num_beams: int) -> dict[str, Tensor]:
        raise NotImplementedError
