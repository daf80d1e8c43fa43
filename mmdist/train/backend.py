"""Ray Train's torch backend without torch in Ray Train's controller or before the train function.

Ray Train's ``TorchConfig`` lives in ``ray.train.torch``, which imports torch: the controller
unpickles it with its arguments (about 1.5 CPU-s of a fresh process, on the critical path of
every run's start), and its backend initializes the process group on each worker before the
train function starts, so a worker imports torch before it can ask for its dataset shard.

:class:`ProcessGroupConfig` does what that backend does for mmdist, in two halves:

- the controller half (:class:`ProcessGroupBackend`, no torch): it finds rank 0's address and a
  free port and gives every worker the ``torch.distributed`` environment (``MASTER_ADDR``,
  ``MASTER_PORT``, ``RANK``, ``LOCAL_RANK``, ``WORLD_SIZE``, ``LOCAL_WORLD_SIZE``,
  ``NODE_RANK``), as Ray's backend does with ``init_method="env"``; at the end it destroys the
  workers' process groups as Ray's does;
- the worker half (:func:`init_process_group`): the train function connects the process group
  from that environment itself, after it has started its data shard streaming
  (``mmdist.train.entry``), so Ray Data's coordinator and read tasks start while the worker
  imports torch and DeepSpeed.

The backend uses only public (or DeveloperAPI) Ray Train names; :func:`light_backend_reason`
says when mmdist falls back to Ray's ``TorchTrainer`` (another Ray than the one this was read
against), and :func:`init_process_group` leaves a process group Ray already made alone. The one
private piece, leaving the placement-group cleaner out of a run whose job ends with it
(:func:`trainer_and_backend`), applies only on that Ray and keeps the cleaner when the name
it filters is gone.
"""

from __future__ import annotations

import functools
import logging
import os
import socket
from dataclasses import dataclass
from typing import Any

import ray
from ray.train.backend import Backend, BackendConfig

# The Ray (major.minor) whose TorchConfig backend this mirrors; another Ray gets TorchTrainer.
SUPPORTED_RAY = "2.60"
# seconds a collective may wait, as Ray's TorchConfig.timeout_s
TIMEOUT_S = 1800
# what the process-group shutdown at the end of a run may take (Ray's default)
SHUTDOWN_TIMEOUT_S = 30

log = logging.getLogger(__name__)


def light_backend_reason() -> str | None:
    """None when :class:`ProcessGroupConfig` applies, else why Ray's TorchTrainer is used."""
    installed = ".".join(ray.__version__.split(".")[:2])
    if installed != SUPPORTED_RAY:
        return f"Ray {ray.__version__} is installed; mmdist's backend mirrors Ray {SUPPORTED_RAY}"
    try:
        from ray.train.v2._internal.constants import is_v2_enabled
        from ray.train.v2.api.data_parallel_trainer import DataParallelTrainer  # noqa: F401
    except ImportError as e:
        return f"Ray {ray.__version__} lacks Ray Train V2's DataParallelTrainer ({e})"
    if not is_v2_enabled():
        return "RAY_TRAIN_V2_ENABLED=0 selects Ray Train V1"
    return None


class _NoContext:
    """The train function's context: none (:func:`init_process_group` sets a GPU worker's device)."""

    def __enter__(self) -> None:
        return None

    def __exit__(self, *exc: Any) -> bool:
        return False


@dataclass
class ProcessGroupConfig(BackendConfig):
    """``backend``: ``gloo`` (CPU) or ``nccl`` (GPU), as ``torch.distributed`` names them."""

    backend: str = "gloo"
    timeout_s: int = TIMEOUT_S

    @property
    def backend_cls(self) -> type:
        return ProcessGroupBackend

    @property
    def train_func_context(self) -> type:
        return _NoContext

    @property
    def framework(self) -> Any:
        try:  # what Ray's state export files the run under; absent: "unspecified"
            from ray.train.v2._internal.util import TrainingFramework
            return TrainingFramework.TORCH
        except ImportError:
            return None

    def to_dict(self) -> dict[str, Any]:
        return {"backend": self.backend, "init_method": "env", "timeout_s": self.timeout_s}


def _address_and_port() -> tuple[str, int]:
    """This node's IP and a free TCP port on it (runs on rank 0)."""
    addr = ray.util.get_node_ip_address()
    family = socket.AF_INET6 if ":" in addr else socket.AF_INET
    with socket.socket(family, socket.SOCK_STREAM) as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        s.bind(("", 0))
        return addr, s.getsockname()[1]


def _set_env(addr: str, port: int, backend: str, timeout_s: int) -> None:
    """The torch.distributed environment of this worker (runs on every worker)."""
    ctx = ray.train.get_context()
    os.environ.update({
        "MASTER_ADDR": addr, "MASTER_PORT": str(port),
        "RANK": str(ctx.get_world_rank()), "WORLD_SIZE": str(ctx.get_world_size()),
        "LOCAL_RANK": str(ctx.get_local_rank()),
        "LOCAL_WORLD_SIZE": str(ctx.get_local_world_size()),
        "NODE_RANK": str(ctx.get_node_rank()),
        "MMDIST_DIST_BACKEND": backend, "MMDIST_DIST_TIMEOUT_S": str(timeout_s)})


def _destroy_process_group() -> None:
    import torch.distributed as dist  # the worker has imported torch by now

    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()


class ProcessGroupBackend(Backend):
    # as Ray's torch backend: every worker on a node sees the node's GPUs, and
    # ray.train.torch.get_device() picks its own by local rank
    share_cuda_visible_devices = True

    def on_start(self, worker_group: Any, backend_config: ProcessGroupConfig) -> None:
        addr, port = worker_group.execute_single(0, _address_and_port)
        worker_group.execute(_set_env, addr=addr, port=port, backend=backend_config.backend,
                             timeout_s=backend_config.timeout_s)

    def on_shutdown(self, worker_group: Any, backend_config: ProcessGroupConfig) -> None:
        if len(worker_group) < 2:  # as Ray's: a 1-rank group ends with its process
            return
        futures = worker_group.execute_async(_destroy_process_group)
        try:
            ray.get(futures, timeout=SHUTDOWN_TIMEOUT_S)
        except ray.exceptions.GetTimeoutError:
            log.warning(
                "torch process group shutdown timed out after %s s", SHUTDOWN_TIMEOUT_S)


def init_process_group() -> None:
    """Connect this worker's process group from the environment :class:`ProcessGroupBackend`
    set (a worker of Ray's own TorchTrainer already has one: left alone)."""
    import datetime

    import torch.distributed as dist

    if dist.is_initialized() or "MMDIST_DIST_BACKEND" not in os.environ:
        return
    backend = os.environ["MMDIST_DIST_BACKEND"]
    if backend == "nccl":
        import torch
        from ray.train.torch import get_device

        # as Ray's TorchConfig: this worker's GPU is the current device from the start
        torch.cuda.set_device(get_device())
        if not {"TORCH_NCCL_ASYNC_ERROR_HANDLING", "TORCH_NCCL_BLOCKING_WAIT"} & set(os.environ):
            # as Ray's backend: a timed-out NCCL collective fails the worker instead of hanging
            os.environ["TORCH_NCCL_ASYNC_ERROR_HANDLING"] = "1"
    dist.init_process_group(
        backend=backend, init_method="env://",
        rank=int(os.environ["RANK"]), world_size=int(os.environ["WORLD_SIZE"]),
        timeout=datetime.timedelta(seconds=int(os.environ["MMDIST_DIST_TIMEOUT_S"])))


def trainer_and_backend(use_gpu: bool, placement_group_cleaner: bool = True
                        ) -> tuple[type, dict[str, Any]]:
    """Ray Train's ``DataParallelTrainer`` with mmdist's torch-free process-group backend
    (:mod:`mmdist.train.backend`), or Ray's ``TorchTrainer`` on a Ray it was not read against
    (said once in the log).

    ``placement_group_cleaner=False``: without Ray Train's placement-group cleaner, for a run
    whose driver's connection to Ray ends with the run (`mmdist train`). The cleaner is a
    detached actor per run (one more process importing Ray Train, ~2 CPU-s of a small node's
    start) that removes the run's placement group if the controller dies while its driver
    lives on, as a sweep's driver does when ASHA stops a trial. Ray removes a placement group
    an actor made once that actor and its job have both ended, so when the job ends with the
    run there is nothing left for the cleaner to do.
    """
    reason = light_backend_reason()
    if reason is None:
        config = ProcessGroupConfig(backend="nccl" if use_gpu else "gloo")
        return _trainer_class(placement_group_cleaner), {"backend_config": config}
    from ray.train.torch import TorchTrainer

    global _FALLBACK_SAID
    if not _FALLBACK_SAID:
        _FALLBACK_SAID = True
        log.warning("mmdist: %s; training with Ray's TorchTrainer (correct; its controller and "
                    "workers import torch before the train function, a slower start)", reason)
    return TorchTrainer, {}


_FALLBACK_SAID = False


@functools.cache
def _trainer_class(placement_group_cleaner: bool) -> type:
    """``DataParallelTrainer`` whose default callbacks leave out Ray Train's dataset callback
    (mmdist hands each worker its data itself, :func:`mmdist.data.pipeline.worker_shards`;
    with no datasets the callback would still start a dataset-manager actor, ~1.6 CPU-s) and,
    with ``placement_group_cleaner=False``, the placement-group cleaner. Both callbacks are
    Ray Train's private classes, named on the Ray of :data:`SUPPORTED_RAY` only: a Ray that
    moved them keeps them (correct, a slower start)."""
    from ray.train.v2.api.data_parallel_trainer import DataParallelTrainer

    try:
        from ray.train.v2._internal.callbacks.datasets import DatasetsCallback
        from ray.train.v2._internal.callbacks.placement_group_callback import (
            PlacementGroupCleanerCallback,
        )
    except ImportError:
        return DataParallelTrainer
    left_out = (DatasetsCallback,) + (() if placement_group_cleaner else
                                      (PlacementGroupCleanerCallback,))

    class MmdistTrainer(DataParallelTrainer):
        def _create_default_callbacks(self) -> list:
            return [c for c in super()._create_default_callbacks()
                    if not isinstance(c, left_out)]

    return MmdistTrainer
