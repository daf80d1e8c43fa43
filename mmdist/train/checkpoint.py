"""What a training checkpoint holds besides the DeepSpeed ZeRO shards.

Layout of one checkpoint directory (Ray merges every rank's files into it):

    ds/                    DeepSpeed engine state: every rank's ZeRO shard, optimizer, scheduler
    latest                 DeepSpeed's pointer to the tag `ds`
    mmdist_state.json      rank 0: global step, epoch, the resolved config, the run name
    ledger_rank{R}.json    rank R: sample ids consumed in the current epoch, in order, and an
                           order hash over the whole run (the data position and the ledger)
    tokenizer/             rank 0: the tokenizer the model was trained with
    model/                 final checkpoint only: consolidated safetensors + config + tokenizer
    files_rank{R}.json     rank R, written last: every file rank R wrote, with its size. A
                           checkpoint is complete when the file list of every rank of the world
                           size in mmdist_state.json is there and every listed file has its size.

Resuming (:func:`choose_checkpoint`) takes the newest complete checkpoint of the run folder and
says which newer ones it skipped and why (a node lost mid-upload, a truncated file). A ZeRO-1/2
checkpoint written at another world size resumes through a DeepSpeed universal checkpoint
(:mod:`mmdist.train.elastic`); what cannot is refused with the reason (:func:`check_resume`).
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

DS_TAG = "ds"
STATE_FILE = "mmdist_state.json"
MODEL_DIR = "model"
# model.* keys that may change between a checkpoint and its resume (they leave the weights'
# shapes alone); any other difference is refused.
RUNTIME_MODEL_KEYS = frozenset({"compile", "activation_checkpointing", "modality_dropout",
                                "task_weights", "text_pretrained", "image_pretrained"})


@dataclass
class TrainState:
    """Where training stands; restored from a checkpoint after a crash."""

    global_step: int = 0
    epoch: int = 0
    # Sample ids consumed so far in `epoch` by all ranks (restored from every rank's ledger):
    # the next attempt skips them, so a resumed epoch neither loses nor repeats samples beyond
    # those consumed after the checkpoint was written (the replay window).
    consumed: set[int] = field(default_factory=set)
    order_hash: str = ""  # rank-local running hash of the sample order (determinism checks)
    bad_steps_total: int = 0
    # One entry per resume: the step resumed from and the newer checkpoints skipped (and why).
    resumes: list[dict[str, Any]] = field(default_factory=list)
    # Metric values rank 0 could not deliver to MLflow by the checkpoint (server down), as
    # ``(key, value, timestamp_ms, step)``: a resumed run sends them, so a crash loses none.
    mlflow_pending: list[list[Any]] = field(default_factory=list)
    # The world size the run's step plan (the LR schedule's length) was made at: the first
    # attempt's, kept by a resume at another world size (mmdist.train.elastic). 0: not recorded.
    schedule_world: int = 0


def ledger_path(ckpt_dir: str | Path, rank: int) -> Path:
    return Path(ckpt_dir) / f"ledger_rank{rank}.json"


def write_ledger(ckpt_dir: str | Path, rank: int, epoch: int, consumed: list[int],
                 order_hash: str) -> None:
    ledger_path(ckpt_dir, rank).write_text(json.dumps(
        {"rank": rank, "epoch": epoch, "consumed": consumed, "order_hash": order_hash}))


def write_state(ckpt_dir: str | Path, state: TrainState, extra: dict) -> None:
    body = {"global_step": state.global_step, "epoch": state.epoch,
            "bad_steps_total": state.bad_steps_total, "resumes": state.resumes,
            "mlflow_pending": state.mlflow_pending, "schedule_world": state.schedule_world,
            **extra}
    (Path(ckpt_dir) / STATE_FILE).write_text(json.dumps(body, indent=1, default=str))


def write_file_list(ckpt_dir: str | Path, rank: int) -> None:
    """Record every file this rank wrote into ``ckpt_dir`` (call it last, after all writes)."""
    d = Path(ckpt_dir)
    files = {str(p.relative_to(d)): p.stat().st_size for p in sorted(d.rglob("*")) if p.is_file()}
    (d / f"files_rank{rank}.json").write_text(json.dumps({"rank": rank, "files": files}))


def incomplete_reason(ckpt_dir: str | Path) -> str | None:
    """Why ``ckpt_dir`` cannot be resumed from, or None when it is complete."""
    d = Path(ckpt_dir)
    try:
        body = json.loads((d / STATE_FILE).read_text())
        world = int(body["world_size"])
    except FileNotFoundError:
        return f"{STATE_FILE} is missing"
    except (ValueError, KeyError, TypeError) as e:
        return f"{STATE_FILE} is unreadable ({type(e).__name__}: {e})"
    for rank in range(world):
        listing = d / f"files_rank{rank}.json"
        try:
            files = json.loads(listing.read_text())["files"]
        except FileNotFoundError:
            return f"{listing.name} is missing (rank {rank} of {world} never finished writing)"
        except (ValueError, KeyError) as e:
            return f"{listing.name} is unreadable ({e})"
        for rel, size in files.items():
            f = d / rel
            if not f.is_file():
                return f"{rel} (rank {rank}) is missing"
            if f.stat().st_size != int(size):
                return f"{rel} (rank {rank}) has {f.stat().st_size} bytes, {size} were written"
    return None


def _step_of(ckpt_dir: Path) -> int:
    try:
        return int(json.loads((ckpt_dir / STATE_FILE).read_text())["global_step"])
    except (OSError, ValueError, KeyError, TypeError):
        return -1


def choose_checkpoint(run_dir: str | Path) -> tuple[Path | None, list[str]]:
    """The newest complete checkpoint under ``run_dir`` and a note per newer one skipped."""
    d = Path(run_dir)
    found = sorted(d.glob("checkpoint_*"), key=lambda p: (_step_of(p), p.name), reverse=True)
    skipped = []
    for c in found:
        if not c.is_dir():
            continue
        reason = incomplete_reason(c)
        if reason is None:
            return c, skipped
        skipped.append(f"{c.name} (step {_step_of(c)}): {reason}")
    return None, skipped


# who takes the optimizer step, as checkpoints record it (``optimizer_steps``)
OPTIMIZER_STEPS = {"mmdist": "mmdist's AdamW (ZeRO-0 in fp32 or bf16 autocast, no offload)",
                   "deepspeed": "DeepSpeed's ZeRO / fp16 / bf16 optimizer"}


def saved_optimizer_steps(body: dict[str, Any]) -> str | None:
    """Who took the optimizer steps of a checkpoint (its state file's ``body``): its own record,
    else, for one written before the record existed, DeepSpeed's BF16 optimizer where it ran
    bf16 without ZeRO (that became torch.autocast with mmdist's optimizer on 2026-12-03), else
    unknown (None)."""
    if body.get("optimizer_steps"):
        return str(body["optimizer_steps"])
    precision = ((body.get("config") or {}).get("train") or {}).get("precision")
    return "deepspeed" if int(body.get("zero_stage", -1)) == 0 and precision == "bf16" else None


def check_resume(ckpt_dir: str | Path, world_size: int, zero_stage: int,
                 model_cfg: dict[str, Any], optimizer_steps: str | None = None) -> None:
    """Refuse a resume DeepSpeed would load wrongly or fail on deep inside.

    At the world size that wrote it a checkpoint loads as it is, at the ZeRO stage it was
    written at (DeepSpeed keeps optimizer state in another layout per stage). At another world
    size ZeRO-1/2 optimizer shards are re-partitioned through a DeepSpeed universal checkpoint
    (:mod:`mmdist.train.elastic`) and ZeRO-0 state loads as it is; what cannot
    (:func:`conversion_problem`: ZeRO-3, a ZeRO-0 checkpoint into ZeRO-1/2 or back) is refused,
    as is a model of another shape, and optimizer state written by another optimizer
    (``optimizer_steps``: a key of :data:`OPTIMIZER_STEPS`, this run's). Raises ValueError
    naming the checkpoint, what differs and what to do instead.
    """
    d = Path(ckpt_dir)
    body = json.loads((d / STATE_FILE).read_text())
    saved_world, problems = int(body["world_size"]), []
    saved_stage = int(body.get("zero_stage", zero_stage))
    if saved_world == world_size and saved_stage != zero_stage:
        problems.append(
            f"it was written at ZeRO-{saved_stage} and this run is ZeRO-{zero_stage}: DeepSpeed "
            f"keeps optimizer state in another layout per stage. Resume with "
            f"train.zero_stage={saved_stage}, or start a new train.run_name")
    moved = conversion_problem(saved_world, saved_stage, world_size, zero_stage)
    if moved:
        problems.append(moved)
    saved_steps = saved_optimizer_steps(body)
    if (saved_stage == zero_stage and optimizer_steps and saved_steps
            and saved_steps != optimizer_steps):
        problems.append(
            f"its optimizer state was written by {OPTIMIZER_STEPS[saved_steps]} and this run "
            f"steps with {OPTIMIZER_STEPS[optimizer_steps]}, whose state has another layout "
            "(train.precision or train.offload_optimizer differ, or the checkpoint predates "
            "bf16 autocast without ZeRO); resume with the settings that wrote it, or start a "
            "new train.run_name")
    saved_model = (body.get("config") or {}).get("model") or {}
    diff = sorted(k for k in set(saved_model) | set(model_cfg)
                  if k not in RUNTIME_MODEL_KEYS and saved_model.get(k) != model_cfg.get(k))
    if saved_model and diff:
        problems.append("its model differs from this config in " + ", ".join(
            f"model.{k} ({saved_model.get(k)!r} there, {model_cfg.get(k)!r} here)" for k in diff)
            + "; use another train.run_name for a different model")
    if problems:
        raise ValueError(f"cannot resume from {d} (step {body.get('global_step')}): "
                         + "; ".join(problems))


def conversion_problem(saved_world: int, saved_stage: int, world: int, stage: int) -> str | None:
    """Why a checkpoint written by ``saved_world`` ranks at ZeRO-``saved_stage`` cannot resume on
    ``world`` ranks at ZeRO-``stage``; None when it can (as it is at the same world size, through
    a universal checkpoint at another; ZeRO-0 state, whole on every rank, as it is)."""
    if saved_world == world:
        return None
    moved = f"it was written by {saved_world} worker(s) and this run has {world}"
    if 3 in (saved_stage, stage):
        return (f"{moved} at ZeRO-{saved_stage} -> ZeRO-{stage}: a ZeRO-3 checkpoint resumes at "
                "the world size that wrote it only (mmdist re-partitions ZeRO-1/2 optimizer "
                "shards; DeepSpeed's ZeRO-3 universal loading is not verified with mmdist). "
                f"Resume with train.num_workers={saved_world}, or start a new train.run_name "
                "with model.init_from set to the consolidated model of a finished run")
    if saved_stage == 0 and stage != 0:
        return (f"{moved}: it was written at ZeRO-0, where the optimizer state is one "
                "unpartitioned copy that DeepSpeed's universal converter does not read, and this "
                f"run is ZeRO-{stage}. Resume with train.zero_stage=0 (every worker then loads "
                f"the whole state), or with train.num_workers={saved_world}")
    if saved_stage != 0 and stage == 0:
        return (f"{moved}: its ZeRO-{saved_stage} optimizer shards are re-partitioned through a "
                "DeepSpeed universal checkpoint, which loads into a ZeRO-1/2 engine only, and "
                f"this run is ZeRO-0. Set train.zero_stage={saved_stage}"
                + (" and train.zero_on_one_worker=true" if world == 1 else ""))
    return None


def stage_written(ckpt_dir: str | Path) -> int | None:
    """The ZeRO stage DeepSpeed ran when it wrote ``ckpt_dir`` (None: not recorded)."""
    stage = json.loads((Path(ckpt_dir) / STATE_FILE).read_text()).get("zero_stage")
    return None if stage is None else int(stage)


def read_state(ckpt_dir: str | Path, rank: int) -> TrainState:
    """The state saved in ``ckpt_dir``, with the consumed ids of every rank's ledger."""
    d = Path(ckpt_dir)
    body = json.loads((d / STATE_FILE).read_text())
    state = TrainState(global_step=int(body["global_step"]), epoch=int(body["epoch"]),
                       bad_steps_total=int(body.get("bad_steps_total", 0)),
                       resumes=list(body.get("resumes", [])),
                       mlflow_pending=[list(r) for r in body.get("mlflow_pending", [])],
                       schedule_world=int(body.get("schedule_world") or 0))
    for p in sorted(d.glob("ledger_rank*.json")):
        ledger = json.loads(p.read_text())
        if int(ledger["epoch"]) == state.epoch:
            state.consumed.update(int(i) for i in ledger["consumed"])
        if int(ledger["rank"]) == rank:
            state.order_hash = ledger["order_hash"]
    return state


def update_order_hash(order_hash: str, sample_ids) -> str:
    h = hashlib.sha256(order_hash.encode())
    h.update(",".join(str(int(i)) for i in sample_ids).encode())
    return h.hexdigest()[:16]
