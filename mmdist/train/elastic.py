"""Resuming a run at another world size through DeepSpeed's universal checkpoint.

A ZeRO-1/2 checkpoint holds the fp32 master weights and the Adam moments partitioned over the
ranks that wrote it; DeepSpeed refuses to load it at another data-parallel size. DeepSpeed's
converter (``deepspeed.checkpoint.ds_to_universal``) rewrites it as one folder per parameter with
the full tensors (``zero/<name>/fp32.pt``, ``exp_avg.pt``, ``exp_avg_sq.pt``, ``step.pt``) beside
the engine state (step count, LR scheduler); a ZeRO-1/2 engine at any world size built with
``"checkpoint": {"load_universal": true}`` loads it and slices its own partition. The sample
ledgers are world-size independent already (every rank's consumed ids are unioned on resume).

Rules (:func:`mmdist.train.checkpoint.conversion_problem`): the checkpoint and the resumed run are both ZeRO-1 or ZeRO-2
(one worker keeps the checkpoint's stage: DeepSpeed loads universal checkpoints into a ZeRO
optimizer only, never into ZeRO-0); a ZeRO-0 checkpoint resumes at another world size as ZeRO-0
(nothing is partitioned: every rank loads the full optimizer state); ZeRO-3 is refused.

Steps and the LR schedule: DeepSpeed restores the optimizer step count and the LR scheduler's
position, so steps continue where the checkpoint left them. The schedule (warm-up, then cosine)
is a function of the step; its length is planned once, at the world size the run first started
at (recorded in every checkpoint as ``schedule_world``): ``train.max_steps`` when set (the same
at any world size; the run ends there), else ``train.epochs`` x the steps per epoch at that
world size. A run counting epochs and resumed at another world size takes a different number of
steps per epoch (the global batch is ``train.micro_batch_size`` x workers unless
``train.global_batch_size`` fixes it), so it trains every remaining epoch and the LR follows the
same curve: past the planned length it stays at the floor, and a run that finishes its epochs
sooner ends before the floor (:func:`steps_to_run`).
"""

from __future__ import annotations

import json
import os
import shutil
from argparse import Namespace
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from mmdist.config import TrainConfig
from mmdist.train import checkpoint as ckpt_lib

UNIVERSAL_DIR = "universal"  # <run folder>/universal/<checkpoint name>/: converted checkpoints
DONE_FILE = "mmdist_converted.json"


@dataclass
class ResumePlan:
    """What a worker resumes from, decided before its engine is built.

    Attributes:
        checkpoint: the newest complete checkpoint of the run folder, None for a fresh start.
        skipped: a note per newer, incomplete checkpoint skipped.
        saved_world: the world size that wrote ``checkpoint``.
        saved_stage: the ZeRO stage it was written at (None: not recorded).
        schedule_world: the world size the run's step plan was made at (this one when fresh).
        universal: load it through a universal checkpoint (it was written at another world
            size with partitioned optimizer state).
    """

    checkpoint: Path | None = None
    skipped: list[str] = field(default_factory=list)
    saved_world: int = 0
    saved_stage: int | None = None
    schedule_world: int = 0
    universal: bool = False


def plan_resume(run_dir: str | Path, world: int) -> ResumePlan:
    """The :class:`ResumePlan` of a worker of a ``world``-rank run whose folder is ``run_dir``
    (every rank reads the same folder and so plans the same)."""
    chosen, skipped = ckpt_lib.choose_checkpoint(run_dir)
    if chosen is None:
        return ResumePlan(skipped=skipped, schedule_world=world)
    body = json.loads((chosen / ckpt_lib.STATE_FILE).read_text())
    saved_world, stage = int(body["world_size"]), body.get("zero_stage")
    stage = None if stage is None else int(stage)
    return ResumePlan(chosen, skipped, saved_world, stage,
                      int(body.get("schedule_world") or saved_world),
                      universal=saved_world != world and stage != 0)


def schedule_steps(t: TrainConfig, train_rows: int, planned_world: int) -> int:
    """The LR schedule's length: ``train.max_steps``, else ``train.epochs`` x the optimizer steps
    per epoch at ``planned_world`` (each rank's equal shard in micro batches, its last partial
    one dropped, over the gradient-accumulation steps of the global batch there)."""
    if t.max_steps:
        return t.max_steps
    per_step = t.micro_batch_size * planned_world
    accum = max(1, (t.global_batch_size or per_step) // per_step)
    return t.epochs * max(1, (train_rows // planned_world // t.micro_batch_size) // accum)


def universal_dir(run_dir: str | Path) -> Path:
    """Where the run's converted checkpoints go (one folder per checkpoint name)."""
    return Path(run_dir) / UNIVERSAL_DIR


def convert(ckpt_dir: str | Path, run_dir: str | Path, log=print) -> Path:
    """Convert the DeepSpeed state of ``ckpt_dir`` to a universal checkpoint under
    :func:`universal_dir` and return its folder (the load tag is the checkpoint's name); an
    earlier complete conversion is reused, older ones are removed. Run it in one process (rank
    0) while the others wait.
    """
    from deepspeed.checkpoint.ds_to_universal import main as ds_to_universal  # heavy

    ckpt_dir = Path(ckpt_dir)
    out = universal_dir(run_dir) / ckpt_dir.name
    if (out / DONE_FILE).exists():
        return out
    tmp = out.with_name(f"{out.name}.tmp-{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    # one process, no pool: this runs inside a Ray worker, which must not fork a process pool
    ds_to_universal(Namespace(
        input_folder=str(ckpt_dir / ckpt_lib.DS_TAG), output_folder=str(tmp),
        num_extract_workers=1, num_merge_workers=1, keep_temp_folder=False, strict=True,
        inject_missing_state=True))  # mmdist's models declare no tensor/pipeline patterns
    (tmp.parent / "latest_universal").unlink(missing_ok=True)  # the converter's; tags are given
    (tmp / DONE_FILE).write_text(json.dumps({"from": str(ckpt_dir)}))
    shutil.rmtree(out, ignore_errors=True)
    tmp.rename(out)
    for older in out.parent.iterdir():  # a full copy of the state each: keep the newest only
        if older != out and older.is_dir():
            shutil.rmtree(older, ignore_errors=True)
    log(f"converted {ckpt_dir.name} to a universal checkpoint in {out}")
    return out


def restore_buffers(module: Any, ckpt_dir: str | Path) -> int:
    """Copy the module buffers saved in ``ckpt_dir`` into ``module`` (a universal load restores
    parameters only); returns how many."""
    import torch  # heavy: the driver imports this module

    path = Path(ckpt_dir) / ckpt_lib.DS_TAG / "mp_rank_00_model_states.pt"
    saved = torch.load(path, map_location="cpu", weights_only=True)["module"]
    n = 0
    with torch.no_grad():
        for name, buf in module.named_buffers():
            if name in saved and saved[name].shape == buf.shape:
                buf.copy_(saved[name])
                n += 1
    return n


def steps_to_run(planned: int, here: int, t: TrainConfig, step: int, epoch: int,
                 per_epoch: int) -> int:
    """The step a run ends at: ``planned`` (the LR schedule's length), unless the run counts
    epochs and its plan differs from ``here`` (the plan at this world size). Then every
    remaining epoch is trained at this world size's ``per_epoch`` steps: a bound (the epochs'
    data ends the run first), not a step count to reach."""
    if t.max_steps or planned == here:
        return planned
    return step + max(0, t.epochs - epoch) * per_epoch
