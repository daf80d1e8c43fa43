"""The Ray Data scheduling callbacks with stand-in executors: RefreshLimitsUntilKnown re-asks
while the limits are zero and stops once they are known; WaitForFirst returns the executor's
wait at the first ready task with all that are ready; InlineMetadataOnOneNode swaps the
metadata fetcher on one node only; UdfShapesBlocks turns Ray's block shaping off for the named
preprocess operator only (timing on a real cluster: `mmdist bench ingest`)."""

from types import SimpleNamespace

from mmdist.data.ray_scheduling import (
    UDF_BLOCKS_KEY,
    InlineMetadataOnOneNode,
    RefreshLimitsUntilKnown,
    UdfShapesBlocks,
    WaitForFirst,
    WaitForFirstTask,
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


class FakeRay:
    """``ray.wait`` over refs that become ready in a given order: a wait for ``num_returns``
    returns as soon as that many are ready, or at the timeout with those ready by then."""

    def __init__(self, ready_now):
        self.ready_now, self.calls = set(ready_now), []
        self.put = "the real module's put"

    def wait(self, refs, *, num_returns=1, timeout=None, fetch_local=True):
        self.calls.append((list(refs), num_returns, timeout, fetch_local))
        ready = [r for r in refs if r in self.ready_now]
        if len(ready) >= num_returns:
            ready = ready[:num_returns]
        return ready, [r for r in refs if r not in ready]


def test_wait_for_first_returns_every_ready_task_without_waiting_for_the_rest():
    ray = FakeRay(ready_now={"b", "c"})
    ready, rest = WaitForFirst(ray).wait(["a", "b", "c", "d"], num_returns=4, timeout=0.1,
                                         fetch_local=False)
    assert (ready, rest) == (["b", "c"], ["a", "d"])
    # blocks (with the executor's timeout) for one, then only sweeps the rest
    assert [(n, t, f) for _, n, t, f in ray.calls] == [(1, 0.1, False), (3, 0, False)]


def test_wait_for_first_keeps_ray_semantics_when_nothing_or_one_is_asked():
    ray = FakeRay(ready_now=set())
    assert WaitForFirst(ray).wait(["a", "b"], num_returns=2, timeout=0.1) == ([], ["a", "b"])
    assert len(ray.calls) == 1  # timed out: no second call
    ray = FakeRay(ready_now={"a", "b"})
    assert WaitForFirst(ray).wait(["a", "b"], num_returns=1) == (["a"], ["b"])
    assert WaitForFirst(ray).put == "the real module's put"


def test_wait_for_first_task_installs_itself_once(monkeypatch):
    from ray.data._internal.execution import streaming_executor_state as ses

    real = FakeRay(ready_now=set())
    monkeypatch.setattr(ses, "ray", real)
    WaitForFirstTask().before_execution_starts(SimpleNamespace())
    installed = ses.ray
    assert isinstance(installed, WaitForFirst) and installed._ray is real
    WaitForFirstTask().before_execution_starts(SimpleNamespace())
    assert ses.ray is installed  # not wrapped twice


class FakeTransformFn:
    def __init__(self):
        self._output_block_size_option = "ray's target"


class FakeOp:
    def __init__(self, name, override=None):
        self.name, self._output_block_size_option_override = name, override
        self.fns = [FakeTransformFn(), FakeTransformFn()]  # the fused read, then the UDF
        self._map_transformer = SimpleNamespace(get_transform_fns=lambda: self.fns)

    def shaping(self):
        return [getattr(fn._output_block_size_option, "disable_block_shaping", fn._output_block_size_option)
                for fn in self.fns]


def _executor(ops, names):
    ctx = SimpleNamespace(get_config=lambda key: {UDF_BLOCKS_KEY: names}.get(key))
    return SimpleNamespace(_data_context=ctx, _topology={op: None for op in ops})


def test_udf_shapes_the_blocks_of_the_named_operator_only():
    ops = [FakeOp("Input"), FakeOp("ReadParquet->MapBatches(BatchPreprocessor)"),
           FakeOp("MapBatches(<lambda>)"), FakeOp("MapBatches(BatchPreprocessorX)")]
    UdfShapesBlocks().before_execution_starts(_executor(ops, ["BatchPreprocessor", "Other"]))
    kept = ["ray's target", "ray's target"]
    # the UDF's transform (the last one) yields blocks as they are; the fused read keeps its own
    assert [op.shaping() for op in ops] == [kept, ["ray's target", True], kept, kept]


def test_udf_blocks_leave_operators_alone_that_ray_sized_or_it_does_not_know():
    sized = FakeOp("ReadParquet->MapBatches(BatchPreprocessor)", override="a size from Ray")
    plain = FakeOp("ReadParquet->MapBatches(BatchPreprocessor)")
    UdfShapesBlocks().before_execution_starts(_executor([sized], ["BatchPreprocessor"]))
    UdfShapesBlocks().before_execution_starts(_executor([plain], None))
    UdfShapesBlocks().before_execution_starts(SimpleNamespace())
    assert sized.shaping() == plain.shaping() == ["ray's target", "ray's target"]



def test_inline_metadata_only_on_one_node(monkeypatch):
    from ray.data._internal.execution.metadata_fetcher import (
        InlineMetadataFetcher,
        ThreadedMetadataFetcher,
    )

    from mmdist.data import ray_scheduling

    for nodes, expected in ((1, InlineMetadataFetcher), (3, ThreadedMetadataFetcher)):
        monkeypatch.setattr(ray_scheduling, "one_node", lambda n=nodes: n == 1)
        ex = SimpleNamespace(_metadata_fetcher=ThreadedMetadataFetcher())
        InlineMetadataOnOneNode().before_execution_starts(ex)
        assert type(ex._metadata_fetcher) is expected
    InlineMetadataOnOneNode().before_execution_starts(SimpleNamespace())  # unknown: no-op


def test_one_node_counts_live_nodes_and_assumes_a_cluster_when_it_cannot_ask(monkeypatch):
    import ray

    from mmdist.data import ray_scheduling

    monkeypatch.setattr(ray, "nodes", lambda: [{"Alive": True}, {"Alive": False}])
    assert ray_scheduling.one_node()
    monkeypatch.setattr(ray, "nodes", lambda: [{"Alive": True}, {"Alive": True}])
    assert not ray_scheduling.one_node()

    def not_connected():
        raise RuntimeError("Ray has not been started yet")

    monkeypatch.setattr(ray, "nodes", not_connected)
    assert not ray_scheduling.one_node()
