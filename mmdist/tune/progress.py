"""A sweep's screen: one line per finished trial (and a bar of trials on a terminal) instead
of Tune's status tables; those and every trial's own output go to the sweep's log file."""

from __future__ import annotations

from typing import Any

from ray.tune import Callback

from mmdist.console import PREFIX, Console
from mmdist.tune.report import format_overrides


class TrialLines(Callback):
    """Tune callback (on the driver): ``trial 3/8 model.fusion=add ...: val_accuracy 0.81``."""

    def __init__(self, console: Console, total: int, metric: str):
        self.console: Console | None = console
        self.total, self.metric, self.done = total, metric, 0

    def __getstate__(self) -> dict[str, Any]:
        """What Tune pickles into its experiment state: not the console (a lock, open files)."""
        return {k: v for k, v in self.__dict__.items() if k != "console"}

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__dict__.update(state, console=None)

    def _line(self, trial: Any, outcome: str) -> None:
        self.done += 1
        overrides = {k: v for k, v in (trial.config or {}).items() if not k.startswith("_")}
        line = f"{PREFIX}trial {self.done}/{self.total} {format_overrides(overrides)}: {outcome}"
        if self.console is None:  # restored from Tune's saved state
            print(line, flush=True)
            return
        self.console.count("trials", self.done, self.total)
        self.console.say(line)

    def on_trial_complete(self, iteration: int, trials: list, trial: Any, **info) -> None:
        value = (trial.last_result or {}).get(self.metric)
        steps = (trial.last_result or {}).get("global_step")
        self._line(trial, f"{self.metric} {value:.4f}" + (f" after {steps} steps" if steps
                                                          else "")
                   if isinstance(value, (int, float)) else f"no {self.metric} reported")

    def on_trial_error(self, iteration: int, trials: list, trial: Any, **info) -> None:
        self._line(trial, "failed (see the sweep's log and report)")
