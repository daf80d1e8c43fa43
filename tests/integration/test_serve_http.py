"""`mmdist serve` on a real local Ray Serve, over HTTP, serving the model the `trained` fixture
trained; moving its alias; and `mlflow models serve` of the same registered model."""

import base64
import http.client
import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
from pathlib import Path

import pandas as pd
import pytest
import torch
from safetensors.torch import load_file, save_file

from mmdist.cli import main
from mmdist.serve.pull import pull

NAME = "served-model"  # its own name: moving its alias leaves zero2-model to the other tests
ROOT = Path(__file__).resolve().parents[2]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _http(url: str, body=None, raw: bytes | None = None, timeout: float = 120):
    """(status, JSON body) of a GET (no body) or a POST of JSON."""
    data = raw if raw is not None else (None if body is None else json.dumps(body).encode())
    req = urllib.request.Request(url, data=data, headers={"content-type": "application/json"})
    try:
        with urllib.request.urlopen(req, timeout=timeout) as r:
            return r.status, json.loads(r.read())
    except urllib.error.HTTPError as e:
        return e.code, json.loads(e.read())


def _register(trained, model_dir: Path, checkpoint: str) -> str:
    """Register ``model_dir`` as a version of NAME from a run of its own (the real
    registration path: pyfunc from code, code_paths, requirements); returns the version."""
    from mmdist.tracking import get_or_create_run
    from mmdist.train.register import register_model

    cfg = trained["cfg"].override({"tracking.model_name": NAME})
    run_id = get_or_create_run(trained["uri"], cfg.tracking.experiment, f"serve-{checkpoint}")
    return register_model(trained["uri"], run_id, model_dir, cfg, {}, checkpoint=checkpoint,
                          attempts=2, wait_s=1)["version"]


@pytest.fixture(scope="module")
def versions(trained, tmp_path_factory):
    """NAME v1: the trained model; v2: the same with perturbed weights (other scores)."""
    tmp = tmp_path_factory.mktemp("versions")
    v1_dir = Path(pull("models:/zero2-model@champion", tmp / "v1", trained["uri"])["dst"])
    v2_dir = tmp / "v2"
    pull("models:/zero2-model@champion", v2_dir, trained["uri"])
    g = torch.Generator().manual_seed(0)
    state = {k: v + 0.05 * torch.randn(v.shape, generator=g) if v.is_floating_point() else v
             for k, v in load_file(v2_dir / "model.safetensors").items()}
    save_file(state, v2_dir / "model.safetensors")
    assert _register(trained, v1_dir, "v1") == "1"
    return {"1": v1_dir, "2": v2_dir}


@pytest.fixture(scope="module")
def example(trained, tmp_path_factory):
    """One val row as files (for `mmdist predict`) and as base64 (for HTTP)."""
    val = pd.read_parquet(trained["data"] / "val").iloc[0]
    d = tmp_path_factory.mktemp("example")
    (d / "x.png").write_bytes(val["image"])
    (d / "x.wav").write_bytes(val["audio"])
    return {"files": {"image": str(d / "x.png"), "audio": str(d / "x.wav"), "text": val["text"]},
            "b64": {"image": base64.b64encode(val["image"]).decode(),
                    "audio": base64.b64encode(val["audio"]).decode(), "text": val["text"]}}


@pytest.fixture(scope="module")
def served(ray_local, trained, versions, tmp_path_factory):
    """`mmdist serve models:/NAME@champion --detach --json`, joining the test's Ray."""
    from ray import serve

    port = _free_port()
    cache = tmp_path_factory.mktemp("serve-cache")
    r = subprocess.run(
        [sys.executable, "-m", "mmdist.cli", "serve", f"models:/{NAME}@champion", "--port",
         str(port), "--address", ray_local.get_runtime_context().gcs_address, "--detach",
         "--tracking-uri", trained["uri"], "--cache", str(cache), "--poll-s", "0",
         "--cpus-per-replica", "0.5", "--max-batch-size", "8", "--max-request-bytes",
         str(2**20), "--json"], capture_output=True, text=True, timeout=300, cwd=ROOT)
    assert r.returncode == 0, r.stderr[-3000:]
    summary = json.loads(r.stdout.strip().splitlines()[-1])
    assert f"serving models:/{NAME}/1" in r.stdout and f"http://127.0.0.1:{port}" in r.stdout
    yield {**summary, "port": port}
    serve.shutdown()


def _predict_cli(capsys, model_dir: Path, **inputs) -> dict:
    """What `mmdist predict --model DIR ... --json` prints: its parser and its run(), in this
    process (main() would also shut down the test's Ray before printing)."""
    from mmdist.cli import build_parser
    from mmdist.serve import predict

    args = build_parser().parse_args(["predict", "--model", str(model_dir), "--json",
                                      *[f"--{k}={v}" for k, v in inputs.items()]])
    out = predict.run(args)
    capsys.readouterr()
    return out


def test_answers_match_mmdist_predict_with_every_modality_and_some_missing(served, versions,
                                                                         example, capsys):
    assert served["model_version"] == "1" and served["url"] == f"http://127.0.0.1:{served['port']}"
    f, b = example["files"], example["b64"]
    cases = [("text", "image", "audio"), ("text", "image"), ("image", "audio"), ("text",)]
    expected = [_predict_cli(capsys, versions["1"], **{k: f[k] for k in c}) for c in cases]
    for given, want in zip(cases, expected):
        status, got = _http(served["url"] + "/predict", {k: b[k] for k in given})
        assert status == 200, got
        assert got["model_version"] == "1" and got["model_uri"] == f"models:/{NAME}/1"
        assert got["task"] == want["task"] == "itm"
        assert got["score"] == pytest.approx(want["score"], abs=1e-5), given
    status, many = _http(served["url"] + "/predict", [{k: b[k] for k in c} for c in cases])
    assert status == 200 and many["model_version"] == "1"
    assert [p["score"] for p in many["predictions"]] == pytest.approx(
        [w["score"] for w in expected], abs=1e-5)
    assert len({round(w["score"], 6) for w in expected}) > 1  # the missing ones mattered
    status, health = _http(served["url"] + "/health")
    assert status == 200 and health["model_version"] == "1"
    assert health["modalities"] == ["text", "image", "audio"]


def test_malformed_requests_get_4xx_naming_the_field_and_the_next_one_succeeds(served, example):
    url = served["url"] + "/predict"
    png = base64.b64decode(example["b64"]["image"])
    bad = [({"text": "x", "image": "not base64!!"}, None, 400, "image"),
           ({"image": base64.b64encode(png[: len(png) // 3]).decode()}, None, 422, "image"),
           ({"text": "x", "video": "AAAA"}, None, 422, "video"),  # a modality it does not take
           ({"text": 12}, None, 400, "text"),
           ([{"text": "ok"}, {"audio": base64.b64encode(b"RIFF nonsense").decode()}], None, 422,
            "audio"),
           (None, b"{not json", 400, "body"),
           (None, json.dumps({"text": "x" * (2**20 + 10)}).encode(), 413, "body")]
    for body, raw, status, field in bad:
        got_status, got = _http(url, body, raw=raw)
        assert (got_status, got["field"], got["ok"]) == (status, field, False), got
        assert field in got["error"]
        ok_status, ok = _http(url, {"text": example["b64"]["text"]})
        assert ok_status == 200 and "score" in ok
    # no Content-Length (chunked): refused while it streams in
    conn = http.client.HTTPConnection("127.0.0.1", served["port"], timeout=120)
    conn.request("POST", "/predict", body=iter([b'{"text": "', b"x" * 2**19, b"y" * 2**19,
                                                b"z" * 64, b'"}']),
                 headers={"content-type": "application/json"}, encode_chunked=True)
    r = conn.getresponse()
    assert r.status == 413 and json.loads(r.read())["field"] == "body"
    conn.close()
    assert _http(url, {"text": example["b64"]["text"]})[0] == 200


def _polled_app(served, trained, tmp_path) -> dict:
    """A second application on the same Serve proxy, following the alias by polling every
    second (no POST /reload)."""
    from mmdist.serve.deploy import start

    return start({"model": f"models:/{NAME}@champion", "tracking_uri": trained["uri"],
                  "cache": str(tmp_path / "cache"), "poll_s": 1, "cpus": 0.25},
                 "127.0.0.1", served["port"], "polled", "/polled")


def _wait_for_version(app, version: str, tries: int = 600) -> bool:
    """Whether the polled app's /health reaches ``version`` (a wait for the poller, not a
    timing assertion: up to 10 minutes on a loaded machine)."""
    for _ in range(tries):
        if _http(app["url"] + "/health")[1]["model_version"] == version:
            return True
        time.sleep(1)
    return False


def test_moving_the_alias_switches_the_served_version_without_dropping_requests(
        served, trained, versions, example, capsys, tmp_path):
    url, body = served["url"], example["b64"]
    _, before = _http(url + "/predict", body)
    statuses, seen, stop = [], set(), threading.Event()

    def keep_asking():
        while not stop.is_set():
            status, got = _http(url + "/predict", body)
            statuses.append(status)
            seen.add(got.get("model_version"))

    polled = _polled_app(served, trained, tmp_path)
    assert _register(trained, versions["2"], "v2") == "2"  # registration moves champion to v2
    asker = threading.Thread(target=keep_asking)
    asker.start()
    try:
        status, reloaded = _http(url + "/reload", raw=b"")
        _, after = _http(url + "/predict", body)
    finally:
        stop.set()
        asker.join()
    assert status == 200 and reloaded["changed"] is True
    assert (reloaded["previous_version"], reloaded["model_version"]) == ("1", "2")
    assert statuses and set(statuses) == {200} and seen <= {"1", "2"}
    assert after["model_version"] == "2" and after["score"] != pytest.approx(before["score"])
    want = _predict_cli(capsys, versions["2"], **example["files"])["score"]
    assert after["score"] == pytest.approx(want, abs=1e-5)
    assert _wait_for_version(polled, "2")  # the polling replica follows by itself
    # back with `mmdist promote`, then a reload: v1's answers again
    assert main(["promote", f"models:/{NAME}/1", "--alias", "champion",
                 "--tracking-uri", trained["uri"]]) == 0
    capsys.readouterr()
    status, reloaded = _http(url + "/reload", raw=b"")
    assert status == 200 and reloaded["model_version"] == "1"
    _, again = _http(url + "/predict", body)
    assert again["model_version"] == "1" and again["score"] == pytest.approx(before["score"])
    assert _wait_for_version(polled, "1")


def test_mlflow_models_serve_answers_a_request(trained, versions, example, tmp_path, capsys):
    port = _free_port()
    bin_dir = str(Path(sys.executable).parent)  # mlflow execs `uvicorn` from PATH
    env = {**os.environ, "MLFLOW_TRACKING_URI": trained["uri"],
           "PATH": f"{bin_dir}{os.pathsep}{os.environ.get('PATH', '')}"}
    proc = subprocess.Popen(
        [str(Path(bin_dir) / "mlflow"), "models", "serve", "-m",
         f"models:/{NAME}@champion", "--env-manager", "local", "--host", "127.0.0.1", "--port",
         str(port)], env=env, cwd=tmp_path, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
        start_new_session=True)
    try:
        for _ in range(240):  # the server imports torch and loads the model first
            try:
                if urllib.request.urlopen(f"http://127.0.0.1:{port}/ping", timeout=2).status \
                        == 200:
                    break
            except OSError:
                assert proc.poll() is None, proc.stdout.read().decode()[-3000:]
                time.sleep(0.5)
        status, got = _http(f"http://127.0.0.1:{port}/invocations",
                            {"dataframe_records": [example["files"]]})
    finally:
        os.killpg(proc.pid, signal.SIGTERM)
        proc.wait(timeout=60)
    assert status == 200, got
    want = _predict_cli(capsys, versions["1"], **example["files"])["score"]
    assert got["predictions"][0]["score"] == pytest.approx(want, abs=1e-5)


def test_the_pyfunc_loads_where_mmdist_is_not_installed_and_needs_no_training_stack(
        trained, versions, example, tmp_path, capsys):
    """A Python that sees site-packages but not mmdist's editable install (no .pth files run)
    loads the registered pyfunc from its own code_paths copy of mmdist, and predicting imports
    nothing the requirements leave out."""
    import mlflow

    from mmdist.train.model_env import NOT_FOR_PREDICTION

    local = Path(mlflow.artifacts.download_artifacts(
        artifact_uri=f"models:/{NAME}/1", dst_path=str(tmp_path), tracking_uri=trained["uri"]))
    reqs = {line.split("==")[0] for line in (local / "requirements.txt").read_text().split()}
    assert {"torch", "mlflow", "safetensors"} <= reqs and not reqs & {"ray", "deepspeed"}
    site = next(p for p in sys.path if p.endswith("site-packages"))
    modules = {"ray", "deepspeed", "accelerate", "matplotlib", "tabulate", "sklearn",
               "espeakng_loader", "threadpoolctl", "av", "sacrebleu"}
    assert len(modules) == len(NOT_FOR_PREDICTION)
    code = (f"import sys; sys.path.append({site!r})\n"
            "try:\n    import mmdist\nexcept ImportError:\n    pass\n"
            "else:\n    raise SystemExit('mmdist is importable without the model')\n"
            "import json, mlflow, pandas as pd\n"
            f"m = mlflow.pyfunc.load_model({str(local)!r})\n"
            f"score = float(m.predict(pd.DataFrame([{json.dumps(example['files'])}]))['score'][0])\n"
            f"loaded = sorted(set({sorted(modules)!r}) & {{k.split('.')[0] for k in sys.modules}})\n"
            "print(json.dumps({'score': score, 'loaded': loaded, "
            "'mmdist': sys.modules['mmdist'].__file__}))\n")
    r = subprocess.run([sys.executable, "-S", "-c", code], capture_output=True, text=True,
                       timeout=300, cwd=tmp_path)
    assert r.returncode == 0, r.stderr[-3000:]
    out = json.loads(r.stdout.strip().splitlines()[-1])
    assert out["loaded"] == [] and out["mmdist"].startswith(str(local))
    want = _predict_cli(capsys, versions["1"], **example["files"])["score"]
    assert out["score"] == pytest.approx(want, abs=1e-5)
