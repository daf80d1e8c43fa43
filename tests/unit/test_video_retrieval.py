"""Video-text retrieval: the contrastive task on the synthetic moving-shape clips, whose captions
name the colour, the shape and the direction of motion (and a pitch the frames do not show).
Trained in one process at tiny size, scored by recall@K both ways (t2v: a caption finds its
clip; v2t: a clip finds its caption) on clips it never saw."""

import pytest
import torch

from mmdist.config import load_config
from mmdist.data.preprocess import PreprocessSpec, preprocess_batch
from mmdist.data.schema import as_tensors
from mmdist.data.synthetic_video import SyntheticVideoSource
from mmdist.data.tokenizer import TextTokenizer
from mmdist.data.video import VideoSpec
from mmdist.models import build_model
from mmdist.tasks import compute_metrics

N_TRAIN, N_VAL, BATCH = 512, 64, 32


def _rows(cfg, n: int, seed: int, tok: TextTokenizer | None = None):
    src = SyntheticVideoSource(n, seed, VideoSpec.from_config(cfg.data), captions="text")
    rows = [src.load(r) for r in src.records()]
    tok = tok or TextTokenizer.train([r["text"] for r in rows], 200)
    cols = {k: [r[k] for r in rows] for k in rows[0]}
    spec = PreprocessSpec.from_config(cfg.data, video=True)
    return as_tensors(preprocess_batch(cols, spec, tok)), tok


def retrieval(frames: int = 4, steps: int = 300, seed: int = 0) -> dict[str, float]:
    """Val recall@K of a text-video contrastive model (temporal transformer over ``frames``)."""
    cfg = load_config("tiny", ["model.task=contrastive", "model.modalities=[text,video]",
                               "model.video_temporal=transformer", f"data.video_frames={frames}",
                               "data.image_size=32", f"train.micro_batch_size={BATCH}"])
    train, tok = _rows(cfg, N_TRAIN, 0)
    val, _ = _rows(cfg, N_VAL, 1, tok)
    torch.manual_seed(seed)
    model = build_model(cfg, tok.vocab_size)
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3, weight_decay=0.01)
    for step in range(steps):
        i = (step * BATCH) % N_TRAIN
        for g in opt.param_groups:
            g["lr"] = 3e-3 * min(1.0, (step + 1) / 20)
        loss = model({k: v[i:i + BATCH] for k, v in train.items()})["loss"]
        opt.zero_grad()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
    model.eval()
    with torch.no_grad():
        out = model.eval_outputs(val)
    return compute_metrics(cfg, out, model.vocab)


@pytest.mark.slow
def test_text_video_retrieval_learns_both_ways():
    """Measured 2026-12-03 (300 steps of 32 pairs, 64 unseen clips): R@5 0.27 t2v / 0.28 v2t,
    R@10 0.55 / 0.52 (chance 0.08 / 0.16); train loss 3.5 -> 1.8. Not yet past what colour and
    shape alone allow (R@5 0.31 when the direction is ignored): at this size and length the
    model has not learned the motion, and this test does not claim it (README, Video).
    Slow: 127 s of CPU (226 s of wall time on the shared 2-core machine), not the 40 s aimed
    at; fewer steps stayed near chance (R@5 0.16 / 0.20 at 150 steps)."""
    r = retrieval()
    for direction in ("t2v", "v2t"):
        assert r[f"val_r5_{direction}"] > 2.5 * 5 / N_VAL, (direction, r)
        assert r[f"val_r10_{direction}"] > 2 * 10 / N_VAL, (direction, r)
    assert r["val_r1_mean"] == (r["val_r1_t2v"] + r["val_r1_v2t"]) / 2
