"""The translation preset end to end at tiny size: `mmdist prepare --source mmt`, the `ref_mmt`
preset trained as shipped (2 Ray Train workers, DeepSpeed ZeRO-2 over gloo, fp32, LoRA on the
LM) on a real local Ray and a real MLflow store, registered, then `mmdist predict --text
--image` on the registered model in a fresh process. The LM is a tiny random Llama saved with
``save_pretrained`` (tests/unit/mmt_gap.py), as a user's local directory would be."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pandas as pd

from mmdist.cli import main
from mmdist.config import load_config
from mmdist.data.mmt import generate_row
from mmdist.train.run import train
from tests.unit.mmt_gap import make_lm

# the sizes the preset test uses; everything else as shipped
TINY = ["model.size=tiny", "data.image_size=32", "data.max_text_len=12",
        "model.modality_tokens={image: 4}"]


def test_ref_mmt_prepares_trains_registers_and_predicts(ray_local, tmp_path, capsys):
    lm = make_lm(tmp_path / "lm")
    data = tmp_path / "mmt"
    keys = [*TINY, f"model.decoder_pretrained={lm}"]
    assert main(["prepare", "--source", "mmt", "--out", str(data), "--num-samples", "192",
                 "--config", "ref_mmt", "--json", *keys]) == 0, capsys.readouterr().err
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    cfg = load_config("ref_mmt", [
        *keys, f"data.path={data}", f"tracking.tracking_uri={uri}",
        f"train.storage_path={tmp_path / 'runs'}", "train.max_steps=6", "train.eval_every=6",
        "train.checkpoint_every=6", "tracking.model_name=ref-mmt-test"])
    shipped = load_config("ref_mmt")
    for key in ("num_workers", "zero_stage", "precision"):
        assert getattr(cfg.train, key) == getattr(shipped.train, key), key
    assert cfg.model.lora == shipped.model.lora and cfg.model.task == "prompted"

    s = train(cfg)
    assert s["global_step"] == 6 and s["alias"] == "champion", s
    assert 0.0 <= s["metrics"]["val_bleu"] <= 1.0
    assert {"val_loss", "val_accuracy", "val_perplexity"} <= set(s["metrics"])

    # a user's files: one val row's image, its source sentence as --text
    val = pd.read_parquet(data / "val").iloc[0]
    (tmp_path / "x.png").write_bytes(val["image"])
    assert val["text"] == generate_row(int(val["sample_id"]), 0, 32).text
    r = subprocess.run(
        [sys.executable, "-m", "mmdist.cli", "predict", "--model", "models:/ref-mmt-test@champion",
         "--tracking-uri", uri, "--cache", str(tmp_path / "cache"), "--text", val["text"],
         "--image", str(tmp_path / "x.png"), "--json"],
        capture_output=True, text=True, timeout=300, env={**os.environ, "HF_HUB_OFFLINE": "1"})
    assert r.returncode == 0, r.stderr[-2000:]
    answer = json.loads(r.stdout.strip().splitlines()[-1])
    assert answer["task"] == "prompted" and isinstance(answer["text"], str), answer
    # the same without the image: the LM reads the learned "missing" image tokens instead
    r2 = subprocess.run(
        [sys.executable, "-m", "mmdist.cli", "predict", "--model", "models:/ref-mmt-test@champion",
         "--tracking-uri", uri, "--cache", str(tmp_path / "cache"), "--text", val["text"]],
        capture_output=True, text=True, timeout=300, env={**os.environ, "HF_HUB_OFFLINE": "1"})
    assert r2.returncode == 0 and "generated:" in r2.stdout, r2.stderr[-2000:]
