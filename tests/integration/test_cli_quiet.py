"""`mmdist train` as a newcomer runs it: the default path (no optional flag) prints mmdist's
lines and the summary, and puts what Ray, DeepSpeed and the workers say in the run's log."""

import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
NOISE = ("Setting accelerator to CPU", "No CUDA runtime", "TrainController", "RayTrainWorker",
         "Started a local Ray instance", "Token authentication", "built successfully",
         "Requesting resources", "Context impl SQLiteImpl")


def test_train_default_path_is_quiet_and_logs_the_libraries(tmp_path):
    env = {k: v for k, v in os.environ.items()
           if k not in ("MLFLOW_TRACKING_URI", "RAY_ADDRESS")}
    env["PYTHONPATH"] = str(ROOT)
    r = subprocess.run([sys.executable, "-m", "mmdist.cli", "train", "--config", "tiny"],
                       cwd=tmp_path, env=env, capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr[-3000:]
    lines = r.stdout.rstrip().splitlines()
    assert len(lines) <= 40, r.stdout
    assert lines[-1] == "=" * 72 and any(x.startswith("run ") for x in lines[-12:]), r.stdout
    for noise in NOISE:
        assert noise not in r.stdout and noise not in r.stderr, (noise, r.stdout, r.stderr)
    assert "[mmdist] step 8/8" in r.stdout  # the step lines (a bar on a terminal)
    # one worker runs the preset's ZeRO-2 as ZeRO-0, and says so
    assert "DeepSpeed ZeRO-0 engine ready on 1 worker(s)" in r.stdout
    log = next(tmp_path.glob("runs/*/mmdist.log"))
    assert f"log          {log}" in r.stdout
    text = log.read_text()
    assert "Setting accelerator to CPU" in text and "RayTrainWorker" in text, text[-2000:]


def test_cache_build_default_path_is_quiet_and_logs_the_libraries(tmp_path, pretrained_dirs):
    """`mmdist cache build` with a frozen pretrained encoder: mmdist's lines on the screen, Ray
    Data's plan and the encoder actors' output in <cache folder>/build.log."""
    env = {k: v for k, v in os.environ.items()
           if k not in ("MLFLOW_TRACKING_URI", "RAY_ADDRESS")}
    env["PYTHONPATH"] = str(ROOT)
    r = subprocess.run([sys.executable, "-m", "mmdist.cli", "cache", "build", "--config", "tiny",
                        f"model.image_pretrained={pretrained_dirs['@clip']}",
                        "model.freeze=[image_encoder]", "data.synthetic_samples=64"],
                       cwd=tmp_path, env=env, capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr[-3000:]
    for noise in (*NOISE, "MapWorker", "FeatureEncoder", "Execution plan", "deprecated"):
        assert noise not in r.stdout and noise not in r.stderr, (noise, r.stdout, r.stderr)
    log = tmp_path / "runs" / "feature_cache" / "build.log"
    assert "feature cache" in r.stdout and "built 64 rows of image" in r.stdout, r.stdout
    assert f"own output: {log}" in r.stdout, r.stdout
    assert "FeatureEncoder" in log.read_text()  # Ray Data's plan, in the log


def test_evaluate_default_path_is_quiet_and_logs_the_libraries(tmp_path, trained):
    """`mmdist evaluate` of a registered model, no optional flag: the metrics and the MLflow
    run on the screen; Ray's, Ray Data's actor pool's and MLflow's own output in
    .cache/models/evaluate.log."""
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    env["PYTHONPATH"] = str(ROOT)
    env["MLFLOW_TRACKING_URI"] = trained["uri"]
    model = f"models:/zero2-model@{trained['summary']['alias']}"
    r = subprocess.run([sys.executable, "-m", "mmdist.cli", "evaluate", "--model", model,
                        "--data", str(trained["data"])],
                       cwd=tmp_path, env=env, capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr[-3000:]
    for noise in (*NOISE, "MapWorker", "core_worker", "Execution plan", "Downloading"):
        assert noise not in r.stdout and noise not in r.stderr, (noise, r.stdout, r.stderr)
    assert f"{model} on {trained['data']} (val):" in r.stdout, r.stdout
    assert "val_accuracy" in r.stdout and "logged to MLflow run" in r.stdout, r.stdout
    log = tmp_path / ".cache" / "models" / "evaluate.log"
    assert f"own output: {log}" in r.stdout, r.stdout
    assert "MapWorker" in log.read_text()  # the actor pool's lines, in the log
