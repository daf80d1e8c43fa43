"""Video through Ray Data on a real local Ray (2 CPUs): `mmdist prepare` decodes real MP4/WebM
clips written by PyAV (a moving shape with a tone, subtitles beside some, one file that is not
a video) in Ray Data tasks, into shards, quarantine and manifest byte-for-byte those of the
in-process path; batch inference (a Ray Data actor pool) answers those shards as `mmdist
predict` answers the original files."""

import csv
import json

import pandas as pd
import pyarrow.parquet as pq
import pytest
import torch

from mmdist.config import load_config
from mmdist.data import prepare
from mmdist.data.prepare import convert
from mmdist.data.shards import load_tokenizer
from mmdist.data.synthetic_video import generate_clip
from mmdist.data.video import VideoSpec, write_video
from mmdist.data.video_sources import VideoCsvSource
from mmdist.models import build_model, save_model
from mmdist.serve.batch import predict_distributed
from mmdist.serve.predictor import Predictor

RATE = 16000
DATA = ["data.video_frames=4", "data.val_fraction=0.25", "data.shard_rows=3"]


def _clips(root):
    """Eight clips (two containers), subtitles beside three, a broken file; captions CSV."""
    videos = root / "videos"
    videos.mkdir()
    rows = []
    for i in range(8):
        c = generate_clip(i, seed=3, size=32, sample_rate=RATE)
        name = f"clip{i}.webm" if i % 4 == 3 else f"clip{i}.mp4"
        write_video(videos / name, c.frames, 8, c.audio, RATE)
        if i % 3 == 0:
            (videos / name).with_suffix(".srt").write_text(
                f"1\n00:00:00,000 --> 00:00:02,000\n{c.subtitles}\n")
        rows.append((name.split(".")[0] if i == 5 else name, c.caption))  # 5: a bare name
    (videos / "broken.mp4").write_bytes(b"not a video " * 40)
    rows.append(("broken.mp4", "never decoded"))
    captions = root / "captions.csv"
    with captions.open("w", newline="") as f:
        csv.writer(f).writerows([("video_id", "caption"), *rows])
    return videos, captions


def _content(out):
    manifest = json.loads((out / "manifest.json").read_text())
    tables = {s["path"]: pq.read_table(out / s["path"]).to_pylist() for s in manifest["shards"]}
    return manifest, tables, (out / "quarantine.jsonl").read_text()


@pytest.fixture(scope="module")
def prepared(ray_local, tmp_path_factory):
    """The clips prepared in this process and with Ray Data (`auto` choosing it), the caption
    as the text and as the target."""
    root = tmp_path_factory.mktemp("video_ray")
    videos, captions = _clips(root)
    data = load_config("tiny", DATA).data
    out, summaries = {}, {}
    mp = pytest.MonkeyPatch()
    # `--parallel auto` goes to Ray from VIDEO_RAY_THRESHOLD video files (far fewer than
    # RAY_THRESHOLD rows); lowered to these 9 files, so `auto` must choose Ray once here
    assert prepare.VIDEO_RAY_THRESHOLD < prepare.RAY_THRESHOLD
    mp.setattr(prepare, "VIDEO_RAY_THRESHOLD", 9)
    try:
        for mode in ("local", "ray"):
            for role in ("text", "target"):
                src = VideoCsvSource(str(captions), str(videos), VideoSpec.from_config(data),
                                     caption_as=role)
                out[mode, role] = root / f"{mode}-{role}"
                parallel = "auto" if (mode, role) == ("ray", "target") else mode
                summaries[mode, role] = convert(src, out[mode, role], data, seed=1,
                                                parallel=parallel)
    finally:
        mp.undo()
    return {"root": root, "videos": videos, "out": out, "summaries": summaries}


def test_video_rows_decode_in_ray_data_and_equal_the_in_process_shards(ray_local, prepared):
    assert ray_local.cluster_resources()["CPU"] == 2  # the session cluster: explicit num_cpus
    for (mode, _), s in prepared["summaries"].items():
        assert s["parallel"] == mode and s["rows_in"] == 9, s
        assert s["rows_written"] == 8 and s["rows_quarantined"] == 1, s
    out = prepared["out"]
    for role in ("text", "target"):
        (m_local, t_local, q_local), (m_ray, t_ray, q_ray) = (
            _content(out["local", role]), _content(out["ray", role]))
        assert t_ray == t_local, role  # every column of every row of every shard
        assert q_ray == q_local and "undecodable video" in q_ray
        assert [s["sha256"] for s in m_ray["shards"]] == [s["sha256"] for s in m_local["shards"]]
        rows = [r for t in t_ray.values() for r in t]
        assert len(m_ray["shards"]) > 2 and all(r["video"] for r in rows)
        assert sum(r["audio"] is not None for r in rows) == 8
    # subtitles are the text only when the caption is the target
    rows = {r["sample_id"]: r for t in _content(out["ray", "target"])[1].values() for r in t}
    assert rows[0]["text"] == generate_clip(0, 3, 32).subtitles and rows[1]["text"] is None
    assert rows[1]["target"] == generate_clip(1, 3, 32).caption


def test_batch_inference_reads_the_video_column(ray_local, prepared, tmp_path):
    shards = prepared["out"]["ray", "text"]
    cfg = load_config("tiny", [*DATA, "model.task=classify", "model.num_classes=4",
                               "model.modalities=[text,audio,video]"])
    torch.manual_seed(0)
    save_model(build_model(cfg, load_tokenizer(shards).vocab_size).eval(), tmp_path / "model",
               tokenizer_dir=shards / "tokenizer")
    s = predict_distributed(tmp_path / "model", shards, tmp_path / "preds")
    preds = pd.read_parquet(tmp_path / "preds").set_index("sample_id").sort_index()
    assert s["rows_in"] == s["rows_out"] == len(preds) == 8
    # the same answers as `mmdist predict --video FILE --text CAPTION` on the original files
    names = sorted(p.name for p in prepared["videos"].glob("clip*.*") if p.suffix != ".srt")
    rows = [{"video": str(prepared["videos"] / n), "text": generate_clip(i, 3, 32).caption}
            for i, n in enumerate(names)]
    direct = pd.DataFrame(Predictor.from_dir(tmp_path / "model").predict_rows(rows))
    assert list(preds["label"]) == list(direct["label"])
    assert preds["probability"].to_numpy() == pytest.approx(direct["probability"].to_numpy(),
                                                            abs=1e-5)
