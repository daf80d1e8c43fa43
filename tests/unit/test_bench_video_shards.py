"""`mmdist bench ingest --video`'s data without Ray: the synthetic video shards it writes once,
and the DataLoader side decoding their frames as training does (the Ray side:
tests/integration/test_bench_ingest_video.py)."""

import json

from mmdist.bench.ingest import time_dataloader
from mmdist.bench.realistic_shards import video_shards
from mmdist.config import load_config
from mmdist.data.preprocess import PreprocessSpec
from mmdist.data.shard_batches import shard_dataloader


def test_video_shards_are_written_once_and_read_as_frames(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    cfg = load_config("tiny", ["data.video_frames=3"])
    out = video_shards(20, 8, cfg)
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["source"] == "synthetic_video" and manifest["counts"]["train_rows"] == 20
    assert len(manifest["shards"]) == 3 and "k3-px32" in out.name
    mtime = (out / "manifest.json").stat().st_mtime_ns
    assert video_shards(20, 8, cfg) == out and (out / "manifest.json").stat().st_mtime_ns == mtime

    spec = PreprocessSpec.from_config(cfg.data, augment=False, video=True)
    batches = list(shard_dataloader(out, "train", 8, num_workers=0, spec=spec, verify=False))
    assert sum(len(b["sample_id"]) for b in batches) == 20
    for b in batches:
        assert tuple(b["video"].shape[1:]) == (3, 3, 32, 32) and bool(b["has_video"].all())
        assert b["video"].float().std() > 0  # decoded frames, not the zeros of a missing video
    res = time_dataloader(out, "train", spec, 8, 1, None)
    assert res["epoch_samples_per_s"] > 0
