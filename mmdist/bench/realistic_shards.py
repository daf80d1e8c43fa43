"""Realistic shards for `mmdist bench ingest`: 224-pixel JPEGs, 2-5 s of 22.05 kHz audio and
sentence captions, written once into ``.cache/bench_ingest/``; with ``--video``, the synthetic
video source's clips (frame strips + sound) instead."""

from __future__ import annotations

import io
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import soundfile as sf
from PIL import Image, ImageDraw

from mmdist.data.generated import generated_source
from mmdist.data.prepare import convert
from mmdist.data.shards import MANIFEST, ManifestError, verify_manifest

_WORDS = ("a dog runs across the green field while children play near the old wooden fence "
          "under a bright sky with clouds and a man holds an umbrella on the busy street as "
          "cars pass by the red building next to the river where birds sing loudly").split()


@dataclass(frozen=True)
class RealisticSource:
    """224-pixel JPEGs (smooth content + shapes + grain), 2-5 s of 22.05 kHz mono audio, and a
    10-20 word caption per row; a pure function of (seed, index)."""

    num_samples: int
    seed: int = 0
    name: str = "bench-realistic"

    def records(self):
        for i in range(self.num_samples):
            yield {"sample_id": i, "origin": f"bench index={i}", "group": str(i)}

    def load(self, record: dict[str, Any]) -> dict[str, Any]:
        i = record["sample_id"]
        rng = np.random.default_rng([self.seed, i])
        base = rng.integers(0, 256, size=(8, 8, 3), dtype=np.uint8)
        img = Image.fromarray(base).resize((224, 224), Image.BICUBIC)
        draw = ImageDraw.Draw(img)
        for _ in range(3):
            x, y = rng.integers(0, 200, size=2)
            w, h = rng.integers(20, 100, size=2)
            draw.ellipse([x, y, x + w, y + h], fill=tuple(int(c) for c in rng.integers(0, 256, 3)))
        arr = np.asarray(img, dtype=np.int16) + rng.integers(-8, 9, size=(224, 224, 3))
        buf = io.BytesIO()
        Image.fromarray(np.clip(arr, 0, 255).astype(np.uint8)).save(buf, format="JPEG", quality=85)
        sr = 22050
        n = int(sr * rng.uniform(2.0, 5.0))
        t = np.arange(n) / sr
        wave = 0.3 * np.sin(2 * np.pi * rng.uniform(100, 3000) * t) + rng.normal(0, 0.05, n)
        abuf = io.BytesIO()
        sf.write(abuf, wave.astype(np.float32), sr, format="WAV", subtype="PCM_16")
        words = rng.choice(_WORDS, size=int(rng.integers(10, 21)))
        return {"sample_id": i, "text": " ".join(words).capitalize() + ".", "target": None,
                "label": int(i % 8), "image": buf.getvalue(), "audio": abuf.getvalue()}


def realistic_shards(rows: int, shard_rows: int, cfg: Any, seed: int = 0) -> Path:
    """Write (once) and return ``.cache/bench_ingest/rows{rows}-shard{shard_rows}``."""
    out = Path(".cache") / "bench_ingest" / f"rows{rows}-shard{shard_rows}-seed{seed}"
    if (out / MANIFEST).exists():
        try:
            verify_manifest(out)
            return out
        except ManifestError:
            pass
    data = cfg.override({"data.val_fraction": 0.0, "data.shard_rows": shard_rows}).data
    print(f"writing realistic shards to {out} ...", flush=True)
    convert(RealisticSource(rows, seed), out, data, seed=seed, params={"bench": rows},
            parallel="local")
    return out


def video_shards(rows: int, shard_rows: int, cfg: Any, seed: int = 0) -> Path:
    """Write (once) and return the synthetic video source's shards at ``cfg.data``'s sizes
    (``data.video_frames`` frames of ``data.image_size`` a row, as `mmdist prepare` stores
    them) in ``.cache/bench_ingest/``."""
    data = cfg.override({"data.val_fraction": 0.0, "data.shard_rows": shard_rows,
                         "data.synthetic_samples": rows}).data
    out = (Path(".cache") / "bench_ingest" / f"video-rows{rows}-shard{shard_rows}"
           f"-k{data.video_frames}-px{data.image_size}-seed{seed}")
    if (out / MANIFEST).exists():
        try:
            verify_manifest(out)
            return out
        except ManifestError:
            pass
    print(f"writing video shards to {out} ...", flush=True)
    convert(generated_source("synthetic_video", data, seed), out, data, seed=seed,
            params={"bench": rows}, parallel="local")
    return out
