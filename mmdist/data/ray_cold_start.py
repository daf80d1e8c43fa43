"""A Ray Data execution callback that lets every execution use all CPUs from its first step.

Ray Data 2.60 learns how many CPUs an execution may use from the autoscaling coordinator
actor. Its client returns the last cached answer and asks again in the background, and the
first answer of each execution is empty (Ray's own comment in ``DefaultClusterAutoscalerV2``
calls it the cold start). ``ResourceManager.get_global_limits`` then caches those zero limits
for ``GLOBAL_LIMITS_UPDATE_INTERVAL_S`` (1 s). With zero limits the resource budget refuses
every task and only the executor's liveness rule (one task when nothing runs) keeps data
flowing: for the first second of every execution, and so of every training epoch, one
read+preprocess task runs on a 2-CPU node instead of two (measured with ``mmdist bench
ingest``: the first ~1.0 s of a 2 s stream ran one task at a time).

:class:`RefreshLimitsUntilKnown` asks again after every scheduling step while the limits are
still zero; the coordinator answers within milliseconds, so both CPUs are used from the
first tasks. Once the limits are known it does nothing. It lives in a module of its own
(numpy-free, torch-free) because the process that executes the dataset imports it: the
driver for ``iter_batches``, Ray Train's split coordinator actor for ``get_dataset_shard``.
If Ray's internals change it does nothing at all.
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


def add_to(ds: Any) -> Any:
    """Register :class:`RefreshLimitsUntilKnown` on ``ds``'s own DataContext (not the global
    one) and return ``ds``; the callback travels with the dataset to whatever process runs it."""
    classes = ds.context.custom_execution_callback_classes
    if RefreshLimitsUntilKnown not in classes:
        classes.append(RefreshLimitsUntilKnown)
    return ds
