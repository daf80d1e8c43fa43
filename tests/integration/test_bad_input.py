"""Bad configs and inputs at every entry point (CLI, jobs, pyfunc) give a clear error that names
the key, file or row, never a traceback from deep inside a library; bad data rows are
quarantined and counted (rows_in = rows_written + rows_quarantined), never lost.

Subprocess checks run a few at a time (each pays ~4 s of imports); the ones that need Ray
in-process use the session's `ray_local`.
"""

from __future__ import annotations

import argparse
import json
import os
import runpy
import shutil
import subprocess
import sys
import wave
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from PIL import Image

from mmdist.config import load_config
from mmdist.data.prepare import convert
from mmdist.data.shards import read_manifest
from mmdist.data.sources import JsonlSource, SyntheticSource

ROOT = Path(__file__).resolve().parents[2]
TRACEBACK = "Traceback (most recent call last)"
BAD_CONFIG = ["train.lr=abc", "model.fusion=nope", "train.bogus_key=1"]
BAD_CONFIG_NEEDLES = ("3 problem(s)", "train.lr='abc': expected float", "model.fusion='nope'",
                      "train.bogus_key: unknown key")


def assert_clean_error(rc: int, out: str, err: str, *needles: str, code: int | None = None):
    """Failed (with ``code`` if given), every needle in stderr, no Python traceback anywhere."""
    assert rc != 0, f"exit 0; stderr:\n{err[-3000:]}"
    if code is not None:
        assert rc == code, f"exit {rc}; stderr:\n{err[-3000:]}"
    for n in needles:
        assert n in err, f"{n!r} not in stderr:\n{err[-3000:]}"
    assert TRACEBACK not in err and TRACEBACK not in out, err[-3000:]


# ---- files: every kind of bad input, made once ------------------------------------------------


def _wav(path: Path, frames: int, rate: int = 16000) -> None:
    with wave.open(str(path), "wb") as w:
        w.setnchannels(1)
        w.setsampwidth(2)
        w.setframerate(rate)
        w.writeframes((np.sin(np.arange(frames) / 5.0) * 8000).astype(np.int16).tobytes())


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    d = tmp_path_factory.mktemp("bad_input")
    rng = np.random.default_rng(0)
    rgb = rng.integers(0, 256, (40, 48, 3), dtype=np.uint8)
    Image.fromarray(rgb).convert("CMYK").save(d / "cmyk.jpg")
    Image.fromarray(np.full((40, 48), 20000, dtype=np.uint16)).save(d / "gray16.png")  # I;16
    Image.fromarray(rgb).convert("RGBA").save(d / "rgba.png")
    Image.fromarray(rgb).convert("P").save(d / "palette.png")
    Image.fromarray(rgb).convert("1").save(d / "onebit.png")
    Image.fromarray(rgb).save(d / "ok.png")
    (d / "truncated.png").write_bytes((d / "ok.png").read_bytes()[:100])
    _wav(d / "ok.wav", 8000)
    _wav(d / "zero_frames.wav", 0)
    (d / "zero_bytes.wav").write_bytes(b"")
    rows = [{"image": f, "text": f"a picture {f}"} for f in
            ("cmyk.jpg", "gray16.png", "rgba.png", "palette.png", "onebit.png", "ok.png",
             "truncated.png")]
    rows += [{"audio": f, "text": f"a sound {f}"} for f in
             ("ok.wav", "zero_frames.wav", "zero_bytes.wav")]
    (d / "mixed.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    (d / "empty.jsonl").write_text("")
    (d / "all_bad.jsonl").write_text("".join(
        json.dumps(r) + "\n" for r in ({"image": "missing.png", "text": "x"},
                                       {"audio": "zero_frames.wav", "text": "y"},
                                       {"text": 42})))
    (d / "syntax.yaml").write_text("train: {lr: [1\n")
    (d / "list.yaml").write_text("- train\n- model\n")
    return d


@pytest.fixture(scope="module")
def small_shards(tmp_path_factory):
    """A valid shard set whose train split (11 rows) is smaller than one tiny batch (16)."""
    out = tmp_path_factory.mktemp("small") / "shards"
    cfg = load_config("tiny")
    s = convert(SyntheticSource(12, image_size=32, audio_seconds=0.5), out, cfg.data,
                parallel="local")
    assert s["train_rows"] < cfg.train.micro_batch_size
    return out


@pytest.fixture(scope="module")
def tiny_model(tmp_path_factory):
    """A tiny untrained itm model directory and the MLflow pyfunc around it (input validation
    does not need trained weights), saved the way `mmdist train` registers it."""
    import mlflow
    import torch

    from mmdist.data.tokenizer import TextTokenizer
    from mmdist.models import build_model, save_model
    from mmdist.train.register import PYFUNC_CODE, model_signature

    d = tmp_path_factory.mktemp("tiny_model")
    tok = TextTokenizer.train(["a red circle", "a low tone", "a blue square"] * 4, 60)
    tok.save(d / "tok")
    torch.manual_seed(0)
    model = build_model(load_config("tiny"), tok.vocab_size, tok.pad_id, tok.bos_id, tok.eos_id)
    save_model(model, d / "model", tokenizer_dir=d / "tok")
    mlflow.pyfunc.save_model(str(d / "pyfunc"), python_model=str(PYFUNC_CODE),
                             artifacts={"model_dir": str(d / "model")},
                             signature=model_signature())
    return {"dir": d / "model", "pyfunc": mlflow.pyfunc.load_model(str(d / "pyfunc"))}


# ---- the CLI and jobs/*.py ---------------------------------------------------------------------
#
# Most cases run the real entry point in this process (`mmdist.cli.main(argv)`, or the job
# script via runpy as `python jobs/X.py` would): same parser, same error handling, no 4 s of
# imports each. A few run as real subprocesses, a few at a time.


def _cases(files: Path, small: Path, model: Path, tmp: Path) -> dict[str, tuple[list[str], tuple]]:
    """name -> (argv: ["mmdist", ...] or ["jobs/X.py", ...], (exit code, stderr needles...))."""
    iso = [f"tracking.tracking_uri=sqlite:///{tmp / 'mlflow.db'}",
           f"train.storage_path={tmp / 'runs'}"]
    return {
        "mmdist train: bad config": (
            ["mmdist", "train", "--config", "tiny", "--num-cpus", "2", *BAD_CONFIG],
            (1, *BAD_CONFIG_NEEDLES)),
        "jobs/train.py: bad config": (
            ["jobs/train.py", "--config", "tiny", "--num-cpus", "2", *BAD_CONFIG],
            (1, *BAD_CONFIG_NEEDLES)),
        "mmdist sweep: bad config": (
            ["mmdist", "sweep", "--config", "tiny", "--num-cpus", "2", *BAD_CONFIG],
            (1, *BAD_CONFIG_NEEDLES)),
        "jobs/sweep.py: bad config": (
            ["jobs/sweep.py", "--config", "tiny", "--num-cpus", "2", *BAD_CONFIG],
            (1, *BAD_CONFIG_NEEDLES)),
        "mmdist prepare: bad config": (
            ["mmdist", "prepare", "--out", str(tmp / "p0"), "--config", "tiny", *BAD_CONFIG],
            (1, *BAD_CONFIG_NEEDLES)),
        "mmdist evaluate: model path does not exist": (
            ["mmdist", "evaluate", "--model", str(tmp / "no-model"), "--data", str(small)],
            (1, "no-model: not a model directory")),
        # sysfs refuses new folders even to root: a storage nobody can write
        "mmdist train: read-only storage": (
            ["mmdist", "train", "--config", "tiny", "--num-cpus", "2",
             "train.storage_path=/sys/mmdist-runs"],
            (1, "train.storage_path=/sys/mmdist-runs: cannot write there", "writable folder")),
        "jobs/sweep.py: read-only storage": (
            ["jobs/sweep.py", "--config", "tiny", "--num-cpus", "2",
             "train.storage_path=/sys/mmdist-runs"],
            (1, "train.storage_path=/sys/mmdist-runs: cannot write there")),
        "mmdist train: YAML syntax error": (
            ["mmdist", "train", "--config", str(files / "syntax.yaml"), "--num-cpus", "2"],
            (1, "syntax.yaml", "not valid YAML", "line 1")),
        "mmdist train: YAML top level is a list": (
            ["mmdist", "train", "--config", str(files / "list.yaml"), "--num-cpus", "2"],
            (1, "list.yaml", "top level must be a mapping")),
        "jobs/train.py: config file does not exist": (
            ["jobs/train.py", "--config", str(files / "nope.yaml")],
            (1, "nope.yaml", "no such file and no such preset")),
        "mmdist prepare: unknown --source": (
            ["mmdist", "prepare", "--source", "nope", "--out", str(tmp / "p1")],
            (2, "--source", "invalid choice: 'nope'")),
        "mmdist prepare: --manifest not given": (
            ["mmdist", "prepare", "--source", "jsonl", "--out", str(tmp / "p2")],
            (1, "--source jsonl needs --manifest")),
        "mmdist prepare: --manifest does not exist": (
            ["mmdist", "prepare", "--source", "jsonl", "--manifest", str(files / "nope.jsonl"),
             "--out", str(tmp / "p3")],
            (1, "nope.jsonl: no such file")),
        "mmdist prepare: empty manifest": (
            ["mmdist", "prepare", "--source", "jsonl", "--manifest", str(files / "empty.jsonl"),
             "--out", str(tmp / "p4")],
            (1, "empty.jsonl: no rows")),
        "jobs/prepare_data.py: every row bad": (
            ["jobs/prepare_data.py", "--source", "jsonl", "--manifest",
             str(files / "all_bad.jsonl"), "--out", str(tmp / "p5")],
            (1, "every row of the source was bad (3 rows quarantined)", "quarantine.jsonl")),
        "jobs/prepare_data.py: coco files missing": (
            ["jobs/prepare_data.py", "--source", "coco", "--images", str(files / "nodir"),
             "--captions", str(files / "nope.json"), "--out", str(tmp / "p6")],
            (1, "--captions", "nope.json: no such file")),
        "mmdist predict: model path does not exist": (
            ["mmdist", "predict", "--model", str(tmp / "no-model"), "--text", "a red circle",
             "--json"],
            (1, "no-model: not a model directory")),
        "mmdist predict: zero-length audio": (
            ["mmdist", "predict", "--model", str(model), "--audio",
             str(files / "zero_frames.wav"), "--text", "a tone"],
            (1, "column 'audio'", "empty audio: 0 samples")),
        "mmdist predict: image file missing": (
            ["mmdist", "predict", "--model", str(model), "--image", str(files / "gone.png")],
            (1, "column 'image'", "gone.png")),
        # 64 workers cannot be placed on 2 CPUs and the train split is too small: both named
        # at once, before any worker is asked for (Ray Train would wait for them forever).
        "mmdist train: impossible resources + too little data": (
            ["mmdist", "train", "--config", "tiny", "--num-cpus", "2", "train.num_workers=64",
             f"data.path={small}", *iso],
            (1, "this run cannot start: 2 problem(s)", "train.num_workers=64",
             "the cluster (1 node(s)) has 2 CPUs", "the train split has 11 rows")),
        "jobs/train.py: impossible resources + too little data": (
            ["jobs/train.py", "--config", "tiny", "--num-cpus", "2", "train.num_workers=64",
             f"data.path={small}", *iso],
            (1, "this run cannot start: 2 problem(s)", "train.num_workers=64",
             "the cluster (1 node(s)) has 2 CPUs", "the train split has 11 rows")),
    }


# Real subprocesses: the installed entry points end to end, one of them starting (and
# stopping) its own 2-CPU Ray.
SUBPROCESS = ("jobs/sweep.py: bad config",
              "jobs/train.py: impossible resources + too little data")


def _argv(argv: list[str]) -> list[str]:
    if argv[0] == "mmdist":
        return [str(Path(sys.executable).parent / "mmdist"), *argv[1:]]
    return [sys.executable, str(ROOT / argv[0]), *argv[1:]]


@pytest.fixture(scope="module")
def subprocess_results(files, small_shards, tiny_model, tmp_path_factory):
    tmp = tmp_path_factory.mktemp("cli")
    cases = _cases(files, small_shards, tiny_model["dir"], tmp)

    def run(name):
        r = subprocess.run(_argv(cases[name][0]), capture_output=True, text=True, timeout=240,
                           cwd=tmp, env={**os.environ, "RAY_DATA_DISABLE_PROGRESS_BARS": "1"})
        return r.returncode, r.stdout, r.stderr

    with ThreadPoolExecutor(max_workers=3) as pool:
        return dict(zip(SUBPROCESS, pool.map(run, SUBPROCESS)))


def _in_process(argv: list[str], capsys, monkeypatch) -> tuple[int, str, str]:
    from mmdist.cli import main

    capsys.readouterr()
    try:
        if argv[0] == "mmdist":
            rc = main(argv[1:])
        else:  # as `python jobs/X.py ...` runs it
            monkeypatch.setattr(sys, "argv", [str(ROOT / argv[0]), *argv[1:]])
            runpy.run_path(str(ROOT / argv[0]), run_name="__main__")
            rc = 0
    except SystemExit as e:
        rc = e.code
    out, err = capsys.readouterr()
    return rc, out, err


@pytest.mark.parametrize("name", list(_cases(Path("f"), Path("s"), Path("m"), Path("t"))))
def test_cli_and_jobs_name_the_problem_without_a_traceback(name, files, small_shards, tiny_model,
                                                           tmp_path, capsys, monkeypatch,
                                                           request):
    argv, (code, *needles) = _cases(files, small_shards, tiny_model["dir"], tmp_path)[name]
    if name in SUBPROCESS:
        rc, out, err = request.getfixturevalue("subprocess_results")[name]
    else:
        if "impossible resources" in name:
            request.getfixturevalue("ray_local")  # the session's 2-CPU Ray, not a second one
        monkeypatch.chdir(tmp_path)
        rc, out, err = _in_process(argv, capsys, monkeypatch)
    assert_clean_error(rc, out, err, *needles, code=code)
    if "--json" in argv:
        last = json.loads(out.strip().splitlines()[-1])
        assert last["ok"] is False and needles[0] in last["error"]


# ---- data rows: converted or quarantined with a reason, never lost ------------------------------


def test_wrong_image_modes_convert_and_empty_audio_is_quarantined(files, tmp_path):
    from mmdist.data.image import decode_image

    cfg = load_config("tiny")
    out = tmp_path / "shards"
    s = convert(JsonlSource(str(files / "mixed.jsonl")), out, cfg.data, parallel="local")
    assert s["rows_in"] == s["rows_written"] + s["rows_quarantined"] == 10
    quarantined = [json.loads(x) for x in (out / "quarantine.jsonl").read_text().splitlines()]
    assert len(quarantined) == s["rows_quarantined"] == 3
    by_line = {q["origin"].rsplit(":", 1)[1]: q["reason"] for q in quarantined}
    assert all(q["origin"].startswith(str(files / "mixed.jsonl")) for q in quarantined)
    assert by_line["7"].startswith("undecodable image")  # truncated.png
    assert by_line["9"].startswith("empty audio: 0 samples")  # zero_frames.wav
    assert by_line["10"].startswith("undecodable audio: empty file (0 bytes)")  # zero_bytes.wav
    # the split does not depend on where the dataset lies: a copy elsewhere splits the same way
    moved = tmp_path / "moved"
    shutil.copytree(files, moved)
    s2 = convert(JsonlSource(str(moved / "mixed.jsonl")), tmp_path / "shards2", cfg.data,
                 parallel="local")
    assert (s2["train_rows"], s2["val_rows"]) == (s["train_rows"], s["val_rows"])
    # every wrong-mode image was kept and decodes to 8-bit RGB as training will read it
    shards = read_manifest(out)["shards"]
    rows = pd.concat([pd.read_parquet(out / sh["path"]) for sh in shards])
    images = rows[rows["image"].notna()]
    assert len(images) == 6
    for data in images["image"]:
        arr = decode_image(bytes(data), 16)
        assert arr.shape == (3, 16, 16) and arr.dtype == np.uint8
    gray16 = (files / "gray16.png").read_bytes()
    # 20000/65535 of full scale, not clipped to white as a plain PIL convert would
    assert abs(int(decode_image(gray16, 16).mean()) - round(20000 / 65535 * 255)) <= 1


def test_an_empty_val_split_is_named_in_the_summary(files, tmp_path):
    from mmdist.data.shards import split_of_groups

    cfg = load_config("tiny", ["data.val_fraction=0.5"])
    # two rows, one per image; make the one the split sends to val the broken one
    names = ["a.png", "b.png"]
    val_name = next(g for g, sp in split_of_groups(names, 0.5, 0).items() if sp == "val")
    shutil.copy(files / "ok.png", tmp_path / (set(names) - {val_name}).pop())
    (tmp_path / val_name).write_bytes(b"not a png")
    (tmp_path / "m.jsonl").write_text("".join(
        json.dumps({"image": n, "text": "a red square"}) + "\n" for n in names))
    s = convert(JsonlSource(str(tmp_path / "m.jsonl")), tmp_path / "out", cfg.data,
                parallel="local")
    assert (s["train_rows"], s["val_rows"], s["rows_quarantined"]) == (1, 0, 1)
    assert s["warnings"] == ["the val split is empty: its 1 group(s) of rows were all "
                             "quarantined (fix those rows); training needs val rows"]


# ---- training, sweeps and evaluation refuse bad setups before anything starts -----------------


def _capture(module, args, capsys) -> tuple[int, str, str]:
    from mmdist.cli import run_command

    rc = run_command(module, args)
    out, err = capsys.readouterr()
    return rc, out, err


def _train_args(tmp_path, *overrides):
    return argparse.Namespace(
        config="tiny", address=None, num_cpus=None, data_cache=str(tmp_path / "cache"),
        json=False, verbose=False, overrides=[f"tracking.tracking_uri=sqlite:///{tmp_path / 'mlflow.db'}",
                               f"train.storage_path={tmp_path / 'runs'}", *overrides])


def test_train_split_smaller_than_one_batch_is_refused(ray_local, small_shards, tmp_path,
                                                       capsys):
    from mmdist.train import run as train_command

    rc, out, err = _capture(train_command, _train_args(tmp_path, f"data.path={small_shards}"),
                            capsys)
    assert_clean_error(rc, out, err, "this run cannot start: 1 problem(s)",
                       "the train split has 11 rows", "train.micro_batch_size=16")


@pytest.fixture(scope="module")
def ten_class_shards(tmp_path_factory):
    """Text rows labelled 0-9 (two per class), prepared as `mmdist prepare` writes them."""
    d = tmp_path_factory.mktemp("ten_class")
    rows = [{"text": f"a row of class {k}", "label": k} for k in range(10) for _ in range(2)]
    (d / "rows.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    out = d / "shards"
    convert(JsonlSource(str(d / "rows.jsonl")), out, load_config("tiny").data, parallel="local")
    return out


def test_prepare_records_the_labels_in_the_manifest(ten_class_shards):
    labels = read_manifest(ten_class_shards)["labels"]
    assert labels == {"rows": 20, "max": 9, "counts": {str(k): 2 for k in range(10)}}


@pytest.mark.parametrize("manifest_labels", [True, False], ids=["manifest", "older-shards"])
def test_a_label_beyond_num_classes_is_refused_before_ray_starts(
        ten_class_shards, tmp_path, capsys, manifest_labels):
    """The reproduction of issue 19: `IndexError: Target 9 is out of bounds` three times, deep
    in torch. Now one line naming the key, before Ray or an MLflow run exists; shard sets
    prepared before the manifest recorded labels are checked from their label column."""
    from mmdist.data.shards import write_manifest
    from mmdist.train import run as train_command

    data = ten_class_shards
    if not manifest_labels:
        data = tmp_path / "older"
        shutil.copytree(ten_class_shards, data)
        m = read_manifest(data)
        del m["labels"], m["manifest_sha256"], m["format"]
        write_manifest(data, m)
    rc, out, err = _capture(train_command, _train_args(
        tmp_path, f"data.path={data}", "model.task=classify", "model.num_classes=8",
        "model.modalities=[text]"), capsys)
    assert_clean_error(rc, out, err, "model.num_classes=8 but the data has labels up to 9",
                       "set model.num_classes=10")
    assert not (tmp_path / "mlflow.db").exists(), "refused after the MLflow run was made"


def test_preflight_names_the_label_range(ten_class_shards, capsys):
    from mmdist import preflight

    check = preflight.check_data(load_config("ref_multitask_mmlm", [
        f"data.path={ten_class_shards}"]))
    assert not check.ok and "model.num_classes=8 but the data has labels up to 9" in check.detail
    # a task without a class head does not read labels: no problem
    assert preflight.check_data(load_config("tiny", [f"data.path={ten_class_shards}"])).ok


def test_sweep_that_cannot_fit_is_refused(ray_local, small_shards, tmp_path, capsys):
    from mmdist import tune as sweep_command

    args = _train_args(tmp_path, f"data.path={small_shards}", "train.num_workers=64")
    args.space, args.name, args.resume = [], None, None
    rc, out, err = _capture(sweep_command, args, capsys)
    assert_clean_error(rc, out, err, "this sweep cannot start", "train.num_workers=64",
                       "has 2 CPUs")


def test_evaluate_on_a_folder_that_is_not_a_shard_set(ray_local, tiny_model, tmp_path, capsys):
    from mmdist import evaluate

    args = argparse.Namespace(model=str(tiny_model["dir"]), data=str(tmp_path / "no-shards"),
                              split="val", actors=1, use_gpu=False, address=None,
                              tracking_uri=f"sqlite:///{tmp_path / 'mlflow.db'}", no_log=True,
                              cache=str(tmp_path / "cache"), json=False, verbose=False)
    rc, out, err = _capture(evaluate, args, capsys)
    assert_clean_error(rc, out, err, "no-shards", "no manifest")


# ---- the registered pyfunc ----------------------------------------------------------------------


def _pyfunc_cases(f: Path) -> dict[str, tuple[pd.DataFrame, tuple[str, ...]]]:
    return {
        "no input column": (pd.DataFrame({"caption": ["a red circle"]}),
                            ("none of the columns", "text")),
        "empty frame": (pd.DataFrame(), ("none of the columns",)),
        "image path does not exist": (
            pd.DataFrame({"text": ["x", "y"], "image": [str(f / "ok.png"), str(f / "gone.png")]}),
            ("row 1", "column 'image'", "gone.png")),
        "image is not an image": (
            pd.DataFrame({"text": ["x"], "image": [str(f / "truncated.png")]}),
            ("row 0", "column 'image'", "undecodable image")),
        "image path is a folder": (pd.DataFrame({"image": [str(f)]}),
                                   ("row 0", "column 'image'", "no such file")),
        "zero-length audio": (
            pd.DataFrame({"text": ["x", "y"], "audio": [str(f / "ok.wav"),
                                                        str(f / "zero_frames.wav")]}),
            ("row 1", "column 'audio'", "empty audio: 0 samples")),
        "zero-byte audio": (pd.DataFrame({"audio": [str(f / "zero_bytes.wav")]}),
                            ("row 0", "column 'audio'", "empty (0 bytes)")),
        "a row with nothing in it": (pd.DataFrame({"text": ["x", None]}),
                                     ("row 1", "no input")),
    }


@pytest.mark.parametrize("name", list(_pyfunc_cases(Path("f"))))
def test_pyfunc_names_the_bad_column_and_row(tiny_model, files, name):
    df, needles = _pyfunc_cases(files)[name]
    with pytest.raises(ValueError) as e:
        tiny_model["pyfunc"].predict(df)
    for n in needles:
        assert n in str(e.value), str(e.value)


def test_pyfunc_wrong_types_name_the_column(tiny_model, files):
    from mlflow.exceptions import MlflowException

    from mmdist.serve.predictor import Predictor

    # The registered signature (text/image/audio: string) makes MLflow refuse a number before
    # mmdist code runs; its message names the column.
    with pytest.raises(MlflowException, match="column text"):
        tiny_model["pyfunc"].predict(pd.DataFrame({"text": [3.5]}))
    # Without MLflow in front (predict, batch inference) the predictor says the same.
    p = Predictor.from_dir(tiny_model["dir"])
    with pytest.raises(ValueError, match=r"row 1, column 'text': expected a string, got int 7"):
        p.predict_frame(pd.DataFrame({"text": ["a red circle", 7]}, dtype=object))
    with pytest.raises(ValueError, match=r"row 0, column 'image': expected a file path or bytes"):
        p.predict_frame(pd.DataFrame({"image": [1.5]}))
    ok = tiny_model["pyfunc"].predict(pd.DataFrame({
        "text": ["a red circle"], "image": [str(files / "gray16.png")],
        "audio": [str(files / "ok.wav")]}))
    assert len(ok) == 1 and 0.0 <= ok["score"][0] <= 1.0
