"""What a training checkpoint holds besides the DeepSpeed ZeRO shards.

Layout of one checkpoint directory (Ray merges every rank's files into it):

    ds/                    DeepSpeed engine state: every rank's ZeRO shard, optimizer, scheduler
    latest                 DeepSpeed's pointer to the tag `ds`
    mmdist_state.json      rank 0: global step, epoch, the resolved config, the run name
    ledger_rank{R}.json    rank R: sample ids consumed in the current epoch, in order, and an
                           order hash over the whole run (the data position and the ledger)
    tokenizer/             rank 0: the tokenizer the model was trained with
    model/                 final checkpoint only: consolidated safetensors + config + tokenizer
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass, field
from pathlib import Path

DS_TAG = "ds"
STATE_FILE = "mmdist_state.json"
MODEL_DIR = "model"


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


def ledger_path(ckpt_dir: str | Path, rank: int) -> Path:
    return Path(ckpt_dir) / f"ledger_rank{rank}.json"


def write_ledger(ckpt_dir: str | Path, rank: int, epoch: int, consumed: list[int],
                 order_hash: str) -> None:
    ledger_path(ckpt_dir, rank).write_text(json.dumps(
        {"rank": rank, "epoch": epoch, "consumed": consumed, "order_hash": order_hash}))


def write_state(ckpt_dir: str | Path, state: TrainState, extra: dict) -> None:
    body = {"global_step": state.global_step, "epoch": state.epoch,
            "bad_steps_total": state.bad_steps_total, **extra}
    (Path(ckpt_dir) / STATE_FILE).write_text(json.dumps(body, indent=1, default=str))


def read_state(ckpt_dir: str | Path, rank: int) -> TrainState:
    """The state saved in ``ckpt_dir``, with the consumed ids of every rank's ledger."""
    d = Path(ckpt_dir)
    body = json.loads((d / STATE_FILE).read_text())
    state = TrainState(global_step=int(body["global_step"]), epoch=int(body["epoch"]),
                       bad_steps_total=int(body.get("bad_steps_total", 0)))
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
