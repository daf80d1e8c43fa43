"""When a failed training run is started again: mmdist's retry rule around ``trainer.fit()``.

Ray Train would restart the worker group after any failure until ``max_failures`` is spent, so a
bug that fails at step 0 would fail three times, tripling the wait and the log. mmdist turns Ray's
worker-group retries off and decides itself, knowing what Ray does not: whether the run has made
progress (a complete checkpoint) and whether the error repeats.

- A crash (a worker process or node died: ``ray.exceptions``' actor errors, health checks) is
  retried from the newest complete checkpoint, up to ``train.max_failures`` times.
- An exception raised by the training code is not retried before the run's first checkpoint
  (there is no progress to save, and a deterministic error would only repeat), nor when it
  repeats the previous attempt's error from the same checkpoint. Otherwise it is retried like a
  crash, within the same budget.

Node preemptions stay with Ray's own budget (``FailureConfig.max_preemption_failures``).
"""

from __future__ import annotations

import json
import re
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from mmdist.train.checkpoint import STATE_FILE, choose_checkpoint


@dataclass(frozen=True)
class Failure:
    """One failed attempt: ``crash`` or ``error``, the first error's text, the checkpoint
    step the run could resume from afterwards (None: no checkpoint yet)."""

    kind: str
    signature: str
    checkpoint_step: int | None


def is_crash(error: BaseException) -> bool:
    """A dead worker, actor or node (Ray's own exception types), not an exception raised by
    the training code. Ray Train wraps a dead worker in its health-check errors."""
    inner = getattr(error, "health_check_failure", None)
    if inner is not None:
        error = inner
    return type(error).__module__.split(".")[0] == "ray"


def signature(error: BaseException) -> str:
    """``Type: message`` with memory addresses removed, to compare two attempts' errors."""
    text = re.sub(r"0x[0-9a-fA-F]+", "0x?", str(error)).strip()
    return f"{type(error).__name__}: {text}"


def classify(worker_failures: dict[int, BaseException], checkpoint_step: int | None) -> Failure:
    """A crash when any rank crashed (the others then fail in collectives); else an error,
    described by the lowest failing rank's exception."""
    if not worker_failures:
        return Failure("crash", "no worker error recorded", checkpoint_step)
    ranks = sorted(worker_failures)
    crashed = [r for r in ranks if is_crash(worker_failures[r])]
    first = worker_failures[crashed[0] if crashed else ranks[0]]
    return Failure("crash" if crashed else "error", signature(first), checkpoint_step)


def decide(failure: Failure, previous: Failure | None, failures_so_far: int,
           max_failures: int) -> str | None:
    """None to retry, or the reason not to. ``failures_so_far`` counts this one."""
    if failure.kind == "error":
        if failure.checkpoint_step is None:
            return ("it was raised before the run's first checkpoint: there is no progress to "
                    "resume and a deterministic error would only repeat")
        if previous is not None and previous.kind == "error" and (
                previous.signature, previous.checkpoint_step) == (failure.signature,
                                                                  failure.checkpoint_step):
            return (f"the same error ended the previous attempt too, from the same checkpoint "
                    f"(step {failure.checkpoint_step})")
    if failures_so_far > max_failures:
        return f"train.max_failures={max_failures} retries are spent"
    return None


def newest_checkpoint_step(run_dir: str | Path) -> int | None:
    """Global step of the newest complete checkpoint in ``run_dir``, None when there is none."""
    chosen, _ = choose_checkpoint(run_dir)
    if chosen is None:
        return None
    return int(json.loads((chosen / STATE_FILE).read_text())["global_step"])


def fit_with_retries(make_trainer: Callable[[], Any], run_dir: str | Path, max_failures: int,
                     say: Callable[[str], None] = print) -> Any:
    """``make_trainer().fit()``, started again (same run name: it resumes the newest complete
    checkpoint) while :func:`decide` allows. Re-raises the last failure otherwise.

    ``make_trainer`` must build a trainer with Ray's worker-group retries off
    (``FailureConfig(max_failures=0)``).
    """
    from ray.train import WorkerGroupError  # heavy: not loaded for --help

    previous: Failure | None = None
    failures = 0
    while True:
        try:
            return make_trainer().fit()
        except WorkerGroupError as e:
            failures += 1
            failure = classify(e.worker_failures, newest_checkpoint_step(run_dir))
            reason = decide(failure, previous, failures, max_failures)
            what = "crashed" if failure.kind == "crash" else "failed"
            head = f"[mmdist] training {what} ({failure.signature.splitlines()[0][:300]})"
            if reason is not None:
                say(f"{head}; not retried: {reason}")
                raise
            step = failure.checkpoint_step
            say(f"{head}; retry {failures}/{max_failures} from "
                + (f"the checkpoint at step {step}" if step is not None
                   else "step 0 (no checkpoint yet)"))
            previous = failure
