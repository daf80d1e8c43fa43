"""The per-worker training loop: :func:`run`, called by every Ray Train worker's entry point
(``mmdist.train.entry.train_fn_per_worker``) once its train shard streams.

Read top to bottom: build the model and the DeepSpeed engine, restore the latest checkpoint,
then per epoch stream batches from this worker's Ray Data shard, step, evaluate and checkpoint.
Saving and restoring live in ``checkpointer.py``, metrics and progress lines in ``reporter.py``,
fault injection (a loss wrapper and an after-step hook) in ``faults.py``.

Rules that keep ranks in lock step (a hang in a collective is the worst failure mode):
- every rank runs every encoder on every batch (missing modalities go through the model's
  missing-embedding path, never a Python branch on batch content);
- every rank takes the same number of micro-batches per epoch: Ray Train splits the train set
  into equal shards (``streaming_split(equal=True)``), so the count is known before the epoch
  (:func:`micro_batches_per_rank`) and no collective is spent per batch; only an epoch resumed
  mid-way (ranks then skip different consumed samples) agrees batch by batch (`_all_have`);
- evaluation feeds a throw-away batch to ranks that ran out, so forward passes stay paired under
  ZeRO-3;
- evaluation and checkpoint decisions depend only on the global step.

The hot loop reads nothing back from the device on an ordinary step (on a GPU each read drains
the kernel queue): the training loss is summed on the device and read at log steps, sample ids
come from the CPU copy of the batch, and a step whose gradients are not finite is skipped by
DeepSpeed's optimizer, which counts it in ``engine.skipped_steps`` (:class:`mmdist.train.watch.NonFiniteSteps`).
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from typing import Any

import ray.train
import ray.train.torch
import torch
import torch.distributed as torch_dist

from mmdist.config import Config
from mmdist.console import step_line
from mmdist.data.pipeline import iter_train_batches
from mmdist.data.schema import to_device
from mmdist.data.shards import load_tokenizer
from mmdist.data.torch_batches import iter_torch
from mmdist.tasks import build_metrics
from mmdist.train import checkpoint as ckpt_lib
from mmdist.train.checkpoint import TrainState
from mmdist.train.checkpointer import Checkpointer
from mmdist.train.collapse import ConstantWatch, constant_losses
from mmdist.train.elastic import ResumePlan, schedule_steps, steps_to_run
from mmdist.train.engine import build_engine
from mmdist.train.faults import Faults
from mmdist.train.job import Job
from mmdist.train.reporter import Reporter, at_step
from mmdist.train.watch import NonFiniteSteps, Startup


def micro_batches_per_rank(cfg: Config, train_rows: int, world_size: int) -> int:
    """Micro-batches each rank takes in one epoch: an equal shard of ``train_rows //
    world_size`` rows, its last partial micro-batch dropped."""
    return (train_rows // world_size) // cfg.train.micro_batch_size


def steps_per_epoch(cfg: Config, train_rows: int, world_size: int) -> int:
    """Optimizer steps in one epoch (each rank drops its last partial micro batch)."""
    t = cfg.train
    accum = t.grad_accum_steps if world_size == t.num_workers else 1
    return max(1, micro_batches_per_rank(cfg, train_rows, world_size) // accum)


def total_steps(cfg: Config, train_rows: int, world_size: int) -> int:
    return cfg.train.max_steps or cfg.train.epochs * steps_per_epoch(cfg, train_rows, world_size)


def run(config: dict[str, Any], plan: ResumePlan, shards: dict[str, Any], early: Any,
        marks: dict[str, float]) -> dict[str, Any] | None:
    """Train on this worker. ``config``: as :func:`mmdist.train.entry.train_fn_per_worker`'s;
    ``plan``: the checkpoint to resume from; ``shards``: this worker's ``{"train": its split,
    "val": the whole}``; ``early``: a fresh run's first epoch, already streaming (else None);
    ``marks``: when the entry point started, had imported this module and had connected the
    process group (start-up phases). Returns the final summary on rank 0
    (``Result.return_value``)."""
    cfg, job = Config.from_dict(config["cfg"]), Job.from_dict(config["job"])
    t = cfg.train
    ctx = ray.train.get_context()
    rank, world = ctx.get_world_rank(), ctx.get_world_size()
    device = ray.train.torch.get_device() if t.use_gpu else torch.device("cpu")
    reporter = Reporter(rank, job.tracking_uri, job.mlflow_run_id)

    t_setup = time.perf_counter()
    # the LR schedule's length, planned at the world size the run first started at
    n_total = schedule_steps(t, job.train_rows, plan.schedule_world)
    engine = build_engine(cfg, job.vocab, world, n_total, log=reporter.say,
                          init_dir=job.init_dir, load_universal=plan.universal)
    stage = t.zero_stage_at(world)
    why = (f" (train.zero_stage={t.zero_stage}: one worker has nothing to partition; "
           "train.zero_on_one_worker=true runs it anyway)" if stage != t.zero_stage else "")
    reporter.say(f"DeepSpeed ZeRO-{stage} engine ready on {world} worker(s) in "
                 f"{time.perf_counter() - t_setup:.1f} s{why}; {n_total} optimizer steps to run")
    engine_ready = time.time()
    checkpointer = Checkpointer(engine, cfg, job, rank, world, reporter)
    state = checkpointer.restore(plan)
    state.schedule_world = plan.schedule_world
    startup = Startup(job, marks, engine_ready, time.time())

    faults = Faults.parse(job.faults, job.storage, rank)
    tokenizer = load_tokenizer(job.data_dir)  # BLEU scores the words it decodes to
    train_shard, val_shard = shards["train"], shards["val"]
    per_epoch = steps_per_epoch(cfg, job.train_rows, world)
    per_rank = micro_batches_per_rank(cfg, job.train_rows, world)
    n_total = steps_to_run(n_total, total_steps(cfg, job.train_rows, world), t,
                           state.global_step, state.epoch, per_epoch)
    eval_every, ckpt_every = t.eval_every or per_epoch, t.checkpoint_every or per_epoch
    bad_steps = NonFiniteSteps(t.max_bad_steps, reporter.say, engine.skipped_steps)
    train_log = _TrainLossLog(t.log_every, n_total, device, reporter, state.global_step)
    watch = ConstantWatch(constant_losses(cfg, job.labels), reporter.say,
                          lambda v: _mean_across_ranks(v, device))
    last_metrics: dict[str, float] = {}
    ledger: list[int] = []  # sample ids this rank consumed in the epoch, in order
    t_start = time.perf_counter()

    while state.global_step < n_total and (t.max_steps or state.epoch < t.epochs):
        skip, state.consumed = state.consumed, set()
        ledger = sorted(skip)  # consumed before a restart still count for this epoch
        steps_before = state.global_step
        engine.train()
        batches = (early if early is not None and state.epoch == 0 and not skip else
                   iter_train_batches(train_shard, t.micro_batch_size, t.seed, state.epoch))
        early = None
        if skip:  # resumed mid-epoch: what is left differs by rank, so ranks agree per batch
            cpu_batches = _all_have(_skip_consumed(batches, skip, t.micro_batch_size), device)
        else:
            cpu_batches = _exactly(batches, per_rank, rank, job.train_rows, world)
        for cpu_batch in cpu_batches:
            ids = cpu_batch["sample_id"].tolist()  # from the CPU copy: no device sync
            batch = to_device(cpu_batch, device)
            out = engine(batch)
            loss = faults.loss(out["loss"])
            engine.backward(loss)
            engine.step()  # skips (and counts) a step whose gradients are not finite
            watch.add(out)
            ledger.extend(ids)
            state.order_hash = ckpt_lib.update_order_hash(state.order_hash, ids)
            train_log.add(loss)
            if engine.global_steps == state.global_step:
                continue  # inside a gradient-accumulation window
            state.global_step = engine.global_steps
            bad_steps.after_step(engine.skipped_steps, state)
            faults.after_step(state.global_step)
            startup.first_step(reporter.note)  # the summary has it too

            if train_log.due(state.global_step):
                last_metrics.update(train_log.log(engine, state))
            if state.global_step >= n_total:
                break  # the final evaluation and checkpoint follow the loop
            do_eval = state.global_step % eval_every == 0
            do_ckpt = state.global_step % ckpt_every == 0
            if do_eval:
                last_metrics.update(_evaluate(engine, cfg, val_shard, device, rank, world,
                                                 tokenizer))
                reporter.say("eval " + _fmt(last_metrics))
                reporter.log(_only_val(last_metrics), state.global_step)
            if do_ckpt:
                checkpointer.save(state, ledger, last_metrics)
            elif do_eval:
                reporter.report(at_step(last_metrics, state))
        else:  # the epoch's data ran out
            if state.global_step == steps_before and not skip:
                raise RuntimeError(
                    f"epoch {state.epoch} produced no optimizer step: {job.train_rows} train "
                    f"rows over {world} workers is less than one batch "
                    f"(train.micro_batch_size={t.micro_batch_size})")
            watch.end_epoch(state.epoch)
            state.epoch += 1
            ledger = []  # the new epoch has consumed nothing yet (the final checkpoint says so)

    # Final evaluation and the consolidated model, in the last checkpoint.
    last_metrics.update(_evaluate(engine, cfg, val_shard, device, rank, world,
                                                 tokenizer))
    reporter.say("final eval " + _fmt(last_metrics))
    reporter.log(_only_val(last_metrics), state.global_step)
    checkpointer.save(state, ledger, last_metrics, final=True)  # flushes rank 0's MLflow first
    if rank != 0:
        return None
    return {"global_step": state.global_step, "metrics": _only_val(last_metrics),
            "train_loss": last_metrics.get("train_loss"),
            "bad_steps_total": state.bad_steps_total, "resumes": state.resumes,
            "train_seconds": time.perf_counter() - t_start,
            "startup_seconds": startup.total, "startup_phases": startup.phases,
            "mlflow_failed_flushes": reporter.failed_flushes,
            # metric values MLflow did not take (server down): the driver delivers them
            "mlflow_pending": reporter.pending()}


# ---- helpers of the loop -----------------------------------------------------------------


class _TrainLossLog:
    """The training loss since the last log step (mean over micro-batches, then over ranks) and
    the steps per second, printed and sent to MLflow every ``train.log_every`` steps and at the
    last step."""

    def __init__(self, every: int, n_total: int, device: torch.device, reporter: Reporter,
                 step: int):
        self.every, self.n_total, self.device, self.reporter = every, n_total, device, reporter
        self._restart(step)

    def _restart(self, step: int) -> None:
        self.loss_sum: torch.Tensor | float = 0.0
        self.loss_n: torch.Tensor | float = 0.0
        self.since, self.since_step = time.perf_counter(), step

    def add(self, loss: torch.Tensor) -> None:
        """Sum the finite losses on the device: read (one sync) only at a log step."""
        loss = loss.detach().float()
        finite = torch.isfinite(loss)
        self.loss_sum = self.loss_sum + torch.where(finite, loss, 0.0)
        self.loss_n = self.loss_n + finite.float()

    def due(self, step: int) -> bool:
        return step % self.every == 0 or step == self.n_total

    def log(self, engine, state: TrainState) -> dict[str, float]:
        """Report the window that ends at ``state.global_step`` (a collective) and start the
        next; returns ``train_loss`` and ``lr``."""
        step = state.global_step
        n = float(self.loss_n)
        avg = _mean_across_ranks(float(self.loss_sum) / n if n else float("nan"), self.device)
        rate = (step - self.since_step) / max(time.perf_counter() - self.since, 1e-9)
        lr = engine.get_lr()[0]
        self.reporter.say(step_line(step, self.n_total, state.epoch, avg, lr, rate))
        self.reporter.log({"train_loss": avg, "lr": lr, "steps_per_s": rate}, step)
        self._restart(step)
        return {"train_loss": avg, "lr": lr}


def _fmt(metrics: dict[str, float]) -> str:
    return "  ".join(f"{k} {v:.4f}" for k, v in sorted(metrics.items()) if k.startswith("val_"))


def _only_val(metrics: dict[str, float]) -> dict[str, float]:
    return {k: float(v) for k, v in metrics.items() if k.startswith("val_")}


def _dist():
    return torch_dist if torch_dist.is_available() and torch_dist.is_initialized() else None


def _reduce(value: float, device: torch.device, op: str) -> float:
    dist = _dist()
    if dist is None:
        return value
    x = torch.tensor([value], dtype=torch.float64, device=device)
    dist.all_reduce(x, op={"sum": dist.ReduceOp.SUM, "min": dist.ReduceOp.MIN,
                           "max": dist.ReduceOp.MAX}[op])
    return float(x.item())


def _mean_across_ranks(value: float, device: torch.device) -> float:
    dist = _dist()
    return _reduce(value, device, "sum") / (dist.get_world_size() if dist else 1)


def _all_have(batches: Iterator[dict], device: torch.device) -> Iterator[dict]:
    """Yield batches while every rank has one; stop all ranks together when one runs out (a
    collective per batch: only for an epoch resumed mid-way)."""
    it = iter(batches)
    while True:
        batch = next(it, None)
        if _reduce(1.0 if batch is not None else 0.0, device, "min") == 0:
            return
        yield batch


def _exactly(batches: Iterator[dict], n: int, rank: int, train_rows: int,
             world: int) -> Iterator[dict]:
    """The first ``n`` batches of this rank's equal shard, then the rest drained (at most a
    dropped partial batch) so the next epoch starts clean.

    Raises:
        RuntimeError: the shard held fewer; the other ranks would wait in a collective, so this
            rank fails the run at once instead.
    """
    it = iter(batches)
    for i in range(n):
        batch = next(it, None)
        if batch is None:
            raise RuntimeError(
                f"rank {rank}'s train shard ran out after {i} of {n} micro-batches "
                f"({train_rows} train rows // {world} workers // micro batch); the shards "
                "changed since the run planned its epoch")
        yield batch
    for _ in it:
        pass


def _skip_consumed(batches: Iterator[dict], skip: set[int], batch_size: int) -> Iterator[dict]:
    """Drop samples already consumed in this epoch before a restart, re-batching the rest."""
    if not skip:
        yield from batches
        return
    skip_t = torch.tensor(sorted(skip), dtype=torch.int64)
    buffer: list[dict] = []
    n = 0
    for batch in batches:
        keep = ~torch.isin(batch["sample_id"], skip_t)
        if not bool(keep.any()):
            continue
        buffer.append({k: v[keep] for k, v in batch.items()})
        n += int(keep.sum())
        while n >= batch_size:
            merged = {k: torch.cat([b[k] for b in buffer]) for k in buffer[0]}
            yield {k: v[:batch_size] for k, v in merged.items()}
            rest = {k: v[batch_size:] for k, v in merged.items()}
            n -= batch_size
            buffer = [rest] if n else []
    # a partial tail is dropped, as every epoch drops its last partial batch


def _evaluate(engine, cfg: Config, val_shard, device: torch.device, rank: int,
              world: int, tokenizer: Any = None) -> dict[str, float]:
    """Evaluate on the val split: each rank feeds its batches to the tasks' torchmetrics, and
    ``compute()`` reduces them across ranks (torchmetrics' own sync).

    Every rank streams the whole (unsplit, order-preserving) val dataset in canonical batches of
    ``train.micro_batch_size``; batch k is computed by rank k % world. Batch composition is thus
    the same at any world size and in ``Predictor.evaluate_dir``, so a registered model scores
    the val split exactly as the run reported. Ranks without a batch in the last round run a
    throw-away forward so ZeRO-3 parameter gathers stay paired.
    """
    engine.eval()
    metrics = build_metrics(cfg, engine.module.vocab, tokenizer).to(device)
    it = iter_torch(val_shard, batch_size=cfg.train.micro_batch_size, drop_last=False)
    group: list[dict] = []
    seen = 0

    def run_group(group: list[dict]) -> int:
        mine = group[rank] if rank < len(group) else None
        out = engine(to_device(mine if mine is not None else group[0], device), mode="eval")
        if mine is None:
            return 0
        metrics.update({k: v.detach() for k, v in out.items() if v.ndim >= 1})
        return 1

    with torch.no_grad():
        for batch in it:
            group.append(batch)
            if len(group) == world:
                seen += run_group(group)
                group = []
        if group:
            seen += run_group(group)
        if _reduce(float(seen), device, "sum") == 0:
            raise RuntimeError("the val split is empty; set data.val_fraction > 0")
        result = metrics.compute()
    engine.train()
    return result
