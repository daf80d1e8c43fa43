"""`mmdist serve`'s request parsing and validation, without Ray: every refused request gets a
4xx naming its field (and row, in a list)."""

import base64
import io
import json
import socket

import numpy as np
import pytest
import soundfile as sf
from PIL import Image

from mmdist.cli import main
from mmdist.data.rows import RowLimits
from mmdist.serve.http_api import (
    RequestError,
    ServeSettings,
    answer_body,
    parse_item,
    parse_predict_body,
)

ALL = ("text", "image", "audio")
SETTINGS = ServeSettings(model="models:/m@champion", tracking_uri="sqlite:///x.db", cache="/c")


def _png(size=(8, 8)) -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", size, (200, 30, 30)).save(buf, format="PNG")
    return buf.getvalue()


def _wav(seconds=0.25, rate=16000) -> bytes:
    buf = io.BytesIO()
    t = np.arange(int(seconds * rate)) / rate
    sf.write(buf, (0.3 * np.sin(2 * np.pi * 220 * t)).astype(np.float32), rate, format="WAV")
    return buf.getvalue()


def b64(data: bytes) -> str:
    return base64.b64encode(data).decode()


def _body(obj) -> bytes:
    return json.dumps(obj).encode()


def _refused(obj, modalities=ALL, settings=SETTINGS, raw=None) -> RequestError:
    with pytest.raises(RequestError) as e:
        parse_predict_body(raw if raw is not None else _body(obj), modalities, settings)
    assert 400 <= e.value.status < 500
    assert e.value.body()["ok"] is False and e.value.body()["field"] == e.value.field
    return e.value


def test_one_object_with_every_modality_gives_the_file_bytes():
    png, wav = _png(), _wav()
    rows, single = parse_predict_body(
        _body({"text": "a red square", "image": b64(png), "audio": b64(wav)}), ALL, SETTINGS)
    assert single is True
    assert rows == [{"text": "a red square", "image": png, "audio": wav, "video": None}]


def test_a_list_with_missing_modalities_null_and_empty_mean_absent():
    png = _png()
    rows, single = parse_predict_body(
        _body([{"text": "a red square"}, {"image": b64(png), "audio": None},
               {"text": "", "image": b64(png)}]), ALL, SETTINGS)
    assert single is False
    none = {"audio": None, "video": None}
    assert rows == [{"text": "a red square", "image": None, **none},
                    {"text": None, "image": png, **none},
                    {"text": None, "image": png, **none}]


def test_base64_that_is_not_base64_names_the_field_and_row():
    e = _refused([{"text": "ok"}, {"image": "not base64!!"}])
    assert (e.status, e.field, e.row) == (400, "image", 1)
    assert "row 1, field 'image': not valid base64" in str(e)


def test_bytes_that_are_not_an_image_or_audio_get_422():
    e = _refused({"image": b64(b"GIF89a but not really an image")})
    assert (e.status, e.field) == (422, "image") and "undecodable image" in str(e)
    e = _refused({"audio": b64(b"RIFF....WAVEfmt nonsense")})
    assert (e.status, e.field) == (422, "audio") and "undecodable audio" in str(e)


def test_a_modality_the_model_was_not_trained_on_is_named():
    e = _refused({"text": "a red square", "audio": b64(_wav())}, modalities=("text", "image"))
    assert (e.status, e.field) == (422, "audio")
    assert "takes ['image', 'text'], not audio" in str(e)


def test_unknown_fields_wrong_types_and_empty_inputs_are_400():
    assert _refused({"text": "x", "caption": "y"}).field == "caption"
    e = _refused({"text": 3})
    assert (e.status, e.field) == (400, "text") and "expected a string, got int" in str(e)
    assert _refused({"image": 123}).field == "image"
    assert _refused({}).field == "body"
    assert _refused({"text": None, "image": ""}).field == "body"
    assert _refused([]).field == "body"
    assert _refused("just a string").field == "body"
    e = _refused([{"text": "x"}, ["not", "an", "object"]])
    assert (e.field, e.row) == ("body", 1)
    e = _refused(None, raw=b"{not json")
    assert (e.status, e.field) == (400, "body") and "not JSON" in str(e)


def test_oversized_bodies_lists_texts_and_images_get_413_or_422():
    small = ServeSettings(**{**SETTINGS.to_dict(), "max_request_bytes": 100, "max_rows": 2,
                             "limits": RowLimits(max_text_chars=10, max_image_pixels=50)})
    e = _refused({"text": "x" * 200}, settings=small)
    assert (e.status, e.field) == (413, "body") and "--max-request-bytes" in str(e)
    e = _refused([{"text": "a"}] * 3, settings=small)
    assert (e.status, e.field) == (413, "body") and "--max-rows" in str(e)
    e = _refused({"text": "x" * 11}, settings=small)
    assert (e.status, e.field) == (413, "text")
    with pytest.raises(RequestError) as bomb:  # 8 x 8 = 64 pixels over a limit of 50
        parse_item({"image": b64(_png())}, None, ALL, small.limits)
    assert (bomb.value.status, bomb.value.field) == (422, "image")
    assert "image too large" in str(bomb.value)


def test_answer_body_is_what_predict_json_prints_plus_the_version():
    model = {"model_uri": "models:/m/3", "model_version": "3"}
    one = answer_body([{"task": "itm", "score": 0.25}], True, model)
    assert one == {"ok": True, "task": "itm", "score": 0.25, **model}
    many = answer_body([{"task": "itm", "score": 0.25}, {"task": "itm", "score": 0.5}], False,
                       model)
    assert many["predictions"][1]["score"] == 0.5 and many["model_version"] == "3"


def test_settings_travel_as_a_dict_and_bad_values_are_named():
    s = ServeSettings(**{**SETTINGS.to_dict(), "limits": RowLimits(max_text_chars=7)})
    assert ServeSettings.from_dict(json.loads(json.dumps(s.to_dict()))) == s
    bad = ServeSettings(**{**SETTINGS.to_dict(), "max_batch_size": 0, "poll_s": -1,
                           "limits": RowLimits()})
    assert bad.problems() == ["--max-batch-size=0: must be >= 1", "--poll-s=-1: must be >= 0"]


def test_serve_command_refuses_bad_flags_by_name_before_starting_ray(capsys, monkeypatch):
    monkeypatch.delenv("RAY_ADDRESS", raising=False)
    assert main(["serve", "models:/m@champion", "--port", "0", "--replicas", "2",
                 "--max-replicas", "1", "--json"]) == 1
    err = capsys.readouterr().err
    assert "--port=0" in err and "--max-replicas=1: must be >= --replicas=2" in err
    assert main(["serve", "models:/m@champion", "--detach"]) == 1
    assert "--detach: needs a Ray cluster" in capsys.readouterr().err


def test_serve_command_names_a_missing_model_or_a_busy_port_before_starting_ray(
        tmp_path, capsys, monkeypatch):
    monkeypatch.delenv("RAY_ADDRESS", raising=False)
    store = f"sqlite:///{tmp_path / 'mlflow.db'}"
    assert main(["serve", "models:/nope@champion", "--tracking-uri", store]) == 1
    assert "models:/nope@champion: not found in" in capsys.readouterr().err
    (tmp_path / "model").mkdir()
    (tmp_path / "model" / "config.json").write_text("{}")
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        assert main(["serve", str(tmp_path / "model"), "--port", str(port)]) == 1
    assert f"--port {port}: cannot listen there" in capsys.readouterr().err
