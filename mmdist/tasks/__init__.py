"""Tasks, one file each, listed in ``mmdist.registry.TASKS``; ``task_class(name)`` loads one.

A task owns the modality group it reads, its head, loss, per-sample eval outputs, prediction,
primary metric and direction, its torchmetrics and the config rules that protect it
(:class:`mmdist.tasks.base.Task`). Adding a task is one new file plus one registry entry.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from torch import Tensor

from mmdist.config import Config, task_class

if TYPE_CHECKING:  # torchmetrics takes 5 s to import; a model is built without it
    from mmdist.models.metrics import EvalMetrics


def build_metrics(cfg: Config, vocab: dict[str, Any], tokenizer: Any = None) -> EvalMetrics:
    """Fresh validation metrics for the tasks of ``cfg`` and the tokenizer ids in ``vocab``;
    with the run's ``tokenizer``, BLEU scores the words of the decoded text (the tokenizer's
    own), else token ids."""
    from mmdist.models.metrics import EvalMetrics  # torchmetrics: only evaluation pays it

    m = cfg.model
    tasks = task_class(m.task).components(m)
    metrics = {name: task_class(name).metrics(m, vocab) for name in tasks}
    if tokenizer is not None:
        for metric in metrics.values():
            if getattr(metric, "bleu", None) is not None:
                metric.bleu.words = tokenizer.words
    return EvalMetrics(metrics, prefixed=len(tasks) > 1 or m.task == "multitask")


def compute_metrics(cfg: Config, outputs: dict[str, Tensor], vocab: dict[str, Any],
                    tokenizer: Any = None) -> dict[str, float]:
    """Metrics of per-sample eval outputs already gathered in this process."""
    metrics = build_metrics(cfg, vocab, tokenizer)
    metrics.update(outputs)
    return metrics.compute()


__all__ = ["build_metrics", "compute_metrics", "task_class"]
