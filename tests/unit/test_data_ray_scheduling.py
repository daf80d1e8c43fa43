"""The Ray Data scheduling callbacks with stand-in executors: RefreshLimitsUntilKnown re-asks
while the limits are zero and stops once they are known; PollTasksOften shortens the executor's
wait for tasks and never lengthens it; StreamBlocks re-blocks the read+preprocess operator only
(timing on a real cluster: `mmdist bench ingest`)."""

from types import SimpleNamespace

from mmdist.data.ray_scheduling import (
    BLOCK_BYTES_KEY,
    CHUNK_SHARE,
    POLL_S,
    PollTasksOften,
    RefreshLimitsUntilKnown,
    StreamBlocks,
)


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
    import mmdist.data.ray_scheduling as mod

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


def test_poll_tasks_often_shortens_the_wait_and_never_lengthens_it(monkeypatch):
    from ray.data._internal.execution import streaming_executor_state as ses

    monkeypatch.setattr(ses, "WAIT_FOR_TASK_COMPLETION_TIMEOUT_S", 0.1)  # Ray's own
    PollTasksOften().before_execution_starts(SimpleNamespace())
    assert ses.WAIT_FOR_TASK_COMPLETION_TIMEOUT_S == POLL_S < 0.1
    monkeypatch.setattr(ses, "WAIT_FOR_TASK_COMPLETION_TIMEOUT_S", 0.005)  # someone's shorter
    PollTasksOften().before_execution_starts(SimpleNamespace())
    assert ses.WAIT_FOR_TASK_COMPLETION_TIMEOUT_S == 0.005


class FakeOp:
    def __init__(self, name):
        self.name, self.target = name, None

    def override_target_max_block_size(self, size):
        self.target = size


def test_stream_blocks_sets_the_target_of_the_preprocess_operator_only():
    ops = [FakeOp("Input"), FakeOp("ReadParquet->MapBatches(BatchPreprocessor)"),
           FakeOp("MapBatches(<lambda>)")]
    sizes = {"BatchPreprocessor": 1000, "Other": 10}
    ctx = SimpleNamespace(get_config=lambda key: {BLOCK_BYTES_KEY: sizes}.get(key))
    StreamBlocks().before_execution_starts(
        SimpleNamespace(_data_context=ctx, _topology={op: None for op in ops}))
    assert [op.target for op in ops] == [None, int(CHUNK_SHARE * 1000), None]


def test_stream_blocks_without_a_size_or_an_executor_it_knows_does_nothing():
    op = FakeOp("ReadParquet->MapBatches(BatchPreprocessor)")
    ctx = SimpleNamespace(get_config=lambda key: None)
    StreamBlocks().before_execution_starts(SimpleNamespace(_data_context=ctx, _topology=[op]))
    StreamBlocks().before_execution_starts(SimpleNamespace())
    assert op.target is None
