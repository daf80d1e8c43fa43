"""Fault injection on real Ray Train + DeepSpeed + MLflow: a crash costs the steps since the last
checkpoint, never the run; no sample of the epoch is lost; bad losses are skipped, then stop."""

import json
import os
import shutil
from pathlib import Path

import pandas as pd
import pytest
from mlflow.tracking import MlflowClient

from mmdist.cli import CommandError
from mmdist.config import load_config
from mmdist.train.checkpoint import choose_checkpoint
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


def test_nan_losses_are_skipped_counted_then_stop_with_a_clear_error(
        ray_local, synthetic_data, tmp_path, monkeypatch):
    # micro-batches 2-3 are NaN (2 < max_bad_steps: their updates are skipped, counted, training
    # goes on), then 8 onwards (3 in a row: stop). A skipped update still counts as a step, as
    # in DeepSpeed: steps 1 | 2 3 skipped | 4 5 6 7 | 8 9 10 skipped: stop at step 10.
    monkeypatch.setenv("MMDIST_FAULT_NAN_BATCHES", "2-3,8-100")
    with pytest.raises(Exception, match="3 consecutive non-finite losses at step 10") as e:
        train(_cfg(synthetic_data, tmp_path, "train.max_steps=12", "train.max_bad_steps=3",
                   "train.max_failures=0", "train.checkpoint_every=2", "train.eval_every=100",
                   "train.run_name=nan"))
    assert "train.max_bad_steps=3" in str(e.value)
    newest, _ = choose_checkpoint(tmp_path / "runs" / "nan")
    assert newest is not None, "the last good checkpoint (step 8) must be kept"
    state = json.loads((newest / "mmdist_state.json").read_text())
    assert state["global_step"] == 8 and state["bad_steps_total"] == 3


def test_an_error_before_the_first_checkpoint_fails_at_once(ray_local, synthetic_data, tmp_path,
                                                           monkeypatch, capsys):
    """A bug raised at step 2 of a fresh run (checkpoints every 4): one attempt, not three."""
    monkeypatch.setenv("MMDIST_FAULT_RAISE_AT_STEP", "2")
    with pytest.raises(Exception, match="a deterministic error after step 2"):
        train(_cfg(synthetic_data, tmp_path, "train.max_steps=8", "train.max_failures=2",
                   "train.checkpoint_every=4", "train.run_name=bug"))
    raised = (tmp_path / "runs" / "bug" / ".fault-raised-at-2").read_text().splitlines()
    assert len(raised) == 1, f"the error ran {len(raised)} attempts"
    out = capsys.readouterr().out
    assert "not retried: it was raised before the run's first checkpoint" in out


def test_the_same_error_from_the_same_checkpoint_stops_after_one_retry(
        ray_local, synthetic_data, tmp_path, monkeypatch, capsys):
    """After progress an error is retried once (it may be transient); the same error again from
    the same checkpoint stops the run with max_failures still unspent."""
    monkeypatch.setenv("MMDIST_FAULT_RAISE_AT_STEP", "6")
    with pytest.raises(Exception, match="a deterministic error after step 6"):
        train(_cfg(synthetic_data, tmp_path, "train.max_steps=10", "train.max_failures=3",
                   "train.checkpoint_every=4", "train.eval_every=100", "train.run_name=bug6"))
    raised = (tmp_path / "runs" / "bug6" / ".fault-raised-at-6").read_text().splitlines()
    assert len(raised) == 2, f"the error ran {len(raised)} attempts"
    out = capsys.readouterr().out
    assert "retry 1/3 from the checkpoint at step 4" in out
    assert "not retried: the same error ended the previous attempt too" in out


def test_corrupted_shard_is_refused_before_training(ray_local, synthetic_data, tmp_path):
    bad = tmp_path / "corrupt"
    shutil.copytree(synthetic_data, bad)
    shard = sorted((bad / "train").glob("*.parquet"))[0]
    data = bytearray(shard.read_bytes())
    data[len(data) // 2] ^= 0xFF
    shard.write_bytes(bytes(data))
    with pytest.raises(CommandError, match=shard.name):
        train(_cfg(bad, tmp_path, "train.max_steps=2"))


def test_killed_driver_then_same_run_name_continues_checkpoint_and_mlflow_run(
        ray_local, synthetic_data, tmp_path):
    """SIGKILL a `mmdist train` driver after its first checkpoint, run the same command again:
    it continues from that checkpoint, in the same MLflow run."""
    import os
    import signal
    import subprocess
    import sys
    import time

    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    overrides = [f"data.path={synthetic_data}", f"tracking.tracking_uri={uri}",
                 f"train.storage_path={tmp_path / 'runs'}", "train.run_name=driver-killed",
                 "train.num_workers=1", "train.max_steps=12", "train.checkpoint_every=4",
                 "train.eval_every=4", "train.log_every=2", "tracking.register=false"]
    gcs = ray_local.get_runtime_context().gcs_address
    log = tmp_path / "driver.log"
    with open(log, "w") as out:  # slow steps so the driver is surely killed mid-run
        driver = subprocess.Popen(
            [sys.executable, "-m", "mmdist.cli", "train", "--config", "tiny", "--address", gcs,
             *overrides], stdout=out, stderr=subprocess.STDOUT,
            env={**os.environ, "RAY_ADDRESS": gcs, "MMDIST_FAULT_STEP_SLEEP": "1.0"})
    run_dir = tmp_path / "runs" / "driver-killed"
    try:
        deadline = time.monotonic() + 300
        while choose_checkpoint(run_dir)[0] is None:  # until one is complete on storage
            assert driver.poll() is None, log.read_text()[-3000:]
            assert time.monotonic() < deadline, "no checkpoint was written"
            time.sleep(0.5)
    finally:
        driver.send_signal(signal.SIGKILL)
        driver.wait(timeout=30)
    # Ray reaps the dead driver's workers; wait until their CPUs are free again.
    deadline = time.monotonic() + 120
    while ray_local.available_resources().get("CPU", 0) < 2 - 1e-6:
        assert time.monotonic() < deadline, ray_local.available_resources()
        time.sleep(1)
    killed_run = MlflowClient(uri).search_runs(
        [MlflowClient(uri).get_experiment_by_name("mmdist-tiny").experiment_id])
    assert len(killed_run) == 1 and killed_run[0].info.status == "RUNNING"

    s = train(load_config("tiny", overrides))
    assert s["global_step"] == 12
    assert s["run_id"] == killed_run[0].info.run_id  # the same MLflow run, not a new one
    resumed = s["resumes"][-1]
    assert resumed["from_step"] >= 4 and resumed["from_step"] % 4 == 0
    assert MlflowClient(uri).get_run(s["run_id"]).info.status == "FINISHED"
    steps = [m.step for m in MlflowClient(uri).get_metric_history(s["run_id"], "train_loss")]
    assert max(steps) == 12 and set(range(2, 13, 2)) <= set(steps)


# ---- 4 and 5: determinism, truncated checkpoints, another world size --------------------------


def _order_hashes(ckpt: str | Path) -> dict[str, str]:
    return {p.name: json.loads(p.read_text())["order_hash"]
            for p in sorted(Path(ckpt).glob("ledger_rank*.json"))}


def _losses(uri: str, run_id: str) -> list[tuple[int, float]]:
    hist = MlflowClient(uri).get_metric_history(run_id, "train_loss")
    return sorted((m.step, m.value) for m in hist)


@pytest.fixture(scope="module")
def twin(ray_local, trained, tmp_path_factory):
    """A second run of the `trained` fixture's exact config and seed (own store and run name).
    What the determinism test compares is read right away: later tests resume this run."""
    tmp = tmp_path_factory.mktemp("twin")
    uri = f"sqlite:///{tmp / 'mlflow.db'}"
    overrides = [*trained["overrides"], f"tracking.tracking_uri={uri}",
                 f"train.storage_path={tmp / 'runs'}", "tracking.register=false",
                 "train.run_name=twin"]
    s = train(load_config("tiny", overrides))
    return {"summary": s, "overrides": overrides, "tmp": tmp,
            "hashes": _order_hashes(s["checkpoint"]), "losses": _losses(uri, s["run_id"])}


def test_same_seed_gives_the_same_sample_order_and_losses(trained, twin):
    a = _order_hashes(trained["summary"]["checkpoint"])
    assert len(a) == 2 and a["ledger_rank0.json"] != a["ledger_rank1.json"]
    assert twin["hashes"] == a  # every rank saw the same samples in the same order
    first = _losses(trained["uri"], trained["summary"]["run_id"])
    assert len(first) == 4  # steps 10, 20, 30, 40
    assert twin["losses"] == first  # bit-identical losses, not merely close


def test_truncated_newest_checkpoint_falls_back_to_the_previous_one(twin):
    newest = Path(twin["summary"]["checkpoint"])
    assert json.loads((newest / "mmdist_state.json").read_text())["global_step"] == 40
    victim = max((p for p in (newest / "ds").rglob("*") if p.is_file()),
                 key=lambda p: p.stat().st_size)
    victim.write_bytes(victim.read_bytes()[: victim.stat().st_size // 2])
    s = train(load_config("tiny", [*twin["overrides"], "train.max_steps=44"]))
    assert s["global_step"] == 44
    resumed = s["resumes"][-1]
    assert resumed["from_step"] == 20  # not 40, whose optimizer shard is cut in half
    assert len(resumed["skipped"]) == 1
    assert newest.name in resumed["skipped"][0] and victim.name in resumed["skipped"][0]
    assert "bytes" in resumed["skipped"][0]


def test_resume_at_another_world_size_that_cannot_convert_is_refused_before_start(trained):
    """A ZeRO-2 checkpoint of 2 workers re-partitions for any number of ZeRO-1/2 workers
    (test_elastic_resume.py); into ZeRO-0 it cannot, and that is refused before Ray starts."""
    run = trained["summary"]["run_name"]
    cfg = load_config("tiny", [*trained["overrides"], "train.num_workers=1",
                               "train.zero_stage=0", f"train.run_name={run}"])
    with pytest.raises(CommandError) as e:
        train(cfg)
    msg = str(e.value)
    assert "written by 2 worker(s) and this run has 1" in msg and run in msg
    assert "loads into a ZeRO-1/2 engine only" in msg
    assert "train.zero_stage=2 and train.zero_on_one_worker=true" in msg
    cfg = load_config("tiny", [*trained["overrides"], "model.fusion=attention",
                               f"train.run_name={run}"])
    with pytest.raises(CommandError, match=r"model\.fusion \('concat' there, 'attention' here\)"):
        train(cfg)


# ---- 6: the tracking server down for a minute -----------------------------------------------

OUTAGE_S = 60


class _MlflowServer:
    """A real `mlflow server` on loopback (sqlite store, proxied artifacts) that can be stopped
    and started again on the same port with the same store."""

    def __init__(self, root: Path):
        import socket

        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            self.port = s.getsockname()[1]
        self.root, self.proc = root, None
        self.uri = f"http://127.0.0.1:{self.port}"

    def start(self) -> None:
        import subprocess
        import sys
        import time
        import urllib.request

        mlflow = Path(sys.executable).parent / "mlflow"
        self.proc = subprocess.Popen(
            [str(mlflow), "server", "--host", "127.0.0.1", "--port", str(self.port),
             "--workers", "1", "--backend-store-uri", f"sqlite:///{self.root / 'mlflow.db'}",
             "--artifacts-destination", str(self.root / "artifacts")],
            stdout=open(self.root / "server.log", "ab"), stderr=subprocess.STDOUT,
            # as cluster/local/up.sh starts it: without MLflow's GenAI job consumers
            env={**os.environ, "MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false"})
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline:
            try:
                urllib.request.urlopen(f"{self.uri}/health", timeout=2)
                return
            except OSError:
                assert self.proc.poll() is None, (self.root / "server.log").read_text()[-2000:]
                time.sleep(0.5)
        raise TimeoutError("mlflow server did not become healthy")

    def stop(self) -> None:
        if self.proc and self.proc.poll() is None:
            self.proc.terminate()
            self.proc.wait(timeout=30)


def test_mlflow_server_down_for_a_minute_loses_no_metric(ray_local, synthetic_data, tmp_path,
                                                         monkeypatch):
    import threading
    import time

    server = _MlflowServer(tmp_path)
    server.start()
    # Our retries are the ones under test; MLflow's own exponential backoff would only add
    # minutes of waiting on top of them.
    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "0")
    # ~1 s per step: training outlives the first half of the outage and ends inside it, so
    # both the buffered metrics and the final flush + registration meet a dead server.
    monkeypatch.setenv("MMDIST_FAULT_STEP_SLEEP", "1.0")
    outage: dict[str, float] = {}

    def take_server_down() -> None:
        client = MlflowClient(server.uri)
        deadline = time.monotonic() + 300
        while time.monotonic() < deadline:  # wait until the run logs its first loss
            runs = client.search_runs(
                [e.experiment_id for e in client.search_experiments()],
                filter_string="tags.`mmdist.run_name` = 'outage'")
            if runs and client.get_metric_history(runs[0].info.run_id, "train_loss"):
                break
            time.sleep(0.5)
        server.stop()
        outage["down"] = time.monotonic()
        time.sleep(OUTAGE_S)
        server.start()
        outage["up"] = time.monotonic()

    chaos = threading.Thread(target=take_server_down, daemon=True)
    chaos.start()
    try:
        s = train(load_config("tiny", [
            f"data.path={synthetic_data}", f"tracking.tracking_uri={server.uri}",
            f"train.storage_path={tmp_path / 'runs'}", "train.run_name=outage",
            "train.num_workers=1", "train.max_steps=40", "train.log_every=1",
            "train.eval_every=20", "train.checkpoint_every=20",
            "tracking.model_name=outage-model"]))
        chaos.join(timeout=OUTAGE_S + 180)
        assert outage["up"] - outage["down"] >= OUTAGE_S
        assert s["mlflow_failed_flushes"] >= 1  # the worker did meet the dead server
        client = MlflowClient(server.uri)
        steps = [m.step for m in client.get_metric_history(s["run_id"], "train_loss")]
        assert sorted(steps) == list(range(1, 41))  # every step's loss, once, none lost
        val = client.get_metric_history(s["run_id"], "val_accuracy")
        assert sorted(m.step for m in val) == [20, 40]
        assert client.get_run(s["run_id"]).info.status == "FINISHED"
        version = client.get_model_version_by_alias("outage-model", s["alias"])
        assert s["model_uri"] == f"models:/outage-model/{version.version}"
    finally:
        server.stop()


def test_a_full_disk_while_checkpointing_keeps_the_previous_checkpoint(
        ray_local, synthetic_data, tmp_path, monkeypatch, capsys):
    """After step 5 the worker's writes stop at 4 MB a file (RLIMIT_FSIZE, what a full disk
    does to a write): the step-8 checkpoint is cut off part-way. The step-4 checkpoint stays the
    newest complete one; the retry resumes there and the run ends at its last step."""
    monkeypatch.setenv("MMDIST_FAULT_DISK_FULL_AT_STEP", f"5:{4 * 2**20}")
    s = train(_cfg(synthetic_data, tmp_path, "model.size=small", "train.max_steps=12",
                   "train.max_failures=1", "train.checkpoint_every=4", "train.eval_every=100",
                   "train.run_name=full"))
    assert (tmp_path / "runs" / "full" / ".fault-disk-full-at-5").exists()  # the fault fired
    out = capsys.readouterr().out
    assert "could not write the checkpoint of step 8" in out, out[-3000:]  # cut off part-way
    assert "retry 1/1 from the checkpoint at step 4" in out
    assert [r["from_step"] for r in s["resumes"]] == [4]
    assert s["global_step"] == 12
    state = json.loads((Path(s["checkpoint"]) / "mmdist_state.json").read_text())
    assert state["global_step"] == 12
