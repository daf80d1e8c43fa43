"""Fault injection on real Ray Train + DeepSpeed + MLflow: a crash costs the steps since the last
checkpoint, never the run; no sample of the epoch is lost; bad losses are skipped, then stop."""

import json
import shutil
from pathlib import Path

import pandas as pd
import pytest
from mlflow.tracking import MlflowClient

from mmdist.cli import CommandError
from mmdist.config import load_config
from mmdist.train.run import train


def _cfg(data, tmp, *overrides):
    return load_config("tiny", [f"data.path={data}",
                                f"tracking.tracking_uri=sqlite:///{tmp / 'mlflow.db'}",
                                f"train.storage_path={tmp / 'runs'}", "tracking.register=false",
                                "train.num_workers=1", *overrides])


def test_worker_sigkill_mid_epoch_resumes_without_losing_samples(ray_local, synthetic_data,
                                                                 tmp_path, monkeypatch):
    train_ids = set(pd.read_parquet(synthetic_data / "train")["sample_id"])
    steps = len(train_ids) // 16  # one full epoch of micro batches of 16 on 1 worker
    monkeypatch.setenv("MMDIST_FAULT_KILL_AT_STEP", "6")
    s = train(_cfg(synthetic_data, tmp_path, f"train.max_steps={steps}", "train.max_failures=1",
                   "train.checkpoint_every=4", "train.eval_every=100", "train.run_name=killed"))
    assert (tmp_path / "runs" / "killed" / ".fault-killed-at-6").exists()  # it did crash
    assert s["global_step"] == steps
    ledger = json.loads((Path(s["checkpoint"]) / "ledger_rank0.json").read_text())
    consumed = ledger["consumed"]
    # every sample of the epoch consumed exactly once in the ledger: the batches replayed after
    # the restart (steps 5-6) replace the ones lost with the crash, nothing is counted twice
    assert len(consumed) == len(set(consumed)) == steps * 16
    assert set(consumed) <= train_ids and len(train_ids - set(consumed)) < 16
    hist = MlflowClient(f"sqlite:///{tmp_path / 'mlflow.db'}").get_metric_history(
        s["run_id"], "train_loss")
    logged = [m.step for m in hist]
    assert len(logged) == len(set(logged))  # one MLflow run, no step logged twice


def test_nan_losses_are_skipped_and_counted(ray_local, synthetic_data, tmp_path, monkeypatch):
    monkeypatch.setenv("MMDIST_FAULT_NAN_BATCHES", "3-4")
    s = train(_cfg(synthetic_data, tmp_path, "train.max_steps=6", "train.max_bad_steps=3"))
    assert s["global_step"] == 6 and s["bad_steps"] == 2


def test_too_many_nan_losses_stop_with_a_clear_error(ray_local, synthetic_data, tmp_path,
                                                     monkeypatch):
    monkeypatch.setenv("MMDIST_FAULT_NAN_BATCHES", "3-100")
    with pytest.raises(Exception, match="consecutive non-finite losses") as e:
        train(_cfg(synthetic_data, tmp_path, "train.max_steps=10", "train.max_bad_steps=3",
                   "train.max_failures=0", "train.checkpoint_every=2", "train.run_name=nan"))
    assert "train.max_bad_steps=3" in str(e.value)
    kept = list((tmp_path / "runs" / "nan").glob("checkpoint_*"))
    assert kept, "the last good checkpoint (step 2) must be kept"


def test_corrupted_shard_is_refused_before_training(ray_local, synthetic_data, tmp_path):
    bad = tmp_path / "corrupt"
    shutil.copytree(synthetic_data, bad)
    shard = sorted((bad / "train").glob("*.parquet"))[0]
    data = bytearray(shard.read_bytes())
    data[len(data) // 2] ^= 0xFF
    shard.write_bytes(bytes(data))
    with pytest.raises(CommandError, match=shard.name):
        train(_cfg(bad, tmp_path, "train.max_steps=2"))
