"""Training end to end on a real local Ray, real DeepSpeed (gloo) and a real MLflow sqlite store."""

import numpy as np
import pandas as pd
import pytest
from mlflow.tracking import MlflowClient

from mmdist.config import load_config
from mmdist.train.run import train


@pytest.fixture()
def data_dir(synthetic_data):
    return synthetic_data


@pytest.fixture()
def store(tmp_path):
    return f"sqlite:///{tmp_path / 'mlflow.db'}", tmp_path


def _cfg(data_dir, store, *overrides):
    uri, tmp = store
    return load_config("tiny", [f"data.path={data_dir}", f"tracking.tracking_uri={uri}",
                                f"train.storage_path={tmp / 'runs'}", *overrides])


def _loss_history(uri, run_id):
    return [m.value for m in sorted(MlflowClient(uri).get_metric_history(run_id, "train_loss"),
                                    key=lambda m: m.step)]


def test_zero2_two_workers_learns_registers_and_serves(trained, tmp_path):
    s, uri, data_dir = trained["summary"], trained["uri"], trained["data"]
    assert s["global_step"] == 40
    losses = _loss_history(uri, s["run_id"])
    assert len(losses) >= 3 and losses[-1] < losses[0], losses
    assert s["alias"] == "champion" and s["model_uri"] == "models:/zero2-model/1"
    # seconds to the first optimizer step, by phase: the phases make up the total
    phases = s["startup_phases"]
    assert {"data_checks", "ray_init", "mlflow_run", "datasets", "ray_train_start",
            "worker_imports", "engine", "restore", "first_step"} <= set(phases), phases
    assert s["startup_seconds"] == pytest.approx(sum(phases.values()), abs=0.5), phases
    # one local node: Ray Train started no preemption watcher (ray_env.LOCAL_TRAIN_ENV)
    import ray
    from ray.util.state import list_actors

    here = ray.get_runtime_context().gcs_address  # this session's Ray, not another on the host
    assert not list_actors(address=here, filters=[("class_name", "=", "PreemptionWatcher")])
    assert list_actors(address=here, filters=[("class_name", "=", "TrainController")])
    # called in-process (the caller's Ray outlives the run): Ray Train's cleaner stays
    assert list_actors(address=here, filters=[("class_name", "=", "PlacementGroupCleaner")])
    # the driver split the data itself (pipeline.worker_shards): its split coordinator, and
    # no dataset manager from Ray Train
    assert not list_actors(address=here, filters=[("class_name", "=", "DatasetManager")])
    assert list_actors(address=here, filters=[("class_name", "=", "SplitCoordinator")])

    # The registered model loads without pickle and scores the val split like training did.
    import mlflow

    from mmdist.serve.predictor import Predictor
    from mmdist.serve.pull import pull

    mlflow.set_tracking_uri(uri)
    model = mlflow.pyfunc.load_model("models:/zero2-model@champion")
    val = pd.read_parquet(data_dir / "val")
    pred = model.predict(val[["text", "image", "audio"]].head(4))
    assert len(pred) == 4 and np.isfinite(pred["score"]).all()
    # its input example is text of the data it trained on, not a made-up sentence
    from mlflow.models import Model

    example = Model.load("models:/zero2-model@champion").load_input_example()
    assert list(example["text"]) == [t for t in val["text"] if t][:2]
    local = Predictor.from_dir(pull("models:/zero2-model@champion", tmp_path / "pulled", uri)["dst"])
    metrics = local.evaluate_dir(data_dir, split="val")
    assert metrics["val_accuracy"] == pytest.approx(s["metrics"]["val_accuracy"], abs=1e-6)


def test_registration_happens_once_and_never_aliases_on_missing_facts(trained, monkeypatch):
    """A registration whose first request reached the server and then timed out, and a
    resubmitted job, both end with one version; a champion lookup that fails for another reason
    than "no champion" registers the version without an alias and names `mmdist promote`."""
    import json
    import os
    import subprocess
    import sys
    from pathlib import Path

    import mlflow
    from mlflow.exceptions import MlflowException

    from mmdist.train import register as reg

    s, uri = trained["summary"], trained["uri"]
    client = MlflowClient(uri)
    model_dir, ckpt = Path(s["checkpoint"]) / "model", s["checkpoint"]
    experiment = client.get_run(s["run_id"]).info.experiment_id
    logged = lambda: client.search_logged_models([experiment])  # noqa: E731
    n_logged = len(logged())
    real, created = mlflow.register_model, []

    def times_out_once(*a, **k):
        v = real(*a, **k)
        created.append(str(v.version))
        if len(created) == 1:
            raise TimeoutError("read timed out (the server stored the version)")
        return v

    monkeypatch.setattr(mlflow, "register_model", times_out_once)
    cfg = trained["cfg"].override(["tracking.model_name=once-model"])
    first = reg.register_model(uri, s["run_id"], model_dir, cfg, s["metrics"], checkpoint=ckpt,
                               wait_s=0)
    again = reg.register_model(uri, s["run_id"], model_dir, cfg, s["metrics"], checkpoint=ckpt,
                               wait_s=0)  # the job resubmitted
    assert created == ["1"]  # the retry found version 1 and created none
    assert first["version"] == again["version"] == "1" and first["alias"] == "champion"
    assert [str(v.version) for v in client.search_model_versions("name = 'once-model'")] == ["1"]
    assert len(logged()) == n_logged  # training's own logged model of this checkpoint, reused
    monkeypatch.undo()

    def no_permission(self, name, alias):
        raise MlflowException("user may not read model aliases", error_code="PERMISSION_DENIED")

    monkeypatch.setattr(MlflowClient, "get_model_version_by_alias", no_permission)
    cfg = trained["cfg"].override(["tracking.model_name=unsure-model"])
    out = reg.register_model(uri, s["run_id"], model_dir, cfg, s["metrics"], checkpoint=ckpt,
                             attempts=2, wait_s=0)
    monkeypatch.undo()
    assert out["version"] == "1" and out["alias"] is None
    assert "mmdist promote models:/unsure-model/1 --alias champion" in out["alias_error"]
    assert "may not read model aliases" in out["alias_error"]
    assert client.get_registered_model("unsure-model").aliases == {}

    r = subprocess.run([sys.executable, "-m", "mmdist.cli", "promote", "models:/unsure-model/1",
                        "--json"], capture_output=True, text=True, timeout=120,
                       env={**os.environ, "MLFLOW_TRACKING_URI": uri})
    assert r.returncode == 0, r.stderr[-2000:]
    assert json.loads(r.stdout.strip().splitlines()[-1])["alias_uri"] == \
        "models:/unsure-model@champion"
    assert str(client.get_model_version_by_alias("unsure-model", "champion").version) == "1"
    r = subprocess.run([sys.executable, "-m", "mmdist.cli", "promote", "models:/unsure-model/7"],
                       capture_output=True, text=True, timeout=120,
                       env={**os.environ, "MLFLOW_TRACKING_URI": uri})
    assert r.returncode == 1 and "models:/unsure-model/7" in r.stderr, r.stderr[-2000:]


def _mixed_modality_shards(tmp_path):
    """A JSONL source whose rows have either an image or an audio clip (never both)."""
    import json

    import soundfile as sf
    from PIL import Image

    from mmdist.data.prepare import convert
    from mmdist.data.sources import JsonlSource

    src = tmp_path / "src"
    src.mkdir()
    colours = {"red": (220, 30, 30), "blue": (30, 30, 220)}
    lines = []
    for i in range(96):
        name = list(colours)[i % 2]
        if i % 4 < 2:  # image-only rows
            Image.new("RGB", (32, 32), colours[name]).save(src / f"{i}.png")
            lines.append({"image": f"{i}.png", "text": f"a {name} square", "label": i % 2})
        else:  # audio-only rows
            tone = np.sin(2 * np.pi * (220 if i % 2 else 880) * np.arange(8000) / 16000)
            sf.write(src / f"{i}.wav", tone.astype(np.float32), 16000)
            lines.append({"audio": f"{i}.wav", "text": f"a {'low' if i % 2 else 'high'} tone",
                          "label": i % 2})
    manifest = src / "rows.jsonl"
    manifest.write_text("\n".join(json.dumps(x) for x in lines))
    cfg = load_config("tiny")
    out = tmp_path / "mixed"
    summary = convert(JsonlSource(str(manifest)), out, cfg.data, seed=0)
    assert summary["rows_written"] == 96
    return out


def test_zero3_two_ranks_with_mixed_modalities(ray_local, tmp_path, store):
    """Every step mixes image-only and audio-only rows on 2 ranks under ZeRO-3: no hang."""
    d = _mixed_modality_shards(tmp_path)
    cfg = _cfg(d, store, "train.num_workers=2", "train.zero_stage=3", "train.max_steps=6",
               "train.eval_every=3", "train.checkpoint_every=6", "tracking.register=false")
    s = train(cfg)
    assert s["global_step"] == 6
    assert 0.0 <= s["metrics"]["val_accuracy"] <= 1.0
