"""The per-worker training loop: ``train_fn_per_worker(config)``, run by every Ray Train worker.

Read top to bottom: build the model and the DeepSpeed engine, restore the latest checkpoint,
then per epoch stream batches from this worker's Ray Data shard, step, evaluate and checkpoint.

Rules that keep ranks in lock step (a hang in a collective is the worst failure mode):
- every rank runs every encoder on every batch (missing modalities go through the model's
  missing-embedding path, never a Python branch on batch content);
- ranks agree each step whether all of them still have a batch (`_all_have`), and evaluation
  feeds a throw-away batch to ranks that ran out, so forward passes stay paired under ZeRO-3;
- evaluation and checkpoint decisions depend only on the global step.
"""

from __future__ import annotations

import json
import shutil
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch

from mmdist.config import Config
from mmdist.train import checkpoint as ckpt_lib
from mmdist.train.checkpoint import TrainState


def steps_per_epoch(cfg: Config, train_rows: int, world_size: int) -> int:
    """Optimizer steps in one epoch (each rank drops its last partial micro batch)."""
    t = cfg.train
    micro_batches = (train_rows // world_size) // t.micro_batch_size
    accum = cfg.resolve()["grad_accum_steps"] if world_size == t.num_workers else 1
    return max(1, micro_batches // accum)


def total_steps(cfg: Config, train_rows: int, world_size: int) -> int:
    return cfg.train.max_steps or cfg.train.epochs * steps_per_epoch(cfg, train_rows, world_size)


def train_fn_per_worker(config: dict[str, Any]) -> dict[str, Any] | None:
    """Ray Train entrypoint. ``config = {"cfg": Config.to_dict(), "job": {...}}`` where job holds
    what the driver resolved: data_dir, train_rows, vocab, tracking_uri, mlflow_run_id,
    run_name. Returns the final summary on rank 0 (``Result.return_value``)."""
    import ray.train

    from mmdist.data.pipeline import iter_train_batches
    from mmdist.train.engine import build_engine

    cfg = Config.from_dict(config["cfg"])
    job = config["job"]
    ctx = ray.train.get_context()
    rank, world = ctx.get_world_rank(), ctx.get_world_size()
    device = ray.train.torch.get_device() if cfg.train.use_gpu else torch.device("cpu")
    t = cfg.train

    t_setup = time.perf_counter()
    vocab = job["vocab"]
    n_total = total_steps(cfg, job["train_rows"], world)
    engine = build_engine(cfg, vocab, world, n_total, log=lambda m: _say(rank, m))
    _say(rank, f"DeepSpeed ZeRO-{t.zero_stage} engine ready on {world} worker(s) in "
               f"{time.perf_counter() - t_setup:.1f} s; {n_total} optimizer steps to run")

    state = _restore(engine, cfg, job["storage"], rank, world)

    mlflow_log = None
    if rank == 0 and job.get("mlflow_run_id"):
        from mmdist.tracking import MetricsLogger

        mlflow_log = MetricsLogger(job["tracking_uri"], job["mlflow_run_id"], fail_fast=True)
        mlflow_log.add(state.mlflow_pending)  # what the crashed attempt could not deliver

    from mmdist.train.faults import Faults

    faults = Faults.parse(job.get("faults", {}), job.get("storage", "."))
    train_shard = ray.train.get_dataset_shard("train")
    val_shard = ray.train.get_dataset_shard("val")
    eval_every = t.eval_every or steps_per_epoch(cfg, job["train_rows"], world)
    ckpt_every = t.checkpoint_every or steps_per_epoch(cfg, job["train_rows"], world)
    last_metrics: dict[str, float] = {}
    consecutive_bad = batches_seen = 0
    loss_sum, loss_n, t_log, step_at_log = 0.0, 0, time.perf_counter(), state.global_step
    t_start = time.perf_counter()

    def report(metrics: dict[str, float], save: bool, final: bool = False) -> None:
        metrics = {**metrics, "global_step": state.global_step, "epoch": state.epoch}
        if not save:
            ray.train.report(metrics)
            return
        with tempfile.TemporaryDirectory(prefix="mmdist-ckpt-") as tmp:
            engine.save_checkpoint(tmp, tag=ckpt_lib.DS_TAG)
            ckpt_lib.write_ledger(tmp, rank, state.epoch, epoch_ledger, state.order_hash)
            if final:
                _save_consolidated(engine, cfg, vocab, job, Path(tmp) / ckpt_lib.MODEL_DIR, rank)
            if rank == 0:
                if mlflow_log:  # metrics up to this step reach MLflow or the checkpoint
                    mlflow_log.flush()
                    state.mlflow_pending = [list(r) for r in mlflow_log.pending()]
                ckpt_lib.write_state(tmp, state, {
                    "run_name": job["run_name"], "world_size": world,
                    "zero_stage": t.zero_stage, "config": cfg.to_dict(), "metrics": metrics})
                shutil.copytree(Path(job["data_dir"]) / "tokenizer", Path(tmp) / "tokenizer")
            ckpt_lib.write_file_list(tmp, rank)  # last: its presence marks this rank complete
            ray.train.report(metrics, checkpoint=ray.train.Checkpoint.from_directory(tmp))

    epoch_ledger: list[int] = []
    while state.global_step < n_total and (t.max_steps or state.epoch < t.epochs):
        skip, state.consumed = state.consumed, set()
        epoch_ledger = sorted(skip)  # consumed before a restart still count for this epoch
        steps_before = state.global_step
        engine.train()
        batches = iter_train_batches(train_shard, t.micro_batch_size, t.seed, state.epoch)
        for batch in _all_have(_skip_consumed(batches, skip, t.micro_batch_size), device):
            out = engine(batch)
            batches_seen += 1
            loss = faults.loss(out["loss"], batches_seen)
            if not _all_finite(loss):
                consecutive_bad += 1
                state.bad_steps_total += 1
                _say(rank, f"step {state.global_step}: non-finite loss skipped "
                           f"({consecutive_bad} in a row)")
                if consecutive_bad >= t.max_bad_steps:
                    raise FloatingPointError(
                        f"{consecutive_bad} consecutive non-finite losses at step "
                        f"{state.global_step} (train.max_bad_steps={t.max_bad_steps}); lower "
                        "train.lr or check the data. The last good checkpoint is kept.")
                continue
            consecutive_bad = 0
            engine.backward(loss)
            engine.step()
            ids = batch["sample_id"].tolist()
            epoch_ledger.extend(ids)
            state.order_hash = ckpt_lib.update_order_hash(state.order_hash, ids)
            loss_sum += float(loss.detach())
            loss_n += 1
            if engine.global_steps == state.global_step:
                continue  # inside a gradient-accumulation window
            state.global_step = engine.global_steps
            faults.after_step(state.global_step, rank)

            if state.global_step % t.log_every == 0 or state.global_step == n_total:
                avg = _mean_across_ranks(loss_sum / max(1, loss_n), device)
                rate = (state.global_step - step_at_log) / max(time.perf_counter() - t_log, 1e-9)
                lr = engine.get_lr()[0]
                _say(rank, f"step {state.global_step}/{n_total}  epoch {state.epoch}  "
                           f"loss {avg:.4f}  lr {lr:.2e}  {rate:.2f} steps/s")
                if mlflow_log:
                    mlflow_log.log({"train_loss": avg, "lr": lr, "steps_per_s": rate},
                                   state.global_step)
                last_metrics.update(train_loss=avg, lr=lr)
                loss_sum, loss_n, t_log, step_at_log = 0.0, 0, time.perf_counter(), state.global_step

            if state.global_step >= n_total:
                break  # the final evaluation and checkpoint follow the loop
            do_eval = state.global_step % eval_every == 0
            do_ckpt = state.global_step % ckpt_every == 0
            if do_eval:
                last_metrics.update(_evaluate(engine, cfg, val_shard, device, rank, world))
                _say(rank, "eval " + _fmt(last_metrics))
                if mlflow_log:
                    mlflow_log.log(_only_val(last_metrics), state.global_step)
            if do_eval or do_ckpt:
                report(dict(last_metrics), save=do_ckpt)
        else:  # the epoch's data ran out
            if state.global_step == steps_before and not skip:
                raise RuntimeError(
                    f"epoch {state.epoch} produced no optimizer step: {job['train_rows']} train "
                    f"rows over {world} workers is less than one batch "
                    f"(train.micro_batch_size={t.micro_batch_size})")
            state.epoch += 1

    # Final evaluation and the consolidated model, in the last checkpoint.
    last_metrics.update(_evaluate(engine, cfg, val_shard, device, rank, world))
    _say(rank, "final eval " + _fmt(last_metrics))
    if mlflow_log:
        mlflow_log.log(_only_val(last_metrics), state.global_step)
    report(dict(last_metrics), save=True, final=True)  # flushes rank 0's metrics first
    if rank == 0:
        return {"global_step": state.global_step, "metrics": _only_val(last_metrics),
                "train_loss": last_metrics.get("train_loss"),
                "bad_steps_total": state.bad_steps_total, "resumes": state.resumes,
                "train_seconds": time.perf_counter() - t_start,
                "mlflow_failed_flushes": mlflow_log.failed_flushes if mlflow_log else 0,
                # metric values MLflow did not take (server down): the driver delivers them
                "mlflow_pending": mlflow_log.pending() if mlflow_log else []}
    return None


# ---- helpers of the loop -----------------------------------------------------------------


def _restore(engine, cfg: Config, run_dir: str, rank: int, world: int) -> TrainState:
    """Load the newest complete checkpoint of the run folder, if any, into ``engine``.

    Ray's ``get_checkpoint()`` names the newest checkpoint Ray registered; a checkpoint can
    still be incomplete on storage (a node died while uploading, a file was truncated), so the
    run folder is searched for the newest complete one instead and every newer one skipped is
    named with its reason. All ranks read the same folder and so pick the same checkpoint.
    """
    chosen, skipped = ckpt_lib.choose_checkpoint(run_dir)
    for note in skipped:
        _say(rank, f"WARNING: skipping incomplete checkpoint {note}")
    if chosen is None:
        if skipped:
            _say(rank, "WARNING: no complete checkpoint to resume from; starting from step 0")
        return TrainState()
    ckpt_lib.check_resume(chosen, world, cfg.train.zero_stage, cfg.to_dict()["model"])
    engine.load_checkpoint(str(chosen), tag=ckpt_lib.DS_TAG, load_module_strict=True)
    state = ckpt_lib.read_state(chosen, rank)
    if engine.global_steps != state.global_step:
        raise RuntimeError(f"checkpoint mismatch in {chosen}: DeepSpeed is at step "
                           f"{engine.global_steps}, mmdist state at {state.global_step}")
    state.resumes.append({"from_step": state.global_step, "checkpoint": chosen.name,
                          "skipped": skipped})
    _say(rank, f"resumed from {chosen.name} at step {state.global_step} (epoch {state.epoch}, "
               f"{len(state.consumed)} samples of this epoch already consumed)")
    return state


def _say(rank: int, msg: str) -> None:
    if rank == 0:
        # the process's real stdout: Ray Train patches print() to log *and*, once anything has
        # wrapped sys.stdout, print as well, so every line would reach the driver twice
        print(f"[mmdist] {msg}", file=sys.__stdout__ or sys.stdout, flush=True)


def _fmt(metrics: dict[str, float]) -> str:
    return "  ".join(f"{k} {v:.4f}" for k, v in sorted(metrics.items()) if k.startswith("val_"))


def _only_val(metrics: dict[str, float]) -> dict[str, float]:
    return {k: float(v) for k, v in metrics.items() if k.startswith("val_")}


def _to_device(batch: dict[str, torch.Tensor], device: torch.device) -> dict[str, torch.Tensor]:
    return {k: v.to(device, non_blocking=True) if isinstance(v, torch.Tensor) else v
            for k, v in batch.items()}


def _dist():
    import torch.distributed as dist

    return dist if dist.is_available() and dist.is_initialized() else None


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


def _all_finite(loss: torch.Tensor) -> bool:
    ok = 1.0 if bool(torch.isfinite(loss.detach()).all()) else 0.0
    return _reduce(ok, loss.device, "min") > 0


def _all_have(batches: Iterator[dict], device: torch.device) -> Iterator[dict]:
    """Yield batches while every rank has one; stop all ranks together when one runs out."""
    it = iter(batches)
    while True:
        batch = next(it, None)
        if _reduce(1.0 if batch is not None else 0.0, device, "min") == 0:
            return
        yield _to_device(batch, device)


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
              world: int) -> dict[str, float]:
    """Evaluate on the val split; outputs of all ranks are gathered, then scored.

    Every rank streams the whole (unsplit, order-preserving) val dataset in canonical batches of
    ``train.micro_batch_size``; batch k is computed by rank k % world. Batch composition is thus
    the same at any world size and in ``Predictor.evaluate_dir``, so a registered model scores
    the val split exactly as the run reported. Ranks without a batch in the last round run a
    throw-away forward so ZeRO-3 parameter gathers stay paired.
    """
    from mmdist.data.torch_batches import iter_torch
    from mmdist.models.metrics import compute_metrics

    engine.eval()
    outputs: list[dict[str, torch.Tensor]] = []
    it = iter_torch(val_shard, batch_size=cfg.train.micro_batch_size, drop_last=False)
    group: list[dict] = []

    def run_group(group: list[dict]) -> None:
        mine = group[rank] if rank < len(group) else None
        out = engine(_to_device(mine if mine is not None else group[0], device), mode="eval")
        if mine is not None:
            outputs.append({k: v.detach().float().cpu() if v.is_floating_point()
                            else v.detach().cpu() for k, v in out.items() if v.ndim >= 1})

    with torch.no_grad():
        for batch in it:
            group.append(batch)
            if len(group) == world:
                run_group(group)
                group = []
        if group:
            run_group(group)
    engine.train()
    if not outputs and world == 1:
        raise RuntimeError("the val split is empty; set data.val_fraction > 0")
    local = {k: torch.cat([o[k] for o in outputs]) for k in outputs[0]} if outputs else {}
    dist = _dist()
    if dist is not None and world > 1:
        gathered: list[Any] = [None] * world
        dist.all_gather_object(gathered, local)
        parts = [g for g in gathered if g]
        local = {k: torch.cat([p[k] for p in parts]) for k in parts[0]}
    return {k: float(v) for k, v in compute_metrics(cfg.model.task, local).items()}


def _save_consolidated(engine, cfg: Config, vocab: dict, job: dict, out_dir: Path,
                       rank: int) -> None:
    """Consolidate the ZeRO-partitioned fp32 master weights into one safetensors model.

    Every rank takes part (gathering a ZeRO-3 parameter is a collective); rank 0 writes.
    """
    from deepspeed.utils import safe_get_full_fp32_param

    module = engine.module
    state: dict[str, torch.Tensor] = {}
    for name, p in module.named_parameters():
        full = safe_get_full_fp32_param(p)
        if full is None:  # no partitioned master copy (ZeRO-0 fp32, frozen params)
            full = p.detach()
        if rank == 0:
            state[name] = full.detach().float().cpu().clone()
    for name, b in module.named_buffers():
        if rank == 0:
            state[name] = b.detach().cpu().clone()
    if rank != 0:
        return
    from mmdist.models import FusedModel

    out_dir.mkdir(parents=True, exist_ok=True)
    FusedModel.save_state_dict_pretrained(state, cfg, vocab, out_dir)
    shutil.copytree(Path(job["data_dir"]) / "tokenizer", out_dir / "tokenizer",
                    dirs_exist_ok=True)
    manifest = Path(job["data_dir"]) / "manifest.json"
    if manifest.exists():
        (out_dir / "data_manifest.json").write_text(manifest.read_text())
    (out_dir / "training.json").write_text(json.dumps(
        {"run_name": job["run_name"], "mlflow_run_id": job.get("mlflow_run_id"),
         "global_step": engine.global_steps}, indent=1))
