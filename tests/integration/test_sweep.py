"""A real Ray Tune sweep: every trial a DeepSpeed job on Ray Train, MLflow parent + children."""

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pandas as pd
import pytest
from mlflow.tracking import MlflowClient

from mmdist.cli import CommandError
from mmdist.config import load_config
from mmdist.tune import (
    check_fits,
    expected_trials,
    parse_space_arg,
    space_points,
    sweep,
    to_tune_space,
    trial_overrides,
)

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


# ---- combinations the config refuses, trials that fail ---------------------------------------

ATTENTION_LATE = "model.fusion=attention with model.fusion_stage=late"


def _variants(tune_space: dict, n: int = 1) -> list[dict]:
    """The trials Tune's variant generator makes of ``tune_space`` (``n`` passes), as overrides."""
    from ray.tune.search.variant_generator import generate_variants

    return [trial_overrides(config) for _ in range(n) for _, config in generate_variants(tune_space)]


def test_grid_drops_the_combinations_the_config_refuses():
    space = {"model.fusion": ["concat", "attention"], "model.fusion_stage": ["mid", "late"],
             "train.lr": [0.0003, 0.003]}
    points, dropped = space_points(load_config("tiny"), space)
    assert [d["overrides"] for d in dropped] == [
        {"model.fusion": "attention", "model.fusion_stage": "late", "train.lr": lr}
        for lr in (0.0003, 0.003)]
    assert all(ATTENTION_LATE in d["reason"] for d in dropped)
    tune_space = to_tune_space(space, "grid", points)
    trials = _variants(tune_space)
    assert len(trials) == expected_trials(tune_space, 1) == 6
    assert sorted(map(str, trials)) == sorted(map(str, points))
    assert expected_trials(tune_space, 3) == 18


def test_random_search_never_samples_a_refused_combination():
    space = {"model.fusion": ["concat", "attention"], "model.fusion_stage": ["mid", "late"],
             "train.lr": {"loguniform": [1e-4, 1e-2]}}
    points, dropped = space_points(load_config("tiny"), space)
    assert len(points) == 3 and len(dropped) == 1
    trials = _variants(to_tune_space(space, "random", points), 150)
    pairs = {(t["model.fusion"], t["model.fusion_stage"]) for t in trials}
    assert pairs == {("concat", "mid"), ("concat", "late"), ("attention", "mid")}
    assert all(1e-4 <= t["train.lr"] <= 1e-2 for t in trials)


def test_grid_with_a_choice_dimension_samples_only_accepted_completions():
    space = {"model.fusion_stage": ["mid", "late"],
             "model.fusion": {"choice": ["concat", "attention"]}}
    points, _ = space_points(load_config("tiny"), space)
    tune_space = to_tune_space(space, "grid", points)
    assert expected_trials(tune_space, 1) == 2  # the grid is over the stages only
    trials = _variants(tune_space, 60)
    assert {t["model.fusion"] for t in trials if t["model.fusion_stage"] == "late"} == {"concat"}
    assert {t["model.fusion"] for t in trials if t["model.fusion_stage"] == "mid"} == {
        "concat", "attention"}


def test_sweep_with_every_combination_refused_stops_before_it_starts(tmp_path):
    cfg = load_config("tiny", [f"train.storage_path={tmp_path}",
                               f"tracking.tracking_uri=sqlite:///{tmp_path / 'mlflow.db'}"])
    with pytest.raises(CommandError, match="every combination of the sweep space is refused.*"
                                           "model.fusion=attention model.fusion_stage=late: "
                                           + ATTENTION_LATE):
        sweep(cfg, ["model.fusion=attention", "model.fusion_stage=late"], name="nothing")
    assert not (tmp_path / "nothing").exists() and not (tmp_path / "mlflow.db").exists()


# A learning rate of 1e30 is a valid config value that makes every loss after the first step
# non-finite: with train.max_bad_steps=1 the trial's training raises FloatingPointError.
DIVERGES = "1.0e+30"
FAILING_TRIAL = ["train.max_bad_steps=1", "train.max_failures=0", "train.num_workers=1",
                 "tune.scheduler=fifo", "tune.max_concurrent_trials=1"]


def test_sweep_drops_refused_combinations_and_survives_a_failed_trial(ray_local, synthetic_data,
                                                                       tmp_path):
    """Issue 19's sweep shape, small: a 2x2 grid (x one fusion) where attention x late is refused
    by the config (dropped before the start, with its reason) and lr 1e30 makes training raise
    (a failed trial). The sweep finishes, reports both, and registers the trial that worked.
    A checkpoint before the first evaluation (checkpoint_every 2, eval_every 4) reports no
    val metric, which Tune also took for a reason to end the sweep."""
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    gcs = ray_local.get_runtime_context().gcs_address
    r = subprocess.run(
        [sys.executable, "-m", "mmdist.cli", "sweep", "--config", "tiny", "--name", "partial",
         "--space", "model.fusion=attention", f"data.path={synthetic_data}",
         "--space", "model.fusion_stage=mid,late", f"tracking.tracking_uri={uri}",
         "--space", f"train.lr=0.003,{DIVERGES}", f"train.storage_path={tmp_path / 'runs'}",
         "train.max_steps=4", "train.eval_every=4", "train.checkpoint_every=2", *FAILING_TRIAL,
         "tracking.model_name=partial-sweep", "--address", gcs, "--json"],
        capture_output=True, text=True, timeout=600, env={**os.environ, "RAY_ADDRESS": gcs})
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    s = json.loads(r.stdout.strip().splitlines()[-1])
    ok = {"model.fusion": "attention", "model.fusion_stage": "mid", "train.lr": 0.003}
    bad = {**ok, "train.lr": 1e30}
    assert s["trials"] == 2 and s["failed_trials"] == 1
    assert [f["overrides"] for f in s["failed"]] == [bad]
    assert "FloatingPointError" in s["failed"][0]["error"]
    assert "train.max_bad_steps=1" in s["failed"][0]["error"]
    assert [d["overrides"] for d in s["dropped"]] == [
        {**ok, "model.fusion_stage": "late"}, {**bad, "model.fusion_stage": "late"}]
    assert all(ATTENTION_LATE in d["reason"] for d in s["dropped"])
    assert s["best_config"] == ok and s["model_uri"] == "models:/partial-sweep/1"
    assert ("dropped      model.fusion=attention model.fusion_stage=late train.lr=0.003: "
            + ATTENTION_LATE) in r.stdout
    assert ("failed       model.fusion=attention model.fusion_stage=mid train.lr=1e+30: "
            "FloatingPointError") in r.stdout

    report = Path(s["report_dir"])
    table = pd.read_csv(report / "trials.csv")
    assert len(table) == 2
    failed_row = table[table["failed"]]
    assert list(failed_row["train.lr"]) == [1e30]
    assert "FloatingPointError" in failed_row["error"].iloc[0]
    assert "Dropped before the sweep" in (report / "trials.md").read_text()
    assert (report / "heatmap.png").stat().st_size > 0

    client = MlflowClient(uri)
    exp = client.get_run(s["parent_run_id"]).info.experiment_id
    children = client.search_runs(
        [exp], filter_string=f"tags.mlflow.parentRunId = '{s['parent_run_id']}'")
    assert sorted(c.info.status for c in children) == ["FAILED", "FINISHED"]


def test_sweep_where_every_trial_fails_is_a_clear_error(ray_local, synthetic_data, tmp_path):
    """A uniform range over an integer key samples floats the config refuses: each trial fails
    at its start (no MLflow run, no worker), the sweep ends with an error naming each trial's
    values and problem, and nothing is registered."""
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    cfg = load_config("tiny", [f"data.path={synthetic_data}", f"tracking.tracking_uri={uri}",
                               f"train.storage_path={tmp_path / 'runs'}", "tune.num_samples=2",
                               "tracking.model_name=failed-sweep", *FAILING_TRIAL])
    with pytest.raises(CommandError) as e:
        sweep(cfg, ["model.fusion=concat", "model.fusion_stage=mid", "train.lr=0.003",
                    "train.max_steps=uniform:2:4"], name="all-failed")
    msg = str(e.value)
    assert "sweep all-failed: all 2 trial(s) failed, no model to register: " in msg
    values = re.findall(r"model.fusion=concat model.fusion_stage=mid train.lr=0.003 "
                        r"train.max_steps=([0-9.]+): TrialConfigError: "
                        r"train.max_steps=([0-9.]+): expected int", msg)
    assert len(values) == 2 and all(a == b and 2 <= float(a) <= 4 for a, b in values), msg
    client = MlflowClient(uri)
    assert client.search_registered_models() == []
    exp = client.get_experiment_by_name(cfg.tracking.experiment).experiment_id
    (parent,) = client.search_runs([exp], filter_string="tags.`mmdist.sweep` = 'true'")
    assert parent.info.status == "FAILED"
    assert client.search_runs(
        [exp], filter_string=f"tags.mlflow.parentRunId = '{parent.info.run_id}'") == []
