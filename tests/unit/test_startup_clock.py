"""Start-up accounting of `mmdist train`: the clock starts at the command's own start."""

import time

from mmdist.cli import process_started_at
from mmdist.train.watch import phase_clock


def test_the_process_start_is_in_the_past_and_after_boot():
    started = process_started_at()
    assert started is not None
    now = time.time()
    assert 0 < now - started < 7 * 24 * 3600
    assert process_started_at() == __import__("pytest").approx(started, abs=0.05)  # stable


def test_seconds_before_train_are_the_command_phase():
    phases, mark = phase_clock(time.time() - 2.0)
    assert phases["command"] >= 2.0
    mark("data_checks")
    start = phases.pop("_start")
    assert time.time() - start >= 2.0 and set(phases) == {"command", "data_checks"}
    phases, _ = phase_clock()  # called without the command's start: no such phase
    assert "command" not in phases
