"""From the registry to users, on a model trained and registered by the `trained` fixture."""

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch

from mmdist.serve.batch import evaluate_distributed, predict_distributed
from mmdist.serve.predictor import Predictor
from mmdist.serve.pull import pull


def _mmdist(*args, env=None):
    return subprocess.run([sys.executable, "-m", "mmdist.cli", *args], capture_output=True,
                          text=True, timeout=300, env={**os.environ, **(env or {})})


@pytest.fixture(scope="module")
def pulled(trained, tmp_path_factory):
    dst = tmp_path_factory.mktemp("pulled") / "model"
    s = pull("models:/zero2-model@champion", dst, trained["uri"])
    return Path(s["dst"]), s


@pytest.fixture(scope="module")
def example(trained, tmp_path_factory):
    """One val row written out as real files, as a user would have them."""
    val = pd.read_parquet(trained["data"] / "val").iloc[0]
    d = tmp_path_factory.mktemp("example")
    (d / "x.png").write_bytes(val["image"])
    (d / "x.wav").write_bytes(val["audio"])
    return {"image": str(d / "x.png"), "audio": str(d / "x.wav"), "text": val["text"]}


def test_pull_by_alias_and_version_is_self_contained(trained, pulled, tmp_path):
    d, s = pulled
    for f in ("model.safetensors", "config.json", "tokenizer", "README.md", "data_manifest.json"):
        assert (d / f).exists(), f
    assert not list(d.rglob("*.pkl")) and not list(d.rglob("*.pt"))
    card = (d / "README.md").read_text()
    assert "val_accuracy" in card and s["data_manifest_sha256"] in card and "fusion" in card
    v = pull("models:/zero2-model/1", tmp_path / "v1", trained["uri"])
    assert (Path(v["dst"]) / "model.safetensors").read_bytes() == \
        (d / "model.safetensors").read_bytes()


def test_predict_all_modalities_and_one_missing(pulled, example):
    d, _ = pulled
    full = _mmdist("predict", "--model", str(d), "--image", example["image"], "--audio",
                   example["audio"], "--text", example["text"], "--json")
    assert full.returncode == 0, full.stderr
    a = json.loads(full.stdout.strip().splitlines()[-1])
    no_audio = _mmdist("predict", "--model", str(d), "--image", example["image"], "--text",
                       example["text"], "--json")
    assert no_audio.returncode == 0, no_audio.stderr
    b = json.loads(no_audio.stdout.strip().splitlines()[-1])
    assert a["task"] == b["task"] == "itm"
    assert 0.0 <= a["score"] <= 1.0 and 0.0 <= b["score"] <= 1.0
    assert a["score"] != b["score"]
    human = _mmdist("predict", "--model", str(d), "--text", example["text"])
    assert human.returncode == 0 and "match score" in human.stdout


def test_pyfunc_in_a_fresh_process_matches_predict(trained, example, pulled):
    d, _ = pulled
    code = (
        "import json, sys, mlflow, pandas as pd\n"
        f"mlflow.set_tracking_uri({trained['uri']!r})\n"
        "m = mlflow.pyfunc.load_model('models:/zero2-model@champion')\n"
        f"df = pd.DataFrame([{json.dumps(example)}])\n"
        "print(json.dumps(float(m.predict(df)['score'][0])))\n")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-2000:]
    pyfunc_score = json.loads(r.stdout.strip().splitlines()[-1])
    cli = Predictor.from_dir(d).predict_rows([example])[0]["score"]
    assert pyfunc_score == pytest.approx(cli, abs=1e-6)


def test_evaluate_reproduces_the_training_val_metric(ray_local, trained, pulled):
    d, _ = pulled
    metrics = evaluate_distributed(d, trained["data"], "val", actors=1)
    assert metrics["val_accuracy"] == pytest.approx(
        trained["summary"]["metrics"]["val_accuracy"], abs=1e-6)


def test_batch_inference_one_prediction_per_row(ray_local, trained, pulled, tmp_path):
    d, _ = pulled
    s = predict_distributed(d, trained["data"], tmp_path / "preds", splits=("val",))
    preds = pd.read_parquet(tmp_path / "preds")
    val = pd.read_parquet(trained["data"] / "val")
    assert s["rows_in"] == s["rows_out"] == len(val) == len(preds)
    assert sorted(preds["sample_id"]) == sorted(val["sample_id"])
    assert np.isfinite(preds["score"]).all()


def test_planted_pickle_is_refused_and_never_unpickled(pulled, tmp_path):
    d, _ = pulled
    marker = tmp_path / "PWNED"

    class Evil:
        def __reduce__(self):
            return (os.system, (f"touch {marker}",))

    bad = tmp_path / "bad"
    bad.mkdir()
    for f in ("config.json",):
        (bad / f).write_bytes((d / f).read_bytes())
    (bad / "tokenizer").mkdir()
    torch.save({"w": Evil()}, bad / "model.safetensors")  # a pickle under the safetensors name
    r = _mmdist("predict", "--model", str(bad), "--text", "a red circle", "--json")
    assert r.returncode == 1 and "pickle" in r.stderr
    torch.save({"w": Evil()}, bad / "pytorch_model.bin")
    (bad / "model.safetensors").unlink()
    r = _mmdist("predict", "--model", str(bad), "--text", "a red circle")
    assert r.returncode == 1 and "pickle" in r.stderr
    assert not marker.exists()
