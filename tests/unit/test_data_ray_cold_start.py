"""RefreshLimitsUntilKnown with a stand-in executor: it re-asks while the limits are zero and
stops once they are known (timing on a real cluster is measured by `mmdist bench ingest`)."""

from types import SimpleNamespace

from mmdist.data.ray_cold_start import RefreshLimitsUntilKnown


class FakeResourceManager:
    def __init__(self, answers):
        self.answers = list(answers)  # CPU limits the coordinator reports, one per refresh
        self.limits = SimpleNamespace(cpu=0.0, gpu=0.0)
        self._global_limits_last_update_time = 0
        self.refreshes = 0

    def get_global_limits(self):
        if self._global_limits_last_update_time == 0:  # stale: refresh, as Ray does
            self.refreshes += 1
            self.limits = SimpleNamespace(cpu=self.answers.pop(0) if self.answers else 2.0,
                                          gpu=0.0)
            self._global_limits_last_update_time = 123.0
        return self.limits


def test_asks_again_until_the_limits_are_known_then_stops():
    rm = FakeResourceManager([0.0, 0.0, 2.0])
    cb, ex = RefreshLimitsUntilKnown(), SimpleNamespace(_resource_manager=rm)
    cb.before_execution_starts(ex)  # refresh 1: zero -> re-arm
    assert rm._global_limits_last_update_time == 0
    cb.on_execution_step(ex)  # refresh 2: zero -> re-arm
    cb.on_execution_step(ex)  # refresh 3: 2 CPUs -> known
    assert rm.refreshes == 3 and rm._global_limits_last_update_time == 123.0
    for _ in range(5):
        cb.on_execution_step(ex)
    assert rm.refreshes == 3  # left to Ray's own 1 s refresh from here on


def test_leaves_an_unknown_ray_alone():
    RefreshLimitsUntilKnown().on_execution_step(SimpleNamespace())  # no resource manager
    RefreshLimitsUntilKnown().on_execution_step(SimpleNamespace(_resource_manager=object()))


def test_gives_up_on_limits_that_stay_zero(monkeypatch):
    import mmdist.data.ray_cold_start as mod

    clock = [100.0]
    monkeypatch.setattr(mod.time, "monotonic", lambda: clock[0])
    rm = FakeResourceManager([0.0] * 100)
    cb, ex = RefreshLimitsUntilKnown(), SimpleNamespace(_resource_manager=rm)
    cb.on_execution_step(ex)
    clock[0] += RefreshLimitsUntilKnown.GIVE_UP_S + 1
    cb.on_execution_step(ex)
    asked = rm.refreshes
    cb.on_execution_step(ex)
    assert rm.refreshes == asked  # no longer re-armed
