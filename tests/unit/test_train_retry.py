"""mmdist's retry rule (train.retry): crashes resume, deterministic errors fail at once."""

import ray.exceptions

from mmdist.train.retry import Failure, classify, decide, is_crash, signature


class HealthCheckFailed(Exception):
    """Shaped like Ray Train's WorkerHealthCheckFailedError (it wraps the actor error)."""

    def __init__(self, failure):
        super().__init__("worker health check failed")
        self.health_check_failure = failure


def test_ray_actor_deaths_are_crashes_and_code_errors_are_not():
    died = ray.exceptions.ActorDiedError()
    assert is_crash(died)
    assert is_crash(HealthCheckFailed(died))
    assert not is_crash(IndexError("Target 9 is out of bounds."))
    assert not is_crash(RuntimeError("Connection closed by peer"))


def test_any_crashed_rank_makes_the_failure_a_crash():
    f = classify({0: RuntimeError("gloo: connection closed"), 1: ray.exceptions.ActorDiedError()},
                 checkpoint_step=4)
    assert f.kind == "crash" and f.checkpoint_step == 4
    f = classify({1: ValueError("b"), 0: IndexError("Target 9 is out of bounds.")}, None)
    assert f == Failure("error", "IndexError: Target 9 is out of bounds.", None)


def test_signature_ignores_memory_addresses():
    assert signature(ValueError("<obj at 0x7f00aa>")) == signature(ValueError("<obj at 0x7f11bb>"))
    assert signature(ValueError("step 5")) != signature(ValueError("step 6"))


def test_an_error_before_the_first_checkpoint_is_not_retried():
    reason = decide(Failure("error", "IndexError: x", None), None, 1, max_failures=2)
    assert reason and "before the run's first checkpoint" in reason


def test_a_crash_before_the_first_checkpoint_is_retried_within_the_budget():
    crash = Failure("crash", "ActorDiedError", None)
    assert decide(crash, None, 1, max_failures=2) is None
    assert decide(crash, crash, 2, max_failures=2) is None
    assert "train.max_failures=2" in decide(crash, crash, 3, max_failures=2)


def test_an_error_after_progress_is_retried_once_then_stopped_when_it_repeats():
    first = Failure("error", "RuntimeError: boom", 4)
    assert decide(first, None, 1, max_failures=2) is None
    reason = decide(Failure("error", "RuntimeError: boom", 4), first, 2, max_failures=2)
    assert reason and "same error" in reason and "step 4" in reason
    # the same error after more progress is retried: it may be transient
    assert decide(Failure("error", "RuntimeError: boom", 8), first, 2, max_failures=2) is None
    assert decide(Failure("error", "RuntimeError: other", 4), first, 2, max_failures=2) is None
