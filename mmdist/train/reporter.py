"""The one way a training worker's metrics and messages leave it.

Rank 0 prints progress lines and sends metrics to the run's MLflow run (buffered by
:class:`~mmdist.tracking.MetricsLogger`, so a tracking outage loses nothing); every rank reports
metrics, and its part of a checkpoint, to Ray Train.
"""

from __future__ import annotations

import sys
from typing import Any

import ray.train

from mmdist.tracking import MetricsLogger
from mmdist.train.checkpoint import TrainState


class Reporter:
    """Console, MLflow and Ray Train reports of one worker.

    Args:
        rank: this worker's rank; only rank 0 prints and talks to MLflow.
        tracking_uri: the MLflow tracking URI of the run.
        run_id: the MLflow run to log to; None logs nothing to MLflow.
    """

    def __init__(self, rank: int, tracking_uri: str | None, run_id: str | None):
        self.rank = rank
        self._mlflow = (MetricsLogger(tracking_uri, run_id, fail_fast=True)
                        if rank == 0 and run_id else None)

    def say(self, msg: str) -> None:
        """Print one progress line (rank 0): on the user's screen."""
        self._print(f"[mmdist] {msg}")

    def note(self, msg: str) -> None:
        """A detail for the run's log (rank 0): on the screen only with --verbose."""
        self._print(f"mmdist: {msg}")

    def _print(self, line: str) -> None:
        if self.rank == 0:
            # the process's real stdout: Ray Train patches print() to log *and*, once anything
            # has wrapped sys.stdout, print as well, so every line would reach the driver twice
            print(line, file=sys.__stdout__ or sys.stdout, flush=True)

    def log(self, metrics: dict[str, float], step: int) -> None:
        """Send ``metrics`` of ``step`` to MLflow (rank 0; buffered, flushed now and then)."""
        if self._mlflow:
            self._mlflow.log(metrics, step)

    def resend(self, rows: list[list[Any]]) -> None:
        """Queue MLflow values an earlier attempt could not deliver (from its checkpoint)."""
        if self._mlflow:
            self._mlflow.add(rows)

    def hand_over(self, state: TrainState) -> None:
        """Flush to MLflow; what it did not take goes into ``state``, to be saved with the
        checkpoint, so metrics up to a checkpoint reach MLflow or the checkpoint."""
        if self._mlflow:
            self._mlflow.flush()
            state.mlflow_pending = [list(r) for r in self._mlflow.pending()]

    def report(self, metrics: dict[str, Any], checkpoint_dir: str | None = None) -> None:
        """Report ``metrics`` to Ray Train (every rank), with this rank's checkpoint folder when
        one was written (Ray copies every rank's folder into one checkpoint)."""
        checkpoint = (ray.train.Checkpoint.from_directory(checkpoint_dir)
                      if checkpoint_dir is not None else None)
        ray.train.report(metrics, checkpoint=checkpoint)

    @property
    def failed_flushes(self) -> int:
        """How often a flush to MLflow failed."""
        return self._mlflow.failed_flushes if self._mlflow else 0

    def pending(self) -> list[tuple[str, float, int, int]]:
        """MLflow values not delivered yet: ``(key, value, timestamp_ms, step)``."""
        return self._mlflow.pending() if self._mlflow else []


def at_step(metrics: dict[str, float], state: TrainState) -> dict[str, Any]:
    """``metrics`` with the step and epoch they belong to, as reported to Ray Train."""
    return {**metrics, "global_step": state.global_step, "epoch": state.epoch}
