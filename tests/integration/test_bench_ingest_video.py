"""`mmdist bench ingest --video` for real at tiny size: the synthetic video source's shards,
the same frame-strip decoding on a DataLoader and on Ray Data; figures printed, never timed."""

import argparse
import json

from mmdist.bench import ingest


def test_bench_ingest_video_reports_frames_per_second(ray_local, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # the generated shards go to ./.cache/bench_ingest
    parser = argparse.ArgumentParser()
    ingest.configure_parser(parser)
    args = parser.parse_args(["--video", "--rows", "48", "--shard-rows", "16", "--batch-size",
                              "8", "--cpus", "1", "--workers", "2", "--config", "tiny"])
    s = ingest.run(args)
    manifest = json.loads((tmp_path / s["data"] / "manifest.json").read_text())
    assert manifest["source"] == "synthetic_video" and manifest["counts"]["rows_written"] == 48
    assert s["video_frames"] == 8 and s["rows"] == 48  # tiny: data.video_frames as default
    for side in ("ray_data", "dataloader"):
        rate = s[f"{side}_epoch_samples_per_s"]
        # frames/s = samples/s x 8 (both rounded to 0.1 apart)
        assert rate > 0 and abs(s[f"{side}_frames_per_s"] - rate * 8) < 1, side
