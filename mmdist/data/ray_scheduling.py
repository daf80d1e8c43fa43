"""Ray Data execution callbacks that keep every CPU busy on short read+preprocess tasks.

They work around latencies of Ray Data 2.60's executor that cost little on a large cluster
with long tasks and a lot on a small node whose tasks take a fraction of a second (one shard
file of realistic rows). ``mmdist bench ingest`` measures the pipeline they serve; the
figures behind each callback are in ``docs/performance.md``.

1. Cold start. Ray Data learns how many CPUs an execution may use from the autoscaling
   coordinator actor. Its client returns the last cached answer and asks again in the
   background, and the first answer of each execution is empty (Ray's own comment in
   ``DefaultClusterAutoscalerV2`` calls it the cold start). ``ResourceManager.get_global_limits``
   then caches those zero limits for 1 s. With zero limits only the executor's liveness rule
   (one task when nothing runs) keeps data flowing: for the first second of every execution,
   and so of every training epoch, one task runs on a 2-CPU node instead of two.
   :class:`RefreshLimitsUntilKnown` asks again after every scheduling step while the limits
   are still zero; the coordinator answers within milliseconds.

2. Completion polling. Each scheduling step waits in ``ray.wait(all running tasks,
   num_returns=all, timeout=0.1 s)``, which returns at the timeout unless every task finished,
   and a task's output block and its end of stream are often picked up one step apart, so a
   worker whose task has finished idles until the executor notices. :class:`WaitForFirst`
   makes the wait return as soon as any task has output (then collects whatever else is ready
   without blocking), keeping Ray's 0.1 s timeout for when nothing happens: the step runs
   when there is work for it. (A shorter timeout would also end the idling, but would step
   the driver many times a second whether or not anything happened.)

3. Blocks as they are made. A map's output buffer holds what its function yields until it
   reaches ``DataContext.target_max_block_size`` (128 MiB), so a task that preprocesses a whole
   shard file in chunks would hand over one block when it ends, and the first batch of every
   execution (every training epoch) would wait for a whole shard. Lowering the context's
   target would also cut the Parquet read into blocks of a few rows (much more CPU), and a
   smaller target on the map alone makes several blocks of a shard where one would do, each
   costing the driver, the raylet and the worker CPU. So the function decides:
   :class:`UdfShapesBlocks` turns Ray's shaping off for the maps named in the dataset's
   context (:data:`UDF_BLOCKS_KEY`), every yield becomes a block, and ``BatchPreprocessor``
   yields a shard per block, with its first rows on their own first in the tasks that start the
   execution (one per task slot).

4. Block metadata on a thread. Ray 2.60 reads each output block's metadata on a background
   thread and emits the block (and ends a finished task, which frees its CPU for the next) in
   a later scheduling step; with steps driven by task events (2.) that is the next event or
   0.1 s later. On one node the metadata is a small local object.
   :class:`InlineMetadataOnOneNode` gives the executor Ray's inline fetcher there (what
   ``RAY_DATA_METADATA_PREFETCH_ON_THREAD=0`` selects; Ray reads that variable when Ray Data
   is imported, before mmdist could set it), so the first batch of an epoch comes sooner.

The callbacks live in a module of their own (numpy-free, torch-free) because the process that
executes the dataset imports it: the driver for ``iter_batches``, the split
coordinator actor of ``mmdist.data.pipeline.worker_shards`` for training.

This is the one module of mmdist that touches Ray's private modules (``ray.data._internal``),
here and in :func:`task_index` and :func:`wait_for_autoscaling_coordinator`, and only on the
Ray it was verified on (:data:`SUPPORTED_RAY`). On another Ray, or when a private name it
relies on is gone, :func:`add_to` installs nothing and logs one warning: the pipeline then runs
with Ray Data's defaults (correct, only slower to start each epoch on a small node).
``tests/unit/test_data_ray_scheduling.py`` fails on another Ray and says what to re-verify.
"""

from __future__ import annotations

import logging
import time
from typing import Any

import ray
from ray.data import DataContext

# The Ray (major.minor) whose executor these callbacks were read against and measured on
# (`mmdist bench ingest`, docs/performance.md); any other Ray gets Ray Data's defaults.
SUPPORTED_RAY = "2.60"

# Ray Data's private modules, imported under a guard: a Ray that moved or renamed one must
# still import this module (build_dataset, Ray Train's split coordinator and every Ray Data
# worker running BatchPreprocessor do), and then runs without the callbacks.
try:
    from ray.data._internal.cluster_autoscaler import default_autoscaling_coordinator
    from ray.data._internal.execution import streaming_executor_state
    from ray.data._internal.execution.execution_callback import ExecutionCallback
    from ray.data._internal.execution.interfaces.task_context import TaskContext
    from ray.data._internal.execution.metadata_fetcher import (
        InlineMetadataFetcher,
        ThreadedMetadataFetcher,
    )
    from ray.data._internal.execution.resource_manager import ResourceManager
    from ray.data._internal.output_buffer import OutputBlockSizeOption
    _IMPORT_ERROR: str | None = None
except Exception as e:  # ImportError, or whatever a reorganised Ray raises while importing
    ExecutionCallback = object  # so the classes below still define; add_to installs none
    _IMPORT_ERROR = f"{type(e).__name__}: {e}"

log = logging.getLogger(__name__)
_warned = False


def _missing_names() -> list[str]:
    """The private names this module relies on that a Ray without them would lack, as far as
    they can be checked without running a dataset (the executor's and operators' own
    attributes are read with getattr by each callback, which then does nothing; the unit
    test checks them on a real execution)."""
    attributes = ((ResourceManager, "get_global_limits"), (streaming_executor_state, "ray"),
                  (OutputBlockSizeOption, "of"), (TaskContext, "get_current"),
                  (default_autoscaling_coordinator, "get_or_create_autoscaling_coordinator"),
                  (default_autoscaling_coordinator._AutoscalingCoordinatorActor,
                   "get_reserved_resources"),
                  (ExecutionCallback, "before_execution_starts"),
                  (ExecutionCallback, "on_execution_step"), (DataContext, "get_config"),
                  (DataContext, "set_config"))
    # dataclass fields: instance attributes, listed on the class
    fields = ((OutputBlockSizeOption, "disable_block_shaping"), (TaskContext, "task_idx"),
              (DataContext, "custom_execution_callback_classes"))
    missing = [f"{getattr(obj, '__name__', obj)}.{name}" for obj, name in attributes
               if not hasattr(obj, name)]
    missing += [f"{cls.__name__}.{name}" for cls, name in fields
                if name not in getattr(cls, "__dataclass_fields__", {})]
    return missing


def unsupported_reason() -> str | None:
    """Why this process runs Ray Data with its default scheduling, or None when mmdist's
    callbacks apply (the installed Ray is :data:`SUPPORTED_RAY` and has every private name
    they rely on)."""
    installed = ".".join(ray.__version__.split(".")[:2])
    if installed != SUPPORTED_RAY:
        return (f"Ray {ray.__version__} is installed; mmdist's Ray Data scheduling callbacks "
                f"were verified on Ray {SUPPORTED_RAY}")
    if _IMPORT_ERROR is not None:
        return f"Ray {ray.__version__} lacks a private Ray Data module ({_IMPORT_ERROR})"
    missing = _missing_names()
    if missing:
        return f"Ray {ray.__version__} lacks private Ray Data names: {', '.join(missing)}"
    return None


def _warn_once(reason: str) -> None:
    global _warned
    if not _warned:
        _warned = True
        log.warning("mmdist: %s. Running Ray Data with its default scheduling (correct, but each "
                    "epoch may start slower on a small node). To use the callbacks again, "
                    "re-verify mmdist/data/ray_scheduling.py against this Ray "
                    "(tests/unit/test_data_ray_scheduling.py, `mmdist bench ingest --repeat "
                    "3`) and update its SUPPORTED_RAY.", reason)


class RefreshLimitsUntilKnown(ExecutionCallback):
    """Re-read the cluster's resource limits each scheduling step until they are non-zero
    (for at most ``GIVE_UP_S``: limits that stay zero, e.g. train workers holding every CPU,
    are then left to Ray's own refresh once a second)."""

    GIVE_UP_S = 10.0

    def __init__(self) -> None:
        self._done = False
        self._since: float | None = None

    def _refresh(self, executor: Any) -> None:
        if self._done:
            return
        rm = getattr(executor, "_resource_manager", None)
        if rm is None or not hasattr(rm, "_global_limits_last_update_time"):
            self._done = True  # not the Ray we know: leave it alone
            return
        now = time.monotonic()
        self._since = now if self._since is None else self._since
        limits = rm.get_global_limits()
        if limits.cpu > 0 or limits.gpu > 0 or now - self._since > self.GIVE_UP_S:
            self._done = True
        else:
            rm._global_limits_last_update_time = 0  # the next call asks the coordinator again

    def before_execution_starts(self, executor: Any) -> None:
        self._refresh(executor)

    def on_execution_step(self, executor: Any) -> None:
        self._refresh(executor)


class WaitForFirst:
    """Stands in for the ``ray`` module inside Ray Data's ``streaming_executor_state``: its one
    call into it, the executor's wait for running tasks, returns once any of them is ready
    (with all that are ready by then) instead of waiting for every one until the timeout.
    Every other attribute is the real module's."""

    def __init__(self, ray_module: Any) -> None:
        self._ray = ray_module

    def __getattr__(self, name: str) -> Any:
        return getattr(self._ray, name)

    def wait(self, refs: list, *, num_returns: int = 1, timeout: float | None = None,
             fetch_local: bool = True) -> tuple[list, list]:
        ready, rest = self._ray.wait(refs, num_returns=min(1, len(refs)), timeout=timeout,
                                     fetch_local=fetch_local)
        if ready and rest and num_returns > 1:
            more, rest = self._ray.wait(rest, num_returns=len(rest), timeout=0,
                                        fetch_local=fetch_local)
            ready = ready + more
        return ready, rest


class WaitForFirstTask(ExecutionCallback):
    """Install :class:`WaitForFirst` in the process that runs the executor (see the module).

    The wait lives in ``streaming_executor_state``'s module global ``ray``, so this applies to
    every execution in the process (all of them are mmdist's: the driver or Ray Train's split
    coordinator). Installed once; left alone if Ray's module no longer looks as expected."""

    def before_execution_starts(self, executor: Any) -> None:
        ses = streaming_executor_state
        current = getattr(ses, "ray", None)
        if current is not None and hasattr(current, "wait") and not isinstance(current,
                                                                                 WaitForFirst):
            ses.ray = WaitForFirst(current)


class InlineMetadataOnOneNode(ExecutionCallback):
    """On a one-node cluster, read block metadata in the scheduling step that sees the block
    (Ray's inline fetcher) instead of on a thread (see the module). The executor starts its
    fetcher's thread only when it runs, after this callback."""

    def before_execution_starts(self, executor: Any) -> None:
        fetcher = getattr(executor, "_metadata_fetcher", None)
        if isinstance(fetcher, ThreadedMetadataFetcher) and one_node():
            executor._metadata_fetcher = InlineMetadataFetcher()


def one_node() -> bool:
    """Whether the Ray cluster this process is connected to has exactly one live node."""
    try:
        return sum(1 for node in ray.nodes() if node.get("Alive")) == 1
    except Exception:  # not connected, or the GCS does not answer: assume a real cluster
        return False


# DataContext config key: class names of the map UDFs whose yields are the blocks (`add_to`).
UDF_BLOCKS_KEY = "mmdist.udf_blocks"


class UdfShapesBlocks(ExecutionCallback):
    """Turn Ray's block shaping off for each ``map_batches`` operator whose UDF class is named
    in the dataset's context (fused with the read or not): what the UDF yields leaves the task
    as it is, one block per yield (see the module). Left alone: operators Ray gave a block size
    of its own (its tasks would refuse the combination), and executors that do not look like
    Ray 2.60's; Ray then merges the yields into blocks of its target size (correct, only later).
    """

    def before_execution_starts(self, executor: Any) -> None:
        ctx = getattr(executor, "_data_context", None)
        names = ctx.get_config(UDF_BLOCKS_KEY) if hasattr(ctx, "get_config") else None
        if not names:
            return
        for op in getattr(executor, "_topology", None) or ():
            name = getattr(op, "name", "")
            if not any(f"MapBatches({udf})" in name for udf in names):
                continue
            transformer = getattr(op, "_map_transformer", None)
            if (transformer is None or getattr(op, "_output_block_size_option_override", None)
                    is not None or not hasattr(transformer, "get_transform_fns")):
                continue
            last = transformer.get_transform_fns()[-1]
            if hasattr(last, "_output_block_size_option"):
                last._output_block_size_option = OutputBlockSizeOption.of(
                    disable_block_shaping=True)


CALLBACKS = (RefreshLimitsUntilKnown, WaitForFirstTask, UdfShapesBlocks,
             InlineMetadataOnOneNode)


def add_to(ds: Any, udf: Any = None) -> Any:
    """Register :data:`CALLBACKS` on ``ds``'s own DataContext (not the global one) and return
    ``ds``; the callbacks travel with the dataset to whatever process runs it. On a Ray this
    module does not support (:func:`unsupported_reason`) it registers nothing, logs why once
    per process, and ``ds`` runs with Ray Data's defaults.

    Args:
        ds: the dataset.
        udf: the callable class instance given to ``map_batches`` whose yields should leave
            its tasks as blocks unchanged (None: Ray shapes every map's blocks).
    """
    reason = unsupported_reason()
    if reason is not None:
        _warn_once(reason)
        return ds
    classes = ds.context.custom_execution_callback_classes
    for cls in CALLBACKS:
        if cls not in classes:
            classes.append(cls)
    if udf is not None:
        names = list(ds.context.get_config(UDF_BLOCKS_KEY) or [])
        if type(udf).__name__ not in names:
            names.append(type(udf).__name__)
        ds.context.set_config(UDF_BLOCKS_KEY, names)
    return ds


def task_index() -> int:
    """Ray Data's index of the running map task within its operator (0 outside a task, and on
    a Ray this module does not support: there Ray shapes the blocks, see
    ``BatchPreprocessor``)."""
    if unsupported_reason() is not None:
        return 0
    ctx = TaskContext.get_current()
    return int(getattr(ctx, "task_idx", 0) or 0) if ctx is not None else 0


def wait_for_autoscaling_coordinator(timeout_s: float = 120.0) -> bool:
    """Block until Ray Data's autoscaling coordinator actor answers (it starts with a job's
    first execution; until it answers, executions see zero CPUs and run one task at a time).

    Returns:
        False without waiting on a Ray this module does not support (logged once).
    """
    reason = unsupported_reason()
    if reason is not None:
        _warn_once(reason)
        return False
    coordinator = default_autoscaling_coordinator.get_or_create_autoscaling_coordinator()
    ray.get(coordinator.get_reserved_resources.remote("mmdist-warm-up"), timeout=timeout_s)
    return True
