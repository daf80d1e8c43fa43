"""Elastic resume on real Ray Train + DeepSpeed (gloo) + MLflow: a 2-worker ZeRO-2 run killed
mid-epoch resumes on 1 worker and on 3 workers from its checkpoint (the optimizer state
re-partitioned through a DeepSpeed universal checkpoint): the step count continues, the LR at
every step is the schedule the run planned, and no sample of the epoch is consumed twice."""

import json
import shutil
from pathlib import Path

import pandas as pd
import pytest
from mlflow.tracking import MlflowClient

from mmdist.config import load_config
from mmdist.tracking import CHANGED_ON_RESUME_TAG
from mmdist.train.elastic import UNIVERSAL_DIR
from mmdist.train.optim import warmup_cosine
from mmdist.train.run import train

MICRO, KILL_AT, CKPT_AT = 16, 5, 4


def _cfg(data, tmp, workers, *overrides):
    return load_config("tiny", [
        f"data.path={data}", f"tracking.tracking_uri=sqlite:///{tmp / 'mlflow.db'}",
        f"train.storage_path={tmp / 'runs'}", "tracking.register=false",
        f"train.num_workers={workers}", "train.cpus_per_worker=0.4", "train.zero_stage=2",
        f"train.micro_batch_size={MICRO}", "train.checkpoint_every=2", "train.eval_every=100",
        "train.log_every=1", "train.warmup_steps=2", "train.keep_checkpoints=10",
        "train.run_name=elastic", *overrides])


def _expected_lr(cfg, step, total):
    t = cfg.train
    return t.lr * warmup_cosine(step, min(t.warmup_steps, total // 5), total)


def _ledgers(checkpoint: Path) -> list[list[int]]:
    """Every rank's ledger of epoch 0 in ``checkpoint``. A resumed rank's ledger starts with
    everything the epoch consumed before the resume (all ranks', unioned), then its own ids."""
    ledgers = []
    for p in sorted(checkpoint.glob("ledger_rank*.json")):
        ledger = json.loads(p.read_text())
        assert ledger["epoch"] == 0
        ledgers.append(ledger["consumed"])
    return ledgers


@pytest.fixture(scope="module")
def killed(ray_local, synthetic_data, tmp_path_factory):
    """A 2-worker ZeRO-2 run SIGKILLed after step 5 (its newest checkpoint: step 4, mid-epoch),
    kept as a copy of its run folder and MLflow store, so each test resumes the same state.
    ``total``: its train.max_steps, where one worker finishes the epoch."""
    tmp = tmp_path_factory.mktemp("killed")
    train_ids = set(pd.read_parquet(synthetic_data / "train")["sample_id"])
    total = CKPT_AT + (len(train_ids) - CKPT_AT * 2 * MICRO) // MICRO
    mp = pytest.MonkeyPatch()
    mp.setenv("MMDIST_FAULT_KILL_AT_STEP", str(KILL_AT))
    try:
        with pytest.raises(Exception):  # noqa: B017  (the worker died: Ray's own error)
            train(_cfg(synthetic_data, tmp, 2, "train.max_failures=0",
                       f"train.max_steps={total}"))
    finally:
        mp.undo()
    assert (tmp / "runs" / "elastic" / f".fault-killed-at-{KILL_AT}").exists()
    return {"tmp": tmp, "data": synthetic_data, "train_ids": train_ids, "total": total}


def _last_of_epoch_0(run_dir: Path) -> Path:
    """The newest checkpoint written in epoch 0: its ledgers hold what the epoch consumed."""
    found = []
    for c in run_dir.glob("checkpoint_*"):
        if not c.is_dir():
            continue  # Ray's checkpoint_manager_snapshot.json
        state = json.loads((c / "mmdist_state.json").read_text())
        if state["epoch"] == 0:
            found.append((state["global_step"], c))
    return max(found)[1]


@pytest.mark.parametrize("workers", [1, 3])
def test_killed_2_worker_run_resumes_on_another_number_of_workers(killed, tmp_path, workers,
                                                                  capsys):
    total, train_ids = killed["total"], killed["train_ids"]
    tmp = tmp_path / "resumed"
    shutil.copytree(killed["tmp"], tmp)  # each test resumes its own copy of the killed run
    cfg = _cfg(killed["data"], tmp, workers, f"train.max_steps={total}",
               "train.checkpoint_every=1")
    s = train(cfg)
    out = capsys.readouterr().out
    assert f"written by 2 worker(s), on {workers} at ZeRO-2" in out
    assert s["global_step"] == total
    assert [(r["from_step"], r["from_world"], r["world"]) for r in s["resumes"]] == [
        (CKPT_AT, 2, workers)]
    assert (tmp / "runs" / "elastic" / UNIVERSAL_DIR / "").is_dir()  # converted, not refused

    # steps continue from the checkpoint: MLflow has steps 1-4 of the 2-worker attempt, then
    # 5.. of the resumed one, each once, and the LR at every step is the planned schedule's
    client = MlflowClient(f"sqlite:///{tmp / 'mlflow.db'}")
    run = client.get_run(s["run_id"]).data
    # the first attempt's params stay (MLflow params never change); the resume's world size
    # is on the run's tag
    assert run.params["train.num_workers"] == "2"
    changed = json.loads(run.tags[CHANGED_ON_RESUME_TAG])
    assert changed["train.num_workers"] == [str(workers)], changed
    hist = client.get_metric_history(s["run_id"], "lr")
    logged = sorted(m.step for m in hist)
    assert logged == list(range(1, total + 1))
    for m in hist:
        assert m.value == pytest.approx(_expected_lr(cfg, m.step, total), rel=1e-6), m

    # the sample ledger of the epoch: no sample twice (each rank's ids after the resume are its
    # own), and every sample once but for less than one global batch at this size (the ranks'
    # last partial micro batches)
    done = CKPT_AT * 2 * MICRO  # consumed by the checkpoint at step 4, in every rank's ledger
    ledgers = _ledgers(_last_of_epoch_0(tmp / "runs" / "elastic"))
    union = set().union(*ledgers)
    assert len(ledgers) == workers and all(len(c) == len(set(c)) for c in ledgers)
    assert sum(len(c) for c in ledgers) - (workers - 1) * done == len(union)
    assert (len(union) - done) % (workers * MICRO) == 0 and union <= train_ids
    assert len(train_ids - union) < workers * MICRO, len(train_ids - union)
