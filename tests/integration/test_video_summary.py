"""The video summarisation preset end to end at tiny size: `ref_video_summary` as shipped (2 Ray
Train workers, DeepSpeed ZeRO-2 over gloo, fp32, LoRA on the LM) on the synthetic video source
that `mmdist train` generates without data.path (``data.synthetic_source``), a real local Ray and
MLflow store, registered, then `mmdist predict --video` on a real MP4 (written by PyAV, with
subtitles beside it) on the registered model in a fresh process. The LM is a tiny random Llama
saved with ``save_pretrained`` whose tokenizer holds the source's words."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pandas as pd
import torch

from mmdist.config import load_config
from mmdist.data.synthetic_video import generate_clip, summary_of
from mmdist.data.video import write_video
from mmdist.train.run import ensure_data, train
from tests.tiny_hf import tiny_lm

# the sizes the preset test uses; everything else as shipped
TINY = ["model.size=tiny", "data.max_text_len=16", "data.n_mels=16",
        "model.modality_tokens={video: 2, audio: 2}", "data.synthetic_samples=96"]


def make_lm(path):
    """A tiny random Llama whose tokenizer holds every word of the subtitles and summaries."""
    texts = []
    for i in range(64):
        c = generate_clip(i, 99, 8)
        texts += [c.subtitles, summary_of(c.colour, c.shape, c.direction, c.pitch)]
    torch.manual_seed(0)
    return tiny_lm(path, "llama", hidden=32, layers=2, texts=texts, vocab_size=200)


def test_ref_video_summary_trains_registers_and_predicts_a_video(ray_local, tmp_path):
    lm = make_lm(tmp_path / "lm")
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    cfg = load_config("ref_video_summary", [
        *TINY, f"model.decoder_pretrained={lm}", f"tracking.tracking_uri={uri}",
        f"train.storage_path={tmp_path / 'runs'}", "train.max_steps=4", "train.eval_every=4",
        "train.checkpoint_every=4", "train.micro_batch_size=8",
        "tracking.model_name=ref-video-test"])
    shipped = load_config("ref_video_summary")
    for key in ("num_workers", "zero_stage", "precision"):
        assert getattr(cfg.train, key) == getattr(shipped.train, key), key
    assert cfg.model.task == "prompted" and cfg.data.path is None

    # what train reads without data.path: video clips, subtitles as text, summaries as targets
    data = ensure_data(cfg, tmp_path / "runs" / "data")
    val = pd.read_parquet(data / "val")
    c = generate_clip(int(val["sample_id"].iloc[0]), cfg.train.seed, cfg.data.image_size)
    assert val["target"].iloc[0] == summary_of(c.colour, c.shape, c.direction, c.pitch)
    assert val["text"].iloc[0] == c.subtitles and val["video"].notna().all()

    s = train(cfg)
    assert s["global_step"] == 4 and s["alias"] == "champion", s
    assert 0.0 <= s["metrics"]["val_bleu"] <= 1.0

    # a user's clip: a real MP4 with its sound, the subtitles beside it
    write_video(tmp_path / "clip.mp4", c.frames, 8, c.audio, cfg.data.sample_rate)
    (tmp_path / "clip.srt").write_text(f"1\n00:00:00,000 --> 00:00:02,000\n{c.subtitles}\n")
    run = [sys.executable, "-m", "mmdist.cli", "predict", "--model",
           "models:/ref-video-test@champion", "--tracking-uri", uri, "--cache",
           str(tmp_path / "cache")]
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    r = subprocess.run([*run, "--video", str(tmp_path / "clip.mp4"), "--json"],
                       capture_output=True, text=True, timeout=300, env=env)
    assert r.returncode == 0, r.stderr[-2000:]
    answer = json.loads(r.stdout.strip().splitlines()[-1])
    assert answer["task"] == "prompted" and isinstance(answer["text"], str), answer
    # a file that is not a video: refused, naming the field
    (tmp_path / "bad.mp4").write_bytes(b"not a video" * 64)
    bad = subprocess.run([*run, "--video", str(tmp_path / "bad.mp4")], capture_output=True,
                         text=True, timeout=300, env=env)
    assert bad.returncode != 0 and "column 'video'" in bad.stderr, bad.stderr[-2000:]
