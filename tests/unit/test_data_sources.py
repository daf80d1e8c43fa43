"""Each source converts a fixture of real files; bad rows land in quarantine with reasons."""

import argparse
import csv
import io
import json
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest
import soundfile as sf
from PIL import Image

from mmdist.cli import CommandError
from mmdist.config import DataConfig, load_config
from mmdist.data import prepare
from mmdist.data.prepare import convert, prepare_synthetic
from mmdist.data.shards import ManifestError, split_of_groups, verify_manifest
from mmdist.data.sources import (
    AudioCapsSource,
    CocoSource,
    JsonlSource,
    SourceError,
    SyntheticSource,
)

DATA = DataConfig(image_size=16, sample_rate=8000, audio_seconds=0.25, vocab_size=80,
                  shard_rows=3, val_fraction=0.25)


def _png(path: Path, rgb=(10, 200, 30), fmt="PNG"):
    Image.new("RGB", (20, 24), rgb).save(path, format=fmt)


def _wav(path: Path, fmt="WAV", freq=440.0):
    t = np.arange(2000) / 8000
    sf.write(path, (0.3 * np.sin(2 * np.pi * freq * t)).astype(np.float32), 8000, format=fmt)


def _quarantine(out: Path) -> list[dict]:
    return [json.loads(x) for x in (out / "quarantine.jsonl").read_text().splitlines()]


def _all_rows(out: Path) -> list[dict]:
    m = json.loads((out / "manifest.json").read_text())
    rows = []
    for s in m["shards"]:
        rows += pq.read_table(out / s["path"]).to_pylist()
    return rows


def _check_invariant(summary: dict, out: Path):
    assert summary["rows_in"] == summary["rows_written"] + summary["rows_quarantined"]
    m = verify_manifest(out)
    assert m["counts"]["rows_in"] == summary["rows_in"]
    assert sum(s["rows"] for s in m["shards"]) == summary["rows_written"] == len(_all_rows(out))
    assert len(_quarantine(out)) == summary["rows_quarantined"]
    assert (out / "tokenizer" / "tokenizer.json").exists()


def test_coco_source_with_corrupt_missing_and_empty(tmp_path):
    img = tmp_path / "images"
    img.mkdir()
    _png(img / "1.jpg", fmt="JPEG")
    _png(img / "2.png")
    (img / "3.jpg").write_bytes(b"\xff\xd8\xff not really a jpeg")
    caps = {"images": [{"id": i, "file_name": f"{i}.{'png' if i == 2 else 'jpg'}"}
                       for i in (1, 2, 3, 4)],
            "annotations": [{"image_id": 1, "caption": "a green square"},
                            {"image_id": 1, "caption": "green block on white"},
                            {"image_id": 2, "caption": "another green thing"},
                            {"image_id": 2, "caption": "   "},
                            {"image_id": 3, "caption": "broken file"},
                            {"image_id": 4, "caption": "file is missing"},
                            {"image_id": 99, "caption": "unknown image id"}]}
    (tmp_path / "caps.json").write_text(json.dumps(caps))
    out = tmp_path / "out"
    s = convert(CocoSource(str(tmp_path / "caps.json"), str(img)), out, DATA)
    assert (s["rows_in"], s["rows_written"], s["rows_quarantined"]) == (7, 3, 4)
    _check_invariant(s, out)
    reasons = {q["sample_id"]: q["reason"] for q in _quarantine(out)}
    assert reasons[3] == "empty text"
    assert reasons[4].startswith("undecodable image")
    assert reasons[5].startswith("missing image file") and "4.jpg" in reasons[5]
    assert "99" in reasons[6]
    assert "BytesIO" not in reasons[4]  # the origin names the file, not an in-memory buffer
    # the summary counts kinds of reasons, without the row's own paths and ids
    assert s["quarantine_reasons"] == {"empty text": 1, "undecodable image": 1,
                                       "missing image file": 1,
                                       "image_id not listed in 'images'": 1}
    rows = _all_rows(out)
    assert {r["sample_id"] for r in rows} == {0, 1, 2}
    # captions of one image share a split
    m = json.loads((out / "manifest.json").read_text())
    split_of = {}
    for sh in m["shards"]:
        for r in pq.read_table(out / sh["path"]).to_pylist():
            split_of[r["sample_id"]] = sh["split"]
    assert split_of[0] == split_of[1]


def test_jsonl_source_types_paths_and_quarantine(tmp_path):
    (tmp_path / "media").mkdir()
    _png(tmp_path / "media" / "a.png")
    _wav(tmp_path / "media" / "a.wav")
    _wav(tmp_path / "media" / "b.flac", fmt="FLAC")
    (tmp_path / "media" / "bad.wav").write_bytes(b"RIFF....WAVEfmt garbage")
    lines = [
        {"image": "media/a.png", "audio": "media/a.wav", "text": "hello", "target": "hi",
         "label": 2},
        {"audio": "media/b.flac", "text": "a flac clip"},
        {"image": "media/a.png"},  # image only is fine
        {"audio": "media/bad.wav", "text": "bad audio"},
        {"text": "wrong label", "label": "two"},
        {"text": 5},
        {"image": "media/nope.png", "text": "missing"},
        {},
    ]
    text = "\n".join(json.dumps(x) for x in lines) + "\nnot json\n"
    (tmp_path / "m.jsonl").write_text(text)
    out = tmp_path / "out"
    s = convert(JsonlSource(str(tmp_path / "m.jsonl")), out, DATA)
    assert (s["rows_in"], s["rows_written"]) == (9, 3)
    _check_invariant(s, out)
    reasons = {q["sample_id"]: q["reason"] for q in _quarantine(out)}
    assert reasons[3].startswith("undecodable audio")
    assert reasons[4].startswith("label must be an integer")
    assert reasons[5].startswith("text must be a string")
    assert reasons[6].startswith("missing image file")
    assert reasons[7] == "no text, image or audio"
    assert reasons[8].startswith("not valid JSON")
    assert s["quarantine_reasons"] == {"undecodable audio": 1, "label must be an integer": 1,
                                       "text must be a string": 1, "missing image file": 1,
                                       "no text, image or audio": 1, "not valid JSON": 1}
    first = next(r for r in _all_rows(out) if r["sample_id"] == 0)
    assert first["target"] == "hi" and first["label"] == 2
    assert first["image"] == (tmp_path / "media" / "a.png").read_bytes()


def test_every_row_error_kind_leaves_the_rows_values_out():
    from mmdist.data.shards import reason_kind
    from mmdist.data.sources import RowError, make_row

    kinds = set()
    for label in (-3, -7):
        with pytest.raises(RowError) as e:
            make_row(0, text="ok", label=label)
        kinds.add(reason_kind(str(e.value)))
    assert kinds == {"label must be >= 0 (or -1 / absent)"}
    assert reason_kind("OSError: disk on fire") == "OSError"


def test_audiocaps_source_clotho_layout(tmp_path):
    audio = tmp_path / "audio"
    audio.mkdir()
    _wav(audio / "x.wav")
    _wav(audio / "y.flac", fmt="FLAC")
    (audio / "z.wav").write_bytes(b"")
    with (tmp_path / "caps.csv").open("w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["file_name", "caption_1", "caption_2"])
        w.writerow(["x.wav", "a tone", "a beep"])
        w.writerow(["y", "flac found without extension", ""])
        w.writerow(["z.wav", "empty file", "still empty"])
        w.writerow(["missing.wav", "gone", "gone too"])
    out = tmp_path / "out"
    s = convert(AudioCapsSource(str(tmp_path / "caps.csv"), str(audio)), out, DATA)
    assert (s["rows_in"], s["rows_written"]) == (8, 3)
    _check_invariant(s, out)
    kinds = sorted(q["reason"].split(":")[0].split(" /")[0] for q in _quarantine(out))
    assert kinds[0] == "empty text" and sum(k.startswith("missing audio file") for k in kinds) == 2
    assert sum(k.startswith("undecodable audio") for k in kinds) == 2


def test_synthetic_shards_bit_identical_for_a_seed(tmp_path):
    src = SyntheticSource(12, seed=5, image_size=16, sample_rate=8000, audio_seconds=0.25)
    a = convert(src, tmp_path / "a", DATA, seed=5)
    b = convert(src, tmp_path / "b", DATA, seed=5)
    ma = json.loads((tmp_path / "a" / "manifest.json").read_text())
    mb = json.loads((tmp_path / "b" / "manifest.json").read_text())
    assert a["manifest_sha256"] == b["manifest_sha256"]
    assert [s["sha256"] for s in ma["shards"]] == [s["sha256"] for s in mb["shards"]]
    for s in ma["shards"]:
        assert (tmp_path / "a" / s["path"]).read_bytes() == (tmp_path / "b" / s["path"]).read_bytes()
    assert ma["splits"]["train"]["rows"] + ma["splits"]["val"]["rows"] == 12
    assert ma["splits"]["val"]["rows"] == 3 and a["shards"] == 3 + 1  # 9 train rows in shards of 3, 3 val


def test_checksum_mismatch_is_refused_naming_the_shard(tmp_path):
    out = tmp_path / "s"
    convert(SyntheticSource(6, image_size=16, sample_rate=8000, audio_seconds=0.25), out, DATA)
    victim = out / "train" / "part-00000.parquet"
    data = bytearray(victim.read_bytes())
    data[len(data) // 2] ^= 0xFF
    victim.write_bytes(bytes(data))
    with pytest.raises(ManifestError, match="train/part-00000.parquet"):
        verify_manifest(out)
    victim.unlink()
    with pytest.raises(ManifestError, match="train/part-00000.parquet.*missing"):
        verify_manifest(out)


def test_split_is_exact_grouped_and_seeded():
    groups = [f"g{i // 2}" for i in range(40)]
    a = split_of_groups(groups, 0.1, seed=0)
    assert sum(v == "val" for v in a.values()) == 2
    assert a == split_of_groups(groups, 0.1, seed=0) != split_of_groups(groups, 0.1, seed=1)
    assert set(split_of_groups(["only"], 0.5, 0).values()) == {"train"}


def test_prepare_synthetic_reuses_matching_shards(tmp_path):
    cfg = load_config("tiny", ["data.synthetic_samples=10", "data.shard_rows=4"])
    first = prepare_synthetic(tmp_path / "syn", cfg, seed=1)
    assert first["reused"] is False and first["rows_written"] == 10
    again = prepare_synthetic(tmp_path / "syn", cfg, seed=1)
    assert again["reused"] is True and again["manifest_sha256"] == first["manifest_sha256"]
    other = prepare_synthetic(tmp_path / "syn", cfg, seed=2)
    assert other["reused"] is False


def _args(**kw):
    parser = argparse.ArgumentParser()
    prepare.configure_parser(parser)
    argv = []
    for k, v in kw.items():
        argv += [f"--{k.replace('_', '-')}", str(v)]
    return parser.parse_args(argv + ["--config", "tiny"])


def test_command_fails_when_every_row_is_bad_or_source_unreadable(tmp_path):
    (tmp_path / "m.jsonl").write_text('{"text": ""}\n{"image": "nope.png"}\n')
    with pytest.raises(CommandError, match="every row"):
        prepare.run(_args(source="jsonl", manifest=tmp_path / "m.jsonl", out=tmp_path / "o"))
    assert len(_quarantine(tmp_path / "o")) == 2
    with pytest.raises(CommandError, match="no such file"):
        prepare.run(_args(source="jsonl", manifest=tmp_path / "absent.jsonl",
                          out=tmp_path / "o2"))
    with pytest.raises(CommandError, match="--images"):
        prepare.run(_args(source="coco", captions=tmp_path / "c.json", out=tmp_path / "o3"))
    (tmp_path / "bad.json").write_text("{not json")
    (tmp_path / "imgs").mkdir()
    with pytest.raises(CommandError, match="not valid JSON"):
        prepare.run(_args(source="coco", captions=tmp_path / "bad.json", images=tmp_path / "imgs",
                          out=tmp_path / "o4"))


def test_command_flags_override_config_and_use_pretrained_tokenizer(tmp_path, capsys):
    src = tmp_path / "tok"
    from mmdist.data.tokenizer import TextTokenizer

    TextTokenizer.train(["pretrained words only"], 30).save(src)
    s = prepare.run(_args(source="synthetic", num_samples=8, shard_rows=3, val_fraction=0.25,
                          tokenizer=src, out=tmp_path / "o"))
    assert (s["rows_in"], s["train_shards"], s["val_rows"]) == (8, 2, 2)
    assert s["vocab_size"] == TextTokenizer.load(src).vocab_size
    printed = capsys.readouterr().out
    assert "rows_in = rows_written + rows_quarantined: 8 = 8 + 0" in printed
    with pytest.raises(FileExistsError):
        (tmp_path / "user").mkdir()
        (tmp_path / "user" / "keep.txt").write_text("mine")
        prepare.run(_args(source="synthetic", num_samples=2, out=tmp_path / "user"))


def test_image_and_audio_bytes_in_shards_decode(tmp_path):
    out = tmp_path / "s"
    convert(SyntheticSource(3, image_size=16, sample_rate=8000, audio_seconds=0.25), out, DATA)
    for r in _all_rows(out):
        assert Image.open(io.BytesIO(r["image"])).size == (16, 16)
        assert sf.read(io.BytesIO(r["audio"]))[1] == 8000


def test_hostile_rows_are_quarantined_naming_what_and_the_rest_kept(tmp_path):
    import os
    import struct

    from mmdist.data.sources import RowLimits

    root = tmp_path / "set"
    (root / "media").mkdir(parents=True)
    _png(root / "media" / "ok.png")
    _wav(root / "media" / "ok.wav")
    _png(tmp_path / "outside.png")  # beside the dataset folder, not in it
    os.symlink(tmp_path / "outside.png", root / "media" / "link.png")
    # a decompression bomb: 10000 x 5000 pixels (50M, over the 40M default) in a tiny file
    Image.new("L", (10_000, 5_000)).save(root / "media" / "bomb.png")
    assert (root / "media" / "bomb.png").stat().st_size < 200_000
    t = np.arange(16_000) / 8000  # 2 s, over the limit below
    sf.write(root / "media" / "long.wav", (0.3 * np.sin(2 * np.pi * 440 * t)).astype(np.float32),
             8000)
    wav = bytearray((root / "media" / "ok.wav").read_bytes())  # a header claiming 2 GiB
    i = wav.find(b"data")
    wav[i + 4:i + 8] = struct.pack("<I", 0x7FFFFFF0)
    (root / "media" / "lying.wav").write_bytes(bytes(wav))
    buf = io.BytesIO()
    sf.write(buf, np.zeros(4000, np.float32), 8000, format="FLAC")
    (root / "media" / "cut.flac").write_bytes(buf.getvalue()[:len(buf.getvalue()) // 2])
    rows = [
        {"image": "media/ok.png", "text": "fine", "id": "a"},
        {"image": "media/bomb.png", "text": "bomb"},
        {"audio": "media/long.wav", "text": "too long"},
        {"audio": "media/lying.wav", "text": "a header that lies"},
        {"audio": "media/cut.flac", "text": "cut flac"},
        {"text": "word " * 1000},
        {"image": "../outside.png", "text": "dot dot"},
        {"image": str(tmp_path / "outside.png"), "text": "absolute"},
        {"image": "media/link.png", "text": "symlink out"},
        {"image": "media/ok.png", "text": "same id", "id": "a"},
    ]
    lines = [json.dumps(r).encode() for r in rows]
    lines.insert(3, b'{"text": "caf\xe9 in latin-1"}')  # line 4: not UTF-8
    (root / "m.jsonl").write_bytes(b"\n".join(lines) + b"\n")
    limits = RowLimits(max_audio_seconds=1.5, max_text_chars=1000)
    out = tmp_path / "out"
    s = convert(JsonlSource(str(root / "m.jsonl"), limits=limits), out, DATA)
    _check_invariant(s, out)
    reasons = {q["origin"].rsplit(":", 1)[1]: q["reason"] for q in _quarantine(out)}
    assert reasons["2"].startswith("image too large: 10000 x 5000 = 50,000,000 pixels")
    assert "data.max_image_pixels=40,000,000" in reasons["2"]
    assert reasons["3"].startswith("audio too long: 2.0 s, over data.max_audio_seconds=1.5")
    assert reasons["4"] == "line is not UTF-8 text: byte 0xe9 at column 14"
    assert reasons["6"].startswith("undecodable audio")  # the cut FLAC
    assert reasons["7"].startswith("text too long: 5,000 characters")
    for line, shown in (("8", "'../outside.png'"), ("9", "outside.png"), ("10", "link.png")):
        assert reasons[line].startswith("image path outside the dataset folder (pass "
                                        "--allow-outside-root"), reasons[line]
        assert shown in reasons[line]
    assert reasons["11"] == "duplicate id: 'a', first on line 1"
    kept = {r["text"]: r for r in _all_rows(out)}
    assert set(kept) == {"fine", "a header that lies"}  # over-stated length: decoded as it is
    assert sf.read(io.BytesIO(kept["a header that lies"]["audio"]))[0].shape == (2000,)
    assert not (out / "quarantine.jsonl").read_text().count("word word")  # values stay out

    # the flag lets paths out of the folder through; the defaults take the long clip and caption
    out2 = tmp_path / "out2"
    s2 = convert(JsonlSource(str(root / "m.jsonl"), allow_outside_root=True), out2, DATA)
    texts = {r["text"] for r in _all_rows(out2)}
    assert {"dot dot", "absolute", "symlink out", "too long", "word " * 1000} <= texts
    assert s2["rows_quarantined"] == 4  # the bomb, the line not UTF-8, the cut FLAC, the same id


def test_coco_and_audiocaps_paths_out_of_their_folder_are_quarantined(tmp_path):
    (tmp_path / "images").mkdir()
    (tmp_path / "audio").mkdir()
    _png(tmp_path / "images" / "in.png")
    _png(tmp_path / "out.png")
    _wav(tmp_path / "audio" / "in.wav")
    _wav(tmp_path / "out.wav")
    coco = {"images": [{"id": 1, "file_name": "in.png"}, {"id": 2, "file_name": "../out.png"}],
            "annotations": [{"image_id": 1, "caption": "in", "id": 7},
                            {"image_id": 2, "caption": "out", "id": 8},
                            {"image_id": 1, "caption": "again", "id": 7}]}
    (tmp_path / "caps.json").write_text(json.dumps(coco))
    s = convert(CocoSource(str(tmp_path / "caps.json"), str(tmp_path / "images")),
                tmp_path / "o1", DATA)
    assert s["rows_written"] == 1
    assert s["quarantine_reasons"] == {"image path outside the dataset folder (pass "
                                       "--allow-outside-root to read it)": 1, "duplicate id": 1}
    with (tmp_path / "caps.csv").open("w", newline="") as f:
        csv.writer(f).writerows([["file_name", "caption"], ["in.wav", "in"],
                                 ["../out.wav", "out"]])
    s = convert(AudioCapsSource(str(tmp_path / "caps.csv"), str(tmp_path / "audio")),
                tmp_path / "o2", DATA)
    assert s["rows_written"] == 1 and list(s["quarantine_reasons"]) == [
        "audio path outside the dataset folder (pass --allow-outside-root to read it)"]


def test_audiocaps_line_that_is_not_utf8_is_one_quarantined_row(tmp_path):
    (tmp_path / "audio").mkdir()
    _wav(tmp_path / "audio" / "a.wav")
    _wav(tmp_path / "audio" / "b.wav")
    (tmp_path / "caps.csv").write_bytes(b"file_name,caption\na.wav,a tone\n"
                                        b"b.wav,caf\xe9 noise\n"  # Latin-1, not UTF-8
                                        b"b.wav,a beep\n")
    s = convert(AudioCapsSource(str(tmp_path / "caps.csv"), str(tmp_path / "audio")),
                tmp_path / "o", DATA)
    assert (s["rows_in"], s["rows_written"], s["rows_quarantined"]) == (3, 2, 1)
    q = _quarantine(tmp_path / "o")
    assert q[0]["origin"].endswith("caps.csv:3 caption")
    assert q[0]["reason"] == "line is not UTF-8 text (column caption: byte 0xe9)"
    (tmp_path / "bad_header.csv").write_bytes(b"file_name,capti\xf3n\na.wav,x\n")
    with pytest.raises(SourceError, match="header line is not UTF-8"):
        list(AudioCapsSource(str(tmp_path / "bad_header.csv"), str(tmp_path / "audio")).records())
