"""What every Ray Train worker runs: ``train_fn_per_worker(config)``.

Light on purpose (no torch, no DeepSpeed, no model code at import): a fresh run's worker opens
its data (:func:`mmdist.data.pipeline.worker_shards`: the driver split the train dataset, and
the split's coordinator started beside Ray Train's controller) and starts the first epoch
streaming before it imports the training loop (:mod:`mmdist.train.loop`: torch, DeepSpeed, the
model). Once every rank asks for batches the coordinator starts the read tasks: fresh processes
that take seconds to start on a small node, now beside this worker's imports and engine build
instead of after them (``startup_phases`` of ``mmdist train``). Then the worker connects its
process group (:func:`mmdist.train.backend.init_process_group`) and trains.
"""

from __future__ import annotations

import time
from typing import Any


def train_fn_per_worker(config: dict[str, Any]) -> dict[str, Any] | None:
    """Ray Train entrypoint. ``config = {"cfg": Config.to_dict(), "job": Job.to_dict(),
    "data": worker_shards(...)}`` (:class:`mmdist.train.job.Job`: what the driver resolved;
    ``data``: each rank's splits). Returns the final summary on rank 0
    (``Result.return_value``)."""
    entered = time.time()
    import ray.train

    from mmdist.data.pipeline import iter_train_batches, open_worker_shards
    from mmdist.data.torch_batches import FirstBatchAhead
    from mmdist.train.elastic import plan_resume
    from mmdist.train.job import Job

    job = Job.from_dict(config["job"])
    # the raw values: validating the Config loads the tasks, which import torch
    t = config["cfg"]["train"]
    ctx = ray.train.get_context()
    plan = plan_resume(job.storage, ctx.get_world_size())
    shards = open_worker_shards(config["data"][ctx.get_world_rank()])
    train_shard = shards["train"]
    # a fresh run's first epoch streams from now on; a resumed one skips what it consumed
    early = (FirstBatchAhead(iter_train_batches(train_shard, t["micro_batch_size"], t["seed"], 0))
             if plan.checkpoint is None else None)

    from mmdist.train import loop
    from mmdist.train.backend import init_process_group

    imported = time.time()
    init_process_group()
    marks = {"entered": entered, "imported": imported, "connected": time.time()}
    return loop.run(config, plan, shards, early, marks)
