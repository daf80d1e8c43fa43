"""What the training loop watches besides the loss: seconds to the first optimizer step by
phase (:class:`Startup`) and optimizer steps skipped for non-finite gradients
(:class:`NonFiniteSteps`). Neither reads anything back from the device.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any

from mmdist.train.checkpoint import TrainState
from mmdist.train.job import Job


def phase_clock(started_at: float | None = None) -> tuple[dict[str, float], Any]:
    """``(phases, mark)``: ``mark(name)`` records the seconds since the previous mark under
    ``name``; ``phases["_start"]`` is the wall-clock start: ``started_at`` (then the seconds
    from it to now are the ``command`` phase), else now."""
    now = time.time()
    start = min(started_at or now, now)
    phases: dict[str, float] = {"_start": start}
    if start < now:
        phases["command"] = round(now - start, 2)
    last = [now]

    def mark(name: str) -> None:
        now = time.time()
        phases[name] = round(now - last[0], 2)
        last[0] = now

    return phases, mark


class Startup:
    """Seconds from ``mmdist train`` to this attempt's first optimizer step, by phase: the
    driver's own (``Job.driver_phases``), then Ray Train starting the workers up to the train
    function, the worker's imports (its train shard already streaming:
    ``mmdist.train.entry``), its process group, the engine, the checkpoint restore and the
    first step (the first batch, one forward, backward and optimizer step)."""

    def __init__(self, job: Job, marks: dict[str, float], engine_ready: float,
                 restored: float):
        """``marks``: when the train function started (``entered``), had imported the loop
        (``imported``) and had connected its process group (``connected``)."""
        self.started_at = job.started_at
        self.phases: dict[str, float] = dict(job.driver_phases)
        entered, imported, connected = marks["entered"], marks["imported"], marks["connected"]
        spans = [("ray_train_start", job.fit_at, entered),
                 ("worker_imports", entered, imported),
                 ("process_group", imported, connected),
                 ("engine", connected, engine_ready),
                 ("restore", engine_ready, restored)]
        for name, a, b in spans:
            if a is not None:
                self.phases[name] = round(max(0.0, b - a), 2)
        self.restored = restored
        self.total: float | None = None

    def first_step(self, say: Callable[[str], None]) -> None:
        if self.total is not None:
            return
        now = time.time()
        self.phases["first_step"] = round(now - self.restored, 2)
        self.total = round(now - self.started_at, 2) if self.started_at else None
        if self.total is not None:
            say(f"first optimizer step {self.total:.1f} s after start ("
                + ", ".join(f"{k} {v:.1f}" for k, v in self.phases.items()) + ")")



class NonFiniteSteps:
    """Counts optimizer steps skipped for non-finite gradients in ``state.bad_steps_total`` and
    stops training after ``max_bad`` such steps in a row.

    The skip itself is DeepSpeed's: its ZeRO, fp16 and bf16 optimizers (and
    :class:`mmdist.train.optim.FiniteAdamW` at ZeRO-0 in fp32/bf16) leave the weights, the optimizer
    state and the LR schedule untouched when the global gradient norm is not finite, and count
    the step in ``engine.skipped_steps``; every rank sees the same reduced norm, so all agree.
    The step still counts as a global step. Reading that host-side counter costs no device sync.
    """

    def __init__(self, max_bad: int, say: Callable[[str], None], skipped: int = 0):
        self.max_bad, self.say, self.in_a_row, self.skipped = max_bad, say, 0, skipped

    def after_step(self, skipped: int, state: TrainState) -> None:
        """``skipped``: the engine's ``skipped_steps`` after the step that made ``state``."""
        if skipped == self.skipped:
            self.in_a_row = 0
            return
        self.skipped = skipped
        self.in_a_row += 1
        state.bad_steps_total += 1
        self.say(f"step {state.global_step}: non-finite loss or gradients, update skipped "
                 f"({self.in_a_row} in a row)")
        if self.in_a_row >= self.max_bad:
            raise FloatingPointError(
                f"{self.in_a_row} consecutive non-finite losses at step {state.global_step} "
                f"(train.max_bad_steps={self.max_bad}); lower train.lr or check the data. "
                "The last good checkpoint is kept.")
