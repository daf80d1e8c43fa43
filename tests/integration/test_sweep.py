"""A real Ray Tune sweep: every trial a DeepSpeed job on Ray Train, MLflow parent + children."""

import json
import subprocess
import sys
from pathlib import Path

import pandas as pd
import pytest
from mlflow.tracking import MlflowClient

from mmdist.cli import CommandError
from mmdist.config import load_config
from mmdist.tune import check_fits, parse_space_arg, sweep

ROOT = Path(__file__).resolve().parents[2]


def test_parse_space_arg():
    assert parse_space_arg("model.fusion=concat,attention") == ("model.fusion",
                                                                ["concat", "attention"])
    assert parse_space_arg("train.lr=0.0003,0.003") == ("train.lr", [0.0003, 0.003])
    assert parse_space_arg("train.lr=loguniform:1e-4:1e-2") == ("train.lr",
                                                               {"loguniform": [1e-4, 1e-2]})


def test_sweep_asha_parent_children_report_and_registry(ray_local, synthetic_data, tmp_path):
    data = synthetic_data
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    cfg = load_config("tiny", [
        f"data.path={data}", f"tracking.tracking_uri={uri}", f"train.storage_path={tmp_path}/runs",
        "train.num_workers=1", "train.max_steps=8", "train.eval_every=2",
        "train.checkpoint_every=8", "tune.max_concurrent_trials=2", "tune.grace_period=1",
        "tune.reduction_factor=2", "tune.metric=val_loss", "tracking.model_name=sweep-model"])
    s = sweep(cfg, ["model.fusion=concat,add", "model.fusion_stage=mid", "train.lr=0.003,0.00001"],
              name="sweep-test")
    assert s["trials"] == 4
    assert s["stopped_early"] >= 1
    children = MlflowClient(uri).search_runs(
        [MlflowClient(uri).get_run(s["parent_run_id"]).info.experiment_id],
        filter_string=f"tags.mlflow.parentRunId = '{s['parent_run_id']}'")
    assert len(children) == 4
    for f in ("trials.csv", "trials.md", "heatmap.png", "curves.png"):
        assert (tmp_path / "runs" / "sweep-test" / "report" / f).stat().st_size > 0
    table = pd.read_csv(tmp_path / "runs" / "sweep-test" / "report" / "trials.csv")
    assert len(table) == 4 and s["best_metric"] == pytest.approx(table["val_loss"].min())
    assert s["model_uri"] == "models:/sweep-model/1" and s["alias"] == "champion"
    arts = {a.path for a in MlflowClient(uri).list_artifacts(s["parent_run_id"], "sweep_report")}
    assert "sweep_report/heatmap.png" in arts


def test_expected_trials_counts_every_grid_point_num_samples_times():
    from mmdist.tune import expected_trials, to_tune_space

    space = {"model.fusion": ["concat", "add"], "train.lr": [0.003, 0.00001, 0.1]}
    assert expected_trials(to_tune_space(space, "grid"), 1) == 6
    assert expected_trials(to_tune_space(space, "grid"), 2) == 12
    sampled = {**space, "train.wd": {"loguniform": [1e-4, 1e-2]}}
    assert expected_trials(to_tune_space(sampled, "grid"), 2) == 12
    assert expected_trials(to_tune_space(space, "random"), 5) == 5
    # the sweep adds its own entry (a plain dict) to the space: it is not a grid
    assert expected_trials({**to_tune_space(space, "grid"), "_sweep": {"name": "x"}}, 1) == 6


def test_concurrency_leaves_room_for_data_tasks():
    from mmdist.tune import concurrent_trials

    cfg = load_config("tiny", ["train.num_workers=1", "train.cpus_per_worker=0.5",
                               "tune.max_concurrent_trials=4", "data.cpus_per_task=0.5"])
    assert concurrent_trials(cfg, 2) == 2  # 2 x 0.51 held, 0.98 left for data tasks
    assert concurrent_trials(cfg.override({"train.cpus_per_worker": 1.0}), 2) == 1


def test_trial_that_cannot_fit_is_refused(ray_local):
    cfg = load_config("tiny", ["train.num_workers=8", "train.cpus_per_worker=1"])
    with pytest.raises(CommandError, match=r"needs 8.51 CPUs, .* has 2 CPUs.*num_workers=8"):
        check_fits(cfg)


def test_cli_space_error_names_key():
    r = subprocess.run([sys.executable, "-m", "mmdist.cli", "sweep", "--config", "tiny",
                        "--space", "model.fusion=concat,nope", "--json"],
                       capture_output=True, text=True, timeout=120)
    assert r.returncode == 1
    assert "choice 'nope' is invalid" in r.stderr
    assert json.loads(r.stdout.strip().splitlines()[-1])["ok"] is False


@pytest.mark.parametrize("entry", [["-m", "mmdist.cli", "sweep"], ["jobs/sweep.py"]])
def test_cli_override_after_space_reaches_the_config(entry):
    """`--space KEY=SPEC key=value`: the override after --space is a config override (here an
    invalid one, so the command stops at the config check before Ray starts), not an
    unrecognized argument."""
    r = subprocess.run([sys.executable, *entry, "--config", "tiny",
                        "--space", "model.fusion=concat,attention", "train.num_workers=0",
                        "--json", "train.max_steps=-1"],
                       capture_output=True, text=True, timeout=120, cwd=ROOT)
    assert "unrecognized arguments" not in r.stderr
    assert r.returncode == 1, r.stderr[-2000:]
    assert "train.num_workers=0: must be >= 1" in r.stderr
    assert "train.max_steps=-1: must be >= 0" in r.stderr
    assert json.loads(r.stdout.strip().splitlines()[-1])["ok"] is False


def test_interrupted_sweep_resumes_without_rerunning_finished_trials(ray_local, synthetic_data,
                                                                      tmp_path):
    """Ctrl+C a `mmdist sweep` after its first trial, then `--resume` it: the finished trial is
    kept, the rest run, one parent run with one child per trial, the best model registered."""
    import os
    import signal
    import time
    from pathlib import Path

    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    overrides = [f"data.path={synthetic_data}", f"tracking.tracking_uri={uri}",
                 f"train.storage_path={tmp_path / 'runs'}", "train.num_workers=1",
                 "train.max_steps=6", "train.eval_every=3", "train.checkpoint_every=3",
                 "tune.scheduler=fifo", "tune.max_concurrent_trials=1",
                 "tracking.model_name=resumed-sweep"]
    space = ["--space", "model.fusion=concat,add", "--space", "model.fusion_stage=mid",
             "--space", "train.lr=0.003"]
    done = tmp_path / "runs" / "resumable" / "report" / "trials"
    gcs = ray_local.get_runtime_context().gcs_address
    log = tmp_path / "sweep.log"
    with open(log, "w") as out:
        proc = subprocess.Popen(
            [sys.executable, "-m", "mmdist.cli", "sweep", "--config", "tiny", "--name",
             "resumable", *space, "--address", gcs, *overrides],
            stdout=out, stderr=subprocess.STDOUT, env={**os.environ, "RAY_ADDRESS": gcs})
    try:
        deadline = time.monotonic() + 400
        while not (done.exists() and any(done.glob("*.json"))):
            assert proc.poll() is None, log.read_text()[-3000:]
            assert time.monotonic() < deadline, "the first trial never finished"
            time.sleep(0.5)
        proc.send_signal(signal.SIGINT)  # what Ctrl+C does
        proc.wait(timeout=180)
    finally:
        if proc.poll() is None:
            proc.kill()
    out = log.read_text()
    assert proc.returncode == 1, f"see {log}"
    assert "mmdist sweep --resume resumable" in out
    first = {p.name: p.stat().st_mtime for p in done.glob("*.json")}
    assert len(first) == 1

    s = sweep(load_config("tiny", overrides), space_args=[a for a in space if a != "--space"],
              name="resumable", resume=True)
    assert s["trials"] == 2 and s["model_uri"] == "models:/resumed-sweep/1"
    after = {p.name: p.stat().st_mtime for p in done.glob("*.json")}
    assert len(after) == 2
    (name, mtime), = first.items()
    if after[name] != mtime:
        # Ctrl+C landed after the trial returned but before Tune recorded it as finished, so
        # Tune restarted it: it must re-enter at its final checkpoint and retrain nothing.
        rec = json.loads((done / name).read_text())
        assert rec["global_step"] == 6 and rec["resumes"][-1]["from_step"] == 6, rec
    client = MlflowClient(uri)
    exp = client.get_run(s["parent_run_id"]).info.experiment_id
    assert len(client.search_runs([exp], filter_string="tags.`mmdist.sweep` = 'true'")) == 1
    children = client.search_runs(
        [exp], filter_string=f"tags.mlflow.parentRunId = '{s['parent_run_id']}'")
    assert len(children) == 2
    assert Path(s["report_dir"], "heatmap.png").stat().st_size > 0
