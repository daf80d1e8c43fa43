"""Fault injection for the reliability tests (and for anyone rehearsing a failure).

Set on the driver before `mmdist train`; the values travel to the workers with the job:

    MMDIST_FAULT_KILL_AT_STEP=N   rank MMDIST_FAULT_RANK (default 0) SIGKILLs itself right after
                                  optimizer step N, once (a marker file under the run's storage
                                  folder makes the restarted attempt carry on)
    MMDIST_FAULT_NAN_BATCHES=A-B[,C-D...]
                                  the loss of micro-batches A..B (1-based, inclusive, counted
                                  from the start of each attempt) is NaN; a lone N is N-N
    MMDIST_FAULT_STEP_SLEEP=S     every rank sleeps S seconds after each optimizer step (a slow
                                  run without burning CPU, to rehearse a tracking outage)
    MMDIST_FAULT_RAISE_AT_STEP=N  rank MMDIST_FAULT_RANK (default 0) raises RuntimeError right
                                  after optimizer step N, on every attempt (a deterministic bug);
                                  each raise appends a line to .fault-raised-at-N in the run folder
    MMDIST_FAULT_DISK_FULL_AT_STEP=N:BYTES
                                  after optimizer step N, once, rank MMDIST_FAULT_RANK's writes stop
                                  at BYTES per file (RLIMIT_FSIZE: a write past it fails, as on a
                                  full disk), so its next checkpoint is cut off part-way; the
                                  restarted attempt is a new process without the limit

Nothing happens when none of them is set.
"""

from __future__ import annotations

import os
import signal
import time
from dataclasses import dataclass
from pathlib import Path

PREFIX = "MMDIST_FAULT_"


def from_environ() -> dict[str, str]:
    """The fault settings of this (driver) process, to ship to the workers."""
    return {k: v for k, v in os.environ.items() if k.startswith(PREFIX)}


@dataclass
class Faults:
    """The faults one worker injects: ``loss`` wraps every micro-batch's loss, ``after_step``
    runs after every optimizer step; both do nothing when no fault is set."""

    rank: int = 0  # this worker's rank
    kill_at_step: int = 0
    kill_rank: int = 0
    nan_ranges: tuple[tuple[int, int], ...] = ()
    step_sleep: float = 0.0
    marker: Path | None = None
    raise_at_step: int = 0
    raise_log: Path | None = None
    disk_full_at_step: int = 0
    disk_full_bytes: int = 0
    disk_marker: Path | None = None
    batches_seen: int = 0  # micro-batches this attempt has computed a loss for

    @classmethod
    def parse(cls, env: dict[str, str], marker_dir: str | Path, rank: int = 0) -> Faults:
        """The faults of ``env`` (:func:`from_environ` on the driver) for worker ``rank``."""
        f = cls(rank=rank)
        if env.get(PREFIX + "KILL_AT_STEP"):
            f.kill_at_step = int(env[PREFIX + "KILL_AT_STEP"])
            f.kill_rank = int(env.get(PREFIX + "RANK", "0"))
            f.marker = Path(marker_dir) / f".fault-killed-at-{f.kill_at_step}"
        if env.get(PREFIX + "RAISE_AT_STEP"):
            f.raise_at_step = int(env[PREFIX + "RAISE_AT_STEP"])
            f.kill_rank = int(env.get(PREFIX + "RANK", "0"))
            f.raise_log = Path(marker_dir) / f".fault-raised-at-{f.raise_at_step}"
        if env.get(PREFIX + "DISK_FULL_AT_STEP"):
            step, _, size = env[PREFIX + "DISK_FULL_AT_STEP"].partition(":")
            f.disk_full_at_step, f.disk_full_bytes = int(step), int(size or 65536)
            f.kill_rank = int(env.get(PREFIX + "RANK", "0"))
            f.disk_marker = Path(marker_dir) / f".fault-disk-full-at-{f.disk_full_at_step}"
        if env.get(PREFIX + "NAN_BATCHES"):
            ranges = []
            for part in env[PREFIX + "NAN_BATCHES"].split(","):
                a, _, b = part.strip().partition("-")
                ranges.append((int(a), int(b or a)))
            f.nan_ranges = tuple(ranges)
        if env.get(PREFIX + "STEP_SLEEP"):
            f.step_sleep = float(env[PREFIX + "STEP_SLEEP"])
        return f

    def loss(self, loss):
        """The loss of the next micro-batch: NaN for those named in MMDIST_FAULT_NAN_BATCHES.
        Call it once per micro-batch (it counts them)."""
        self.batches_seen += 1
        if any(a <= self.batches_seen <= b for a, b in self.nan_ranges):
            return loss * float("nan")
        return loss

    def after_step(self, step: int) -> None:
        """Sleep; raise at ``raise_at_step``; SIGKILL this worker once at ``kill_at_step``."""
        if self.step_sleep:
            time.sleep(self.step_sleep)
        if self.raise_at_step and step == self.raise_at_step and self.rank == self.kill_rank:
            assert self.raise_log is not None
            self.raise_log.parent.mkdir(parents=True, exist_ok=True)
            with open(self.raise_log, "a") as f:
                f.write("raised\n")
            raise RuntimeError(f"fault injection: a deterministic error after step {step}")
        if (self.disk_full_at_step and step == self.disk_full_at_step
                and self.rank == self.kill_rank and self.disk_marker is not None
                and not self.disk_marker.exists()):
            import ctypes
            import resource  # POSIX; only these faults need them

            self.disk_marker.parent.mkdir(parents=True, exist_ok=True)
            self.disk_marker.write_text("disk full\n")
            # a failed write, not a dead process; through libc: the training loop runs outside
            # the main thread, where Python's signal.signal refuses
            ctypes.CDLL(None).signal(int(signal.SIGXFSZ), ctypes.c_void_p(1))  # SIG_IGN
            hard = resource.getrlimit(resource.RLIMIT_FSIZE)[1]
            resource.setrlimit(resource.RLIMIT_FSIZE, (self.disk_full_bytes, hard))
            print(f"[mmdist] fault injection: rank {self.rank}'s files stop at "
                  f"{self.disk_full_bytes} bytes after step {step}", flush=True)
        if (self.kill_at_step and step == self.kill_at_step and self.rank == self.kill_rank
                and self.marker is not None and not self.marker.exists()):
            self.marker.parent.mkdir(parents=True, exist_ok=True)
            self.marker.write_text("killed\n")
            print(f"[mmdist] fault injection: rank {self.rank} SIGKILLs itself after step {step}",
                  flush=True)
            os.kill(os.getpid(), signal.SIGKILL)
