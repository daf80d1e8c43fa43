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
   yields a shard per block, with the first chunk on its own first in the tasks that start the
   execution (one per task slot).

4. Block metadata on a thread. Ray 2.60 reads each output block's metadata on a background
   thread and emits the block (and ends a finished task, which frees its CPU for the next) in
   a later scheduling step; with steps driven by task events (2.) that is the next event or
   0.1 s later. On one node the metadata is a small local object.
   :class:`InlineMetadataOnOneNode` gives the executor Ray's inline fetcher there (what
   ``RAY_DATA_METADATA_PREFETCH_ON_THREAD=0`` selects; Ray reads that variable when Ray Data
   is imported, before mmdist could set it), so the first batch of an epoch comes sooner.

The callbacks live in a module of their own (numpy-free, torch-free) because the process that
executes the dataset imports it: the driver for ``iter_batches``, Ray Train's split
coordinator actor for ``get_dataset_shard``. If Ray's internals change they do nothing.
"""

from __future__ import annotations

import time
from typing import Any

from ray.data._internal.execution.execution_callback import ExecutionCallback


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
        try:
            from ray.data._internal.execution import streaming_executor_state as ses
        except ImportError:  # pragma: no cover - not the Ray we know
            return
        current = getattr(ses, "ray", None)
        if current is not None and hasattr(current, "wait") and not isinstance(current,
                                                                                 WaitForFirst):
            ses.ray = WaitForFirst(current)


class InlineMetadataOnOneNode(ExecutionCallback):
    """On a one-node cluster, read block metadata in the scheduling step that sees the block
    (Ray's inline fetcher) instead of on a thread (see the module). The executor starts its
    fetcher's thread only when it runs, after this callback."""

    def before_execution_starts(self, executor: Any) -> None:
        try:
            from ray.data._internal.execution.metadata_fetcher import (
                InlineMetadataFetcher,
                ThreadedMetadataFetcher,
            )
        except ImportError:  # pragma: no cover - not the Ray we know
            return
        fetcher = getattr(executor, "_metadata_fetcher", None)
        if isinstance(fetcher, ThreadedMetadataFetcher) and one_node():
            executor._metadata_fetcher = InlineMetadataFetcher()


def one_node() -> bool:
    """Whether the Ray cluster this process is connected to has exactly one live node."""
    import ray

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
        try:
            from ray.data._internal.output_buffer import OutputBlockSizeOption
        except ImportError:  # pragma: no cover - not the Ray we know
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
    ``ds``; the callbacks travel with the dataset to whatever process runs it.

    Args:
        ds: the dataset.
        udf: the callable class instance given to ``map_batches`` whose yields should leave
            its tasks as blocks unchanged (None: Ray shapes every map's blocks).
    """
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
