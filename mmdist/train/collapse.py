"""Warn when a task's training loss sits at what a constant prediction scores.

A model that outputs the same answer for every input still lowers its loss to a known value:
ln 2 for matching (positives and negatives come in equal numbers), the entropy of the label
distribution for classification, ln(batch) for contrastive learning. A whole epoch at that
value means the model has learned nothing about its inputs, however long training goes on;
the warning says so at the end of the epoch, with what to check.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch

from mmdist.config import Config, task_class

TOLERANCE = 0.01  # relative distance from the constant value that counts as "at" it
HINTS = ("what to check: train.lr and train.warmup_steps, model.modality_dropout (a relation "
         "needs both of its modalities), per-modality labels (label_image / label_audio: they "
         "train the encoders when the task's label is a relation)")


def constant_losses(cfg: Config, labels: dict[str, Any] | None) -> dict[str, float]:
    """Task name -> the loss a constant prediction reaches, for the tasks where it is known."""
    m = cfg.model
    out = {}
    for name in task_class(m.task).components(m):
        value = task_class(name).constant_loss(cfg, labels)
        if value is not None:
            out[name] = value
    return out


class ConstantWatch:
    """Per-task training loss summed on the device over an epoch (no host sync per step),
    compared once per epoch with :func:`constant_losses`.

    Args:
        constants: task name -> constant-prediction loss.
        say: where the warning goes (rank 0's console).
        reduce: mean across ranks (a collective every rank calls at the epoch's end).
    """

    def __init__(self, constants: dict[str, float], say: Callable[[str], None],
                 reduce: Callable[[float], float] = float):
        self.constants, self.say, self.reduce = constants, say, reduce
        self.sums: dict[str, torch.Tensor] = {}
        self.counts: dict[str, torch.Tensor] = {}

    def add(self, out: dict[str, torch.Tensor]) -> None:
        """One micro-batch's task losses; a non-finite one (a skipped step) is left out."""
        for name in self.constants:
            loss = out[f"{name}_loss"].detach().float()
            finite = torch.isfinite(loss)
            loss, one = torch.where(finite, loss, 0.0), finite.float()
            if name in self.sums:
                self.sums[name], self.counts[name] = self.sums[name] + loss, self.counts[name] + one
            else:
                self.sums[name], self.counts[name] = loss, one

    def end_epoch(self, epoch: int) -> list[str]:
        """Warn for every task whose mean loss this epoch sat at its constant value."""
        warned = []
        for name, value in self.constants.items():  # every rank reduces every task
            n = float(self.counts[name]) if name in self.counts else 0.0
            local = float(self.sums[name]) / n if n else float("nan")
            mean = self.reduce(local)
            if abs(mean - value) <= TOLERANCE * max(value, 1e-3):
                warned.append(name)
                self.say(f"warning: the {name} loss averaged {mean:.4f} over epoch {epoch}, "
                         f"what a constant prediction scores ({value:.4f}): the model gives "
                         f"the same answer for every input so far; {HINTS}")
        self.sums, self.counts = {}, {}
        return warned
