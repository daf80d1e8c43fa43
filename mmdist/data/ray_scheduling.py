"""Ray Data execution callbacks that keep every CPU busy on short read+preprocess tasks.

They fix latencies of Ray Data 2.60's executor that cost little on a large cluster with long
tasks and a lot on a small node whose tasks take a fraction of a second (one shard file of
realistic rows, ~0.4 s): measured with ``mmdist bench ingest`` on 2 CPUs.

1. Cold start. Ray Data learns how many CPUs an execution may use from the autoscaling
   coordinator actor. Its client returns the last cached answer and asks again in the
   background, and the first answer of each execution is empty (Ray's own comment in
   ``DefaultClusterAutoscalerV2`` calls it the cold start). ``ResourceManager.get_global_limits``
   then caches those zero limits for 1 s. With zero limits only the executor's liveness rule
   (one task when nothing runs) keeps data flowing: for the first second of every execution,
   and so of every training epoch, one task ran on a 2-CPU node instead of two.
   :class:`RefreshLimitsUntilKnown` asks again after every scheduling step while the limits
   are still zero; the coordinator answers within milliseconds.

2. Completion polling. Each scheduling step waits in ``ray.wait(all running tasks,
   timeout=0.1 s)`` and returns at the timeout unless every task finished, and a task's
   output block and its end of stream are often picked up one step apart. A worker whose task
   had finished therefore idled 0.15-0.4 s before the executor noticed and sent the next one:
   tasks ran 67-69 % of 2 CPUs x time. :class:`PollTasksOften` shortens that wait to
   :data:`POLL_S` in the process that runs the executor (measured: about 800 -> 1,000
   samples/s over a 4,096-row epoch at one task per CPU; the driver's extra scheduling steps
   cost a few per cent of one CPU).

3. Blocks as they are made. A map's output buffer holds what its function yields until it
   reaches ``DataContext.target_max_block_size`` (128 MiB), so a task that preprocesses a whole
   shard file in chunks still hands over one block when it ends, and the first batch of every
   execution (every training epoch) waited for a whole shard: 0.9-1.0 s for 256 rows at two
   tasks per CPU, ~4 s for `mmdist prepare`'s 1,000-row shards. Lowering the context's target
   would also cut the Parquet read into blocks of a few rows (measured: +60 % CPU).
   :class:`StreamBlocks` lowers it on the read+preprocess operator only, to about
   :data:`BLOCK_ROWS` rows of output (``CHUNK_SHARE`` x the bytes in the dataset's context
   under :data:`BLOCK_BYTES_KEY`), so blocks leave the task while the rest of the shard is
   still being preprocessed. Measured (``--workers 4``, 2 CPUs): first batch 0.9 -> 0.5 s
   with 256-row shards, 4.3 -> 0.7 s with 1,024-row shards; samples/s over the epoch the same
   within noise. Not smaller: each block costs the driver and raylet ~5 ms of CPU; per 4,096
   rows 32-row blocks cost 0.7 CPU-s more than whole-shard blocks, 128-row blocks 0.3.

The callbacks live in a module of their own (numpy-free, torch-free) because the process that
executes the dataset imports it: the driver for ``iter_batches``, Ray Train's split
coordinator actor for ``get_dataset_shard``. If Ray's internals change they do nothing.
"""

from __future__ import annotations

import time
from typing import Any

from ray.data._internal.execution.execution_callback import ExecutionCallback

# Seconds each scheduling step waits for running tasks (Ray Data's own: 0.1).
POLL_S = 0.02


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


class PollTasksOften(ExecutionCallback):
    """Make the executor's per-step wait for task completions :data:`POLL_S` instead of 0.1 s.

    The wait is a module constant of Ray Data's ``streaming_executor_state``, read on every
    step, so this sets it for every execution in this process (all of them are mmdist's: the
    driver or Ray Train's split coordinator). Never lengthens a shorter wait someone set.
    """

    def before_execution_starts(self, executor: Any) -> None:
        try:
            from ray.data._internal.execution import streaming_executor_state as ses
        except ImportError:  # pragma: no cover - not the Ray we know
            return
        current = getattr(ses, "WAIT_FOR_TASK_COMPLETION_TIMEOUT_S", None)
        if isinstance(current, (int, float)) and current > POLL_S:
            ses.WAIT_FOR_TASK_COMPLETION_TIMEOUT_S = POLL_S


# DataContext config key: {UDF class name: bytes of BLOCK_ROWS output rows} (set by `add_to`).
BLOCK_BYTES_KEY = "mmdist.block_bytes"
# Rows per block the read+preprocess operator emits (at least one preprocess chunk).
BLOCK_ROWS = 128
# Target = this share of the bytes: a block is emitted once the chunks yielded exceed it, and
# Ray slices only blocks over 1.5x the target, so whole chunks are never cut in pieces.
CHUNK_SHARE = 0.75


class StreamBlocks(ExecutionCallback):
    """Give each ``map_batches`` operator named in the dataset's context (by its UDF's class,
    fused with the read or not) a target block size of about :data:`BLOCK_ROWS` rows, so its
    blocks leave the task as they are made (see the module). Other operators, and the Parquet
    read inside the fused task, keep the context's target."""

    def before_execution_starts(self, executor: Any) -> None:
        ctx = getattr(executor, "_data_context", None)
        sizes = ctx.get_config(BLOCK_BYTES_KEY) if hasattr(ctx, "get_config") else None
        if not sizes:
            return
        for op in getattr(executor, "_topology", None) or ():
            name = getattr(op, "name", "")
            size = next((b for udf, b in sizes.items() if f"MapBatches({udf})" in name), None)
            if size and hasattr(op, "override_target_max_block_size"):
                op.override_target_max_block_size(max(1, int(CHUNK_SHARE * size)))


CALLBACKS = (RefreshLimitsUntilKnown, PollTasksOften, StreamBlocks)


def add_to(ds: Any, udf: Any = None, block_bytes: int | None = None) -> Any:
    """Register :data:`CALLBACKS` on ``ds``'s own DataContext (not the global one) and return
    ``ds``; the callbacks travel with the dataset to whatever process runs it.

    Args:
        ds: the dataset.
        udf: the callable class instance given to ``map_batches`` whose blocks should stream.
        block_bytes: bytes of the blocks that map should emit (whole preprocess chunks of
            about BLOCK_ROWS rows); None leaves them as Ray makes them.
    """
    classes = ds.context.custom_execution_callback_classes
    for cls in CALLBACKS:
        if cls not in classes:
            classes.append(cls)
    if udf is not None and block_bytes:
        sizes = dict(ds.context.get_config(BLOCK_BYTES_KEY) or {})
        sizes[type(udf).__name__] = int(block_bytes)
        ds.context.set_config(BLOCK_BYTES_KEY, sizes)
    return ds
