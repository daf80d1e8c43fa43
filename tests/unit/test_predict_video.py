"""Video at inference: `mmdist predict --video`, the pyfunc's DataFrame and the HTTP body take a
real MP4 written by PyAV, decoded by prepare's code, so the model sees the batch training saw."""

import base64
import json

import numpy as np
import pandas as pd
import pyarrow.parquet as pq
import pytest
import torch

from mmdist.cli import main
from mmdist.data.prepare import convert
from mmdist.data.preprocess import arrow_to_numpy, preprocess_batch
from mmdist.data.shards import load_tokenizer
from mmdist.data.sources import JsonlSource
from mmdist.data.synthetic_video import generate_clip
from mmdist.data.video import VideoSpec, write_video
from mmdist.models import build_model, save_model
from mmdist.serve.http_api import RequestError, parse_item
from mmdist.serve.predictor import Predictor
from tests.unit.synthetic_mm import tiny_config

RATE = 16000
VIDEO = ["model.task=classify", "model.modalities=[text,audio,video]", "data.video_frames=3",
         "data.vocab_size=60", "data.val_fraction=0", "model.num_classes=4"]


@pytest.fixture(scope="module")
def clip_and_model(tmp_path_factory):
    """A real MP4 (moving square, a tone) with subtitles beside it, its shards as `mmdist
    prepare` writes them, and a tiny video model saved with that tokenizer."""
    root = tmp_path_factory.mktemp("video")
    c = generate_clip(3, seed=0, size=32, sample_rate=RATE)
    write_video(root / "clip.mp4", c.frames, 8, c.audio, RATE)
    (root / "clip.srt").write_text(f"1\n00:00:00,000 --> 00:00:02,000\n{c.subtitles}\n")
    (root / "clips.jsonl").write_text(json.dumps({"video": "clip.mp4"}) + "\n")
    cfg = tiny_config(*VIDEO)
    shards = root / "shards"
    convert(JsonlSource(str(root / "clips.jsonl"), video_spec=VideoSpec.from_config(cfg.data)),
            shards, cfg.data, parallel="local")
    tok = load_tokenizer(shards)
    torch.manual_seed(0)
    save_model(build_model(cfg, tok.vocab_size).eval(), root / "model",
               tokenizer_dir=shards / "tokenizer")
    return root, shards, c


def test_the_predictor_sees_the_batch_training_saw(clip_and_model):
    root, shards, clip = clip_and_model
    p = Predictor.from_dir(root / "model")
    got = p.batch_from_rows([{"video": str(root / "clip.mp4")}])
    table = pq.read_table(next((shards / "train").glob("*.parquet")))
    assert table.column("text").to_pylist() == [clip.subtitles]
    trained = preprocess_batch(arrow_to_numpy(table), p.spec, load_tokenizer(shards))
    assert got["video"].shape == (1, 3, 3, 32, 32) and bool(got["has_video"][0])
    for key in ("video", "audio", "input_ids", "has_audio", "has_text"):
        assert np.array_equal(got[key].cpu().numpy(), trained[key]), key
    # the same file as bytes (the pyfunc, the HTTP API): same frames and sound, no subtitles
    raw = p.batch_from_rows([{"video": (root / "clip.mp4").read_bytes()}])
    assert torch.equal(raw["video"], got["video"]) and torch.equal(raw["audio"], got["audio"])
    assert not bool(raw["has_text"][0])
    # --text wins over the subtitles
    given = p.batch_from_rows([{"video": str(root / "clip.mp4"), "text": "something else"}])
    assert not torch.equal(given["input_ids"], got["input_ids"])


def test_mmdist_predict_video(clip_and_model, capsys):
    root, _, _ = clip_and_model
    assert main(["predict", "--model", str(root / "model"), "--video",
                 str(root / "clip.mp4"), "--json"]) == 0
    answer = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert answer["task"] == "classify" and answer["label"] in range(4), answer
    assert 0.0 <= answer["probability"] <= 1.0


@pytest.mark.parametrize("content,reason", [(b"", "empty"), (b"not a video at all" * 40,
                                                            "undecodable video")])
def test_a_bad_video_is_named(clip_and_model, tmp_path, capsys, content, reason):
    root, _, _ = clip_and_model
    bad = tmp_path / "bad.mp4"
    bad.write_bytes(content)
    assert main(["predict", "--model", str(root / "model"), "--video", str(bad)]) != 0
    err = capsys.readouterr().err
    assert "column 'video'" in err and reason in err, err
    with pytest.raises(ValueError, match=r"row 0, column 'video': no such file"):
        Predictor.from_dir(root / "model").batch_from_rows([{"video": str(tmp_path / "no.mp4")}])


def test_the_pyfunc_frame_and_the_http_body_take_video(clip_and_model):
    root, _, _ = clip_and_model
    p = Predictor.from_dir(root / "model")
    data = (root / "clip.mp4").read_bytes()
    out = p.predict_frame(pd.DataFrame({"video": [data, str(root / "clip.mp4")]}))
    assert list(out["task"]) == ["classify"] * 2 and out["label"].between(0, 3).all()
    row = parse_item({"video": base64.b64encode(data).decode()}, None, ["text", "audio", "video"])
    assert row["video"] == data
    with pytest.raises(RequestError) as e:
        parse_item({"video": base64.b64encode(data).decode()}, 0, ["text", "image"])
    assert e.value.field == "video" and e.value.status == 422
    with pytest.raises(ValueError, match=r"row 0, column 'video': undecodable video"):
        p.predict_rows([parse_item({"video": base64.b64encode(b"junk" * 50).decode()}, 0,
                                   ["text", "audio", "video"])])


def test_the_registered_pyfunc_takes_a_video_path(clip_and_model, tmp_path):
    import mlflow

    from mmdist.train.register import PYFUNC_CODE, model_signature

    root, _, _ = clip_and_model
    mlflow.pyfunc.save_model(str(tmp_path / "pyfunc"), python_model=str(PYFUNC_CODE),
                             artifacts={"model_dir": str(root / "model")},
                             signature=model_signature())
    out = mlflow.pyfunc.load_model(str(tmp_path / "pyfunc")).predict(
        pd.DataFrame({"video": [str(root / "clip.mp4")]}))
    direct = Predictor.from_dir(root / "model").predict_rows([{"video": str(root / "clip.mp4")}])
    assert out.to_dict(orient="records") == direct


def test_a_model_without_video_refuses_it(clip_and_model, tmp_path):
    root, shards, _ = clip_and_model
    cfg = tiny_config("model.task=classify", "model.modalities=[text,image]")
    save_model(build_model(cfg, load_tokenizer(shards).vocab_size), tmp_path / "m",
               tokenizer_dir=shards / "tokenizer")
    with pytest.raises(ValueError, match=r"does not take \['video'\]"):
        Predictor.from_dir(tmp_path / "m").predict_rows([{"video": str(root / "clip.mp4")}])


def test_batch_inference_reads_the_shards_video_column(clip_and_model):
    """The Ray Data actor of batch inference, called in this process on the shard rows: the
    frame strip, sound track and subtitles `mmdist prepare` stored give `mmdist predict
    --video`'s answer; without the video column the answer differs (the video is read)."""
    from mmdist.serve.batch import PredictActor

    root, shards, _ = clip_and_model
    rows = arrow_to_numpy(pq.read_table(next((shards / "train").glob("*.parquet"))))
    actor = PredictActor(str(root / "model"))
    got = actor(rows)
    direct = Predictor.from_dir(root / "model").predict_rows([{"video": str(root / "clip.mp4")}])
    assert list(got["sample_id"]) == [0] and got["label"][0] == direct[0]["label"]
    assert got["probability"][0] == pytest.approx(direct[0]["probability"], abs=1e-5)
    blind = actor({**rows, "video": np.array([None], dtype=object)})
    assert blind["probability"][0] != pytest.approx(got["probability"][0], abs=1e-5)
