"""The Ray Data scheduling callbacks with stand-in executors: RefreshLimitsUntilKnown re-asks
while the limits are zero and stops once they are known; WaitForFirst returns the executor's
wait at the first ready task with all that are ready; InlineMetadataOnOneNode swaps the
metadata fetcher on one node only; UdfShapesBlocks turns Ray's block shaping off for the named
preprocess operator only (timing on a real cluster: `mmdist bench ingest`).

The guard around Ray's private modules, with real Ray Data: the installed Ray is the one the
callbacks were verified on and still has every private name and behaviour they rely on (these
tests fail on a Ray upgrade, on purpose); on another Ray nothing is installed and datasets run
with Ray Data's defaults; the module imports without Ray Data's private modules."""

import logging
import subprocess
import sys
from types import SimpleNamespace

import numpy as np
import ray

from mmdist.data import ray_scheduling
from mmdist.data.ray_scheduling import (
    CALLBACKS,
    SUPPORTED_RAY,
    UDF_BLOCKS_KEY,
    InlineMetadataOnOneNode,
    RefreshLimitsUntilKnown,
    UdfShapesBlocks,
    WaitForFirst,
    WaitForFirstTask,
)

REVERIFY = (f"mmdist/data/ray_scheduling.py reaches into the private executor of Ray Data "
            f"{SUPPORTED_RAY} and this is Ray {ray.__version__}: re-read each of its callbacks, "
            f"task_index and wait_for_autoscaling_coordinator against this Ray's "
            f"ray/data/_internal, fix what moved, run `mmdist bench ingest --repeat 3` (compare "
            f"with docs/performance.md: a callback that no longer helps should go) and this "
            f"file's tests, then set SUPPORTED_RAY. Until then mmdist runs Ray Data's defaults.")


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


# --- the guard around Ray's private modules -------------------------------------------------


def test_installed_ray_is_the_one_the_callbacks_were_verified_on():
    assert ray.__version__.split(".")[:2] == SUPPORTED_RAY.split("."), REVERIFY
    assert ray_scheduling.unsupported_reason() is None, REVERIFY


def test_every_private_name_the_module_imports_exists():
    """What the module imports and checks before installing anything (`_missing_names`)."""
    from ray.data._internal.cluster_autoscaler import default_autoscaling_coordinator as dac
    from ray.data._internal.execution import streaming_executor_state as ses
    from ray.data._internal.execution.execution_callback import ExecutionCallback
    from ray.data._internal.execution.interfaces.task_context import TaskContext
    from ray.data._internal.execution.metadata_fetcher import (
        InlineMetadataFetcher,
        ThreadedMetadataFetcher,
    )
    from ray.data._internal.execution.resource_manager import ResourceManager
    from ray.data._internal.output_buffer import OutputBlockSizeOption

    assert ray_scheduling._IMPORT_ERROR is None, f"{ray_scheduling._IMPORT_ERROR}. {REVERIFY}"
    assert ray_scheduling._missing_names() == [], REVERIFY
    assert ses.ray is ray or isinstance(ses.ray, WaitForFirst), REVERIFY
    assert callable(dac.get_or_create_autoscaling_coordinator), REVERIFY
    assert callable(dac._AutoscalingCoordinatorActor.get_reserved_resources), REVERIFY
    assert callable(ResourceManager.get_global_limits), REVERIFY
    assert issubclass(RefreshLimitsUntilKnown, ExecutionCallback), REVERIFY
    assert InlineMetadataFetcher and ThreadedMetadataFetcher, REVERIFY
    assert OutputBlockSizeOption.of(disable_block_shaping=True).disable_block_shaping, REVERIFY
    assert "task_idx" in TaskContext.__dataclass_fields__, REVERIFY


class TwoBlocksPerTask:
    """A map UDF (a callable instance, like BatchPreprocessor) that yields each input block as
    two halves, tagged with the index of the task that made them."""

    def __call__(self, batch):
        n, i = len(batch["id"]), ray_scheduling.task_index()
        for part in (slice(0, n // 2), slice(n // 2, n)):
            yield {"id": batch["id"][part], "task": np.full(len(batch["id"][part]), i)}


def _two_blocks_per_task_dataset(rows=16, tasks=4):
    ds = ray.data.range(rows, override_num_blocks=tasks)
    udf = TwoBlocksPerTask()
    return ray_scheduling.add_to(ds.map_batches(udf, batch_size=None), udf=udf)


# What a probe registered before mmdist's callbacks saw of Ray's executor, per execution.
PROBED: list[dict[str, object]] = []


def _executor_facts(executor):
    """The executor's private attributes the callbacks read or write, as Ray left them."""
    from ray.data._internal.execution import streaming_executor_state as ses
    from ray.data._internal.execution.metadata_fetcher import ThreadedMetadataFetcher

    rm = getattr(executor, "_resource_manager", None)
    ctx = getattr(executor, "_data_context", None)
    ops = list(getattr(executor, "_topology", None) or ())
    udf_ops = [op for op in ops if "MapBatches(TwoBlocksPerTask)" in getattr(op, "name", "")]
    transformer = getattr(udf_ops[0], "_map_transformer", None) if udf_ops else None
    fns = transformer.get_transform_fns() if hasattr(transformer, "get_transform_fns") else []
    limits = rm.get_global_limits() if hasattr(rm, "get_global_limits") else None
    return {
        "StreamingExecutor._resource_manager": rm is not None,
        "ResourceManager._global_limits_last_update_time":
            hasattr(rm, "_global_limits_last_update_time"),
        "ResourceManager.get_global_limits() .cpu/.gpu":
            hasattr(limits, "cpu") and hasattr(limits, "gpu"),
        "StreamingExecutor._metadata_fetcher is a ThreadedMetadataFetcher (Ray's default)":
            isinstance(getattr(executor, "_metadata_fetcher", None), ThreadedMetadataFetcher),
        "StreamingExecutor._data_context.get_config": hasattr(ctx, "get_config"),
        "StreamingExecutor._topology: an operator named 'ReadRange->MapBatches(TwoBlocksPerTask)'":
            len(udf_ops) == 1,
        "MapOperator._output_block_size_option_override":
            bool(udf_ops) and hasattr(udf_ops[0], "_output_block_size_option_override"),
        "MapOperator._map_transformer.get_transform_fns()": bool(fns),
        "MapTransformFn._output_block_size_option":
            bool(fns) and hasattr(fns[-1], "_output_block_size_option"),
        "streaming_executor_state.ray.wait": hasattr(getattr(ses, "ray", None), "wait"),
    }


class Probe(ray_scheduling.ExecutionCallback):
    def before_execution_starts(self, executor):
        PROBED.append(_executor_facts(executor))

    def on_execution_step(self, executor):
        rm = executor._resource_manager
        # RefreshLimitsUntilKnown's lever: a zero update time makes the next call refresh
        rm._global_limits_last_update_time = 0
        rm.get_global_limits()
        PROBED[-1]["ResourceManager.get_global_limits() refreshes after a zero update time"] = (
            rm._global_limits_last_update_time != 0)
        FETCHERS.append(type(executor._metadata_fetcher))  # after mmdist's callbacks ran


FETCHERS: list[type] = []


def test_every_private_attribute_the_callbacks_touch_exists_on_a_real_execution(
        ray_local, monkeypatch):
    """A real Ray Data execution with the callbacks: Ray's executor still has every private
    attribute they read or write, the executor's waits go through WaitForFirst, the UDF's
    yields leave their tasks as blocks (UdfShapesBlocks), task_index() tells the tasks apart,
    and the autoscaling coordinator answers."""
    from ray.data._internal.execution import streaming_executor_state as ses
    from ray.data._internal.execution.metadata_fetcher import InlineMetadataFetcher

    ray_local.data.DataContext.get_current().enable_progress_bars = False
    monkeypatch.setattr(ses, "ray", ray)  # Ray's own module, whatever earlier tests installed
    waits, real_wait = [], WaitForFirst.wait

    def counted(self, *args, **kwargs):
        waits.append(1)
        return real_wait(self, *args, **kwargs)

    monkeypatch.setattr(WaitForFirst, "wait", counted)
    PROBED.clear()
    FETCHERS.clear()
    ds = _two_blocks_per_task_dataset(rows=16, tasks=4)
    assert all(cls in ds.context.custom_execution_callback_classes for cls in CALLBACKS), (
        f"{ray_scheduling.unsupported_reason()}. {REVERIFY}")
    ds.context.custom_execution_callback_classes.insert(0, Probe)  # sees Ray's executor first

    blocks = sorted(b.num_rows() for b in ds.iter_internal_ref_bundles())
    rows = ds.take_all()

    assert PROBED, REVERIFY
    for facts in PROBED:
        missing = [name for name, ok in facts.items() if not ok]
        assert not missing, f"Ray {ray.__version__} changed {missing}. {REVERIFY}"
    assert isinstance(ses.ray, WaitForFirst) and ses.ray._ray is ray, REVERIFY
    assert waits, f"the executor no longer waits through streaming_executor_state.ray. {REVERIFY}"
    assert blocks == [2] * 8, f"UdfShapesBlocks no longer shapes blocks: {blocks}. {REVERIFY}"
    assert sorted(r["id"] for r in rows) == list(range(16))
    assert sorted({int(r["task"]) for r in rows}) == [0, 1, 2, 3], (
        f"TaskContext.task_idx no longer numbers the tasks. {REVERIFY}")
    assert ray_scheduling.one_node()  # the test's cluster
    assert FETCHERS and set(FETCHERS) == {InlineMetadataFetcher}, (
        f"the executor no longer keeps the fetcher set before it starts. {REVERIFY}")
    assert ray_scheduling.wait_for_autoscaling_coordinator(timeout_s=60), REVERIFY


def test_on_another_ray_nothing_is_installed_and_the_dataset_still_runs(
        ray_local, monkeypatch, caplog):
    """A Ray this module was not verified on (simulated): no callback, no block shaping by the
    UDF, one warning for the process; the dataset runs with Ray Data's defaults (each task's
    yields merged into one block) and gives every row."""
    from ray.data._internal.execution import streaming_executor_state as ses

    ray_local.data.DataContext.get_current().enable_progress_bars = False
    monkeypatch.setattr(ray, "__version__", "2.61.0")
    monkeypatch.setattr(ray_scheduling, "_warned", False)
    monkeypatch.setattr(ses, "ray", ray)
    caplog.set_level(logging.WARNING, logger=ray_scheduling.__name__)

    ds = _two_blocks_per_task_dataset(rows=16, tasks=4)
    _two_blocks_per_task_dataset()  # a second dataset: no second warning
    assert not ray_scheduling.wait_for_autoscaling_coordinator()

    assert not set(CALLBACKS) & set(ds.context.execution_callback_classes)
    assert ds.context.get_config(UDF_BLOCKS_KEY) is None
    warnings = [r.getMessage() for r in caplog.records if r.name == ray_scheduling.__name__]
    assert len(warnings) == 1, warnings
    assert "Ray 2.61.0" in warnings[0] and "mmdist bench ingest" in warnings[0]
    assert sorted(b.num_rows() for b in ds.iter_internal_ref_bundles()) == [4] * 4
    assert sorted(r["id"] for r in ds.take_all()) == list(range(16))
    assert ses.ray is ray  # WaitForFirst never installed


def test_task_index_reads_ray_task_context_only_on_the_supported_ray(monkeypatch):
    from ray.data._internal.execution.interfaces.task_context import TaskContext

    from mmdist.data.preprocess import _task_index

    monkeypatch.setattr(TaskContext, "get_current", classmethod(lambda cls: None))
    assert ray_scheduling.task_index() == 0  # outside a task
    monkeypatch.setattr(TaskContext, "get_current",
                        classmethod(lambda cls: SimpleNamespace(task_idx=3)))
    assert ray_scheduling.task_index() == _task_index() == 3
    monkeypatch.setattr(ray, "__version__", "3.0.0")
    assert ray_scheduling.task_index() == _task_index() == 0


def test_the_module_imports_without_ray_datas_private_modules():
    """A Ray whose private module moved: the import still works and nothing is installed."""
    code = ("import sys, ray.data\n"
            "sys.modules['ray.data._internal.execution.execution_callback'] = None\n"
            "from mmdist.data import ray_scheduling as rs\n"
            "ds = object()\n"
            "assert rs.add_to(ds, udf=object()) is ds and rs.task_index() == 0\n"
            "print(rs.unsupported_reason())\n")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         timeout=300)
    assert out.returncode == 0, out.stderr
    assert "lacks a private Ray Data module" in out.stdout
    assert "mmdist bench ingest" in out.stderr  # the one warning
