"""Video files written here with PyAV become shard rows: exact frame sampling, the audio track,
subtitles, and quarantine of corrupt and empty videos with their reasons."""

import csv
import json
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest

from mmdist.config import DataConfig
from mmdist.data.prepare import convert
from mmdist.data.preprocess import PreprocessSpec, arrow_to_numpy, preprocess_batch
from mmdist.data.shards import load_tokenizer
from mmdist.data.sources import JsonlSource
from mmdist.data.video import (
    VideoSpec,
    decode_video,
    strip_to_frames,
    subtitle_text,
    uniform_indices,
    write_video,
)
from mmdist.data.video_sources import VideoCsvSource

RATE = 16000
N_FRAMES, FPS, STEP = 20, 8, 12  # frame i is a flat grey of value STEP * i
DATA = DataConfig(image_size=16, sample_rate=RATE, audio_seconds=1.0, vocab_size=60,
                  shard_rows=4, val_fraction=0.25, video_frames=6)


def _frames(n=N_FRAMES, h=24, w=32) -> np.ndarray:
    f = np.zeros((n, h, w, 3), dtype=np.uint8)
    for i in range(n):
        f[i] = STEP * i
    return f


def _tone(freq=440.0, seconds=N_FRAMES / FPS) -> np.ndarray:
    t = np.arange(int(RATE * seconds)) / RATE
    return (0.5 * np.sin(2 * np.pi * freq * t)).astype(np.float32)


def _frame_numbers(frames: np.ndarray) -> list[int]:
    """Which written frame each decoded one is (by its grey level)."""
    return [int(round(float(f.mean()) / STEP)) for f in frames]


def _rows(out: Path) -> list[dict]:
    m = json.loads((out / "manifest.json").read_text())
    return sorted((r for s in m["shards"] for r in pq.read_table(out / s["path"]).to_pylist()),
                  key=lambda r: r["sample_id"])


def _quarantine(out: Path) -> list[dict]:
    return [json.loads(x) for x in (out / "quarantine.jsonl").read_text().splitlines()]


def _dominant_hz(wave: np.ndarray, rate: int) -> float:
    spec = np.abs(np.fft.rfft(wave * np.hanning(len(wave))))
    return float(np.fft.rfftfreq(len(wave), 1 / rate)[spec.argmax()])


def test_uniform_indices_are_segment_centres():
    assert uniform_indices(20, 6) == [1, 5, 8, 11, 15, 18]
    assert uniform_indices(8, 8) == list(range(8))
    assert uniform_indices(3, 6) == [0, 0, 1, 1, 2, 2]  # fewer frames than K: repeats
    with pytest.raises(ValueError, match="n=0"):
        uniform_indices(0, 4)


@pytest.mark.parametrize("suffix", [".mp4", ".webm", ".avi"])
def test_k_frames_sampled_exactly_and_audio_track_extracted(tmp_path, suffix):
    path = write_video(tmp_path / f"clip{suffix}", _frames(), FPS, _tone(440.0), RATE)
    d = decode_video(path, VideoSpec(frames=6, size=16, sample_rate=RATE))
    assert d.num_frames == N_FRAMES
    assert d.indices == uniform_indices(N_FRAMES, 6) == [1, 5, 8, 11, 15, 18]
    assert _frame_numbers(d.frames) == d.indices  # the frames are those frames
    assert d.frames.shape == (6, 16, 16, 3)
    assert d.audio is not None
    assert abs(len(d.audio) / RATE - N_FRAMES / FPS) < 0.1  # codec padding only
    assert abs(_dominant_hz(d.audio, RATE) - 440.0) < 5
    # at a given fps: the frames at 0, 0.5, 1.0 ... s, at most K, none past the end
    d = decode_video(path, VideoSpec(frames=8, fps=2.0, size=16, sample_rate=RATE))
    assert d.indices == [0, 4, 8, 12, 16]
    assert _frame_numbers(d.frames) == [0, 4, 8, 12, 16]


def test_subtitles_srt_and_vtt():
    srt = b"1\n00:00:00,000 --> 00:00:01,000\nhello <i>there</i>\n\n2\n00:00:01,000 --> " \
          b"00:00:02,000\ngeneral kenobi\n"
    vtt = b"WEBVTT\n\nNOTE a comment\n\n00:00.000 --> 00:01.000\nfirst line\nsecond\n\n" \
          b"cue-2\n00:01.000 --> 00:02.000\nthird\n"
    assert subtitle_text(srt) == "hello there general kenobi"
    assert subtitle_text(vtt) == "first line second third"


def test_video_jsonl_converts_to_shards_with_frames_audio_and_subtitles(tmp_path):
    v = tmp_path / "videos"
    v.mkdir()
    write_video(v / "a.mp4", _frames(), FPS, _tone(440.0), RATE)
    write_video(v / "b.webm", _frames(), FPS, _tone(880.0), RATE)
    write_video(v / "silent.avi", _frames(), FPS)  # no audio track
    (v / "b.srt").write_text("1\n00:00:00,000 --> 00:00:02,000\na dog barks twice\n")
    lines = [{"video": "videos/a.mp4", "text": "a grey fade", "label": 1},
             {"video": "videos/b.webm", "label": 0},  # text from b.srt
             {"video": "videos/silent.avi", "text": "no sound here"}]
    manifest = tmp_path / "clips.jsonl"
    manifest.write_text("".join(json.dumps(x) + "\n" for x in lines))
    out = tmp_path / "shards"
    summary = convert(JsonlSource(str(manifest), video_spec=VideoSpec.from_config(DATA)), out,
                      DATA, parallel="local")
    assert summary["rows_written"] == 3 and summary["rows_quarantined"] == 0
    rows = _rows(out)
    assert [r["text"] for r in rows] == ["a grey fade", "a dog barks twice", "no sound here"]
    for r in rows:
        frames = strip_to_frames(r["video"], 6, 16)
        assert frames.shape == (6, 3, 16, 16)
        assert _frame_numbers(frames.transpose(0, 2, 3, 1)) == [1, 5, 8, 11, 15, 18]
    assert rows[2]["audio"] is None  # the silent video has no audio modality
    import io

    import soundfile as sf
    for r, hz in zip(rows[:2], (440.0, 880.0)):
        wave, rate = sf.read(io.BytesIO(r["audio"]), dtype="float32")
        assert rate == RATE and abs(_dominant_hz(wave, rate) - hz) < 5
    # the batch a video model trains on: K frames per row, has_video, the audio as log-mel
    manifest_preprocess = json.loads((out / "manifest.json").read_text())["preprocess"]
    assert manifest_preprocess["video_frames"] == 6
    spec = PreprocessSpec.from_config(DATA, video=True)
    table = pq.read_table(out / json.loads((out / "manifest.json").read_text())["shards"][0]["path"])
    batch = preprocess_batch(arrow_to_numpy(table), spec, load_tokenizer(out))
    assert batch["video"].shape == (table.num_rows, 6, 3, 16, 16) and batch["has_video"].all()
    # a model without video moves no frame bytes
    assert preprocess_batch(arrow_to_numpy(table), PreprocessSpec.from_config(DATA),
                            load_tokenizer(out))["video"].shape == (table.num_rows, 0, 3, 16, 16)


def test_corrupt_empty_and_missing_videos_are_quarantined_with_reasons(tmp_path):
    v = tmp_path / "videos"
    v.mkdir()
    write_video(v / "good.mp4", _frames(), FPS, _tone(), RATE)
    good = (v / "good.mp4").read_bytes()
    (v / "garbage.mp4").write_bytes(b"this is not a video at all " * 50)
    (v / "empty.mp4").write_bytes(b"")
    (v / "truncated.mp4").write_bytes(good[:400])
    import soundfile as sf
    sf.write(v / "sound_only.wav", _tone(), RATE)  # a file FFmpeg reads, with no video stream
    rows = [("good.mp4", "fine"), ("garbage.mp4", "bad bytes"), ("empty.mp4", "zero bytes"),
            ("truncated", "cut short"), ("sound_only.wav", "audio only"), ("gone.mp4", "missing"),
            ("../escape.mp4", "outside")]
    captions = tmp_path / "captions.csv"
    with captions.open("w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["video_id", "caption"])
        w.writerows(rows)
    out = tmp_path / "shards"
    summary = convert(VideoCsvSource(str(captions), str(v), VideoSpec.from_config(DATA)), out,
                      DATA, parallel="local")
    assert summary["rows_in"] == 7 and summary["rows_written"] == 1
    assert summary["rows_in"] == summary["rows_written"] + summary["rows_quarantined"]
    reasons = {q["sample_id"]: q["reason"] for q in _quarantine(out)}
    assert reasons[1].startswith("undecodable video: InvalidDataError")
    assert reasons[2] == "empty video: empty file (0 bytes)"
    assert reasons[3].startswith("undecodable video")  # .mp4 found for the bare name
    assert reasons[4] == "empty video: no video stream"
    assert reasons[5].startswith("missing video file:") and "gone.mp4" in reasons[5]
    assert reasons[6].startswith("video path outside the dataset folder")
    assert _rows(out)[0]["text"] == "fine"


def test_a_video_longer_than_the_limit_is_quarantined(tmp_path):
    write_video(tmp_path / "long.mp4", _frames(), FPS)
    (tmp_path / "m.jsonl").write_text(json.dumps({"video": "long.mp4", "text": "x"}) + "\n"
                                      + json.dumps({"text": "just text"}) + "\n")
    data = DATA.model_copy(update={"max_video_seconds": 1.0})
    out = tmp_path / "shards"
    convert(JsonlSource(str(tmp_path / "m.jsonl"), video_spec=VideoSpec.from_config(data)), out,
            data, parallel="local")
    (q,) = _quarantine(out)
    assert q["reason"] == "video too long: 2.5 s, over data.max_video_seconds=1"
