"""Several tasks on one fused model: the weighted sum of their losses (``model.task_weights``,
default lm + classify). Each task keeps its own head and metrics, named ``val_<task>_<metric>``;
the model is judged by the weighted validation loss."""

from __future__ import annotations

from mmdist import registry
from mmdist.config import ModelConfig, task_class
from mmdist.tasks.base import Task

DEFAULT_WEIGHTS = {"lm": 1.0, "classify": 1.0}


class Multitask(Task):
    name = "multitask"
    primary_metric = "val_loss"
    mode = "min"

    @classmethod
    def components(cls, m: ModelConfig) -> dict[str, float]:
        return {k: float(w) for k, w in (m.task_weights or DEFAULT_WEIGHTS).items() if w > 0}

    @classmethod
    def config_problems(cls, m: ModelConfig, role: str) -> list[str]:
        w = m.task_weights
        choices = [t for t in registry.TASKS if t not in (cls.name, "vqa")]
        problems = []
        for k, v in w.items():
            if k == "vqa":
                problems.append("model.task_weights.vqa: multitask combines itm, contrastive, "
                                "classify and lm (vqa answer generation is lm on "
                                "question+answer data)")
            elif k not in choices:
                problems.append(f"model.task_weights.{k}: unknown task; choose from {choices}")
            elif v < 0:
                problems.append(f"model.task_weights.{k}={v}: must be >= 0")
        if problems:
            return problems
        if w and not any(v > 0 for v in w.values()):
            return [f"model.task_weights={w}: multitask needs a task with weight > 0"]
        for name in cls.components(m):
            problems += task_class(name).config_problems(m, f"multitask {name!r}")
        return problems
