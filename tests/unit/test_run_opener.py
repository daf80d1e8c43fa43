"""The helper that opens `mmdist train`'s MLflow run (mmdist.train.run_opener), on a real
SQLite store: the command itself never imports MLflow for it, the params are MLflow's, a
resumed name finds its run, MLflow's refusal comes back named, and without a helper the same
calls run in the command."""

import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from mmdist.errors import CommandError
from mmdist.train.run_opener import RunOpener, open_run

ROOT = Path(__file__).resolve().parents[2]
PARAMS = {"train.lr": 0.002, "model.modalities": ["text", "image"], "storage.secret_token": "s3cret"}


def _params(uri: str, run_id: str) -> dict[str, str]:
    from mlflow.tracking import MlflowClient

    return MlflowClient(uri).get_run(run_id).data.params


def test_the_helper_opens_the_run_and_the_command_never_imports_mlflow(tmp_path):
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    code = textwrap.dedent(f'''
        import sys
        from mmdist.train.run_opener import RunOpener
        opener = RunOpener()
        print("ID", opener.open({uri!r}, "exp", "run-a", {PARAMS!r}))
        opener.close()
        print("MLFLOW", "mlflow" in sys.modules)
    ''')
    r = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True,
                       timeout=300, env={**os.environ, "MLFLOW_DISABLE_TELEMETRY": "true"})
    assert r.returncode == 0, r.stderr[-3000:]
    assert "MLFLOW False" in r.stdout, r.stdout
    first = r.stdout.split("ID ")[1].split()[0]
    # the same name again (a resumed run) continues its run
    assert open_run(uri, "exp", "run-a", PARAMS) == first
    params = _params(uri, first)
    assert params["train.lr"] == "0.002"
    assert params["model.modalities"] == "['text', 'image']"  # as log_params writes a list
    assert params["storage.secret_token"] == "***"


def test_mlflow_refusing_comes_back_named(tmp_path, monkeypatch):
    monkeypatch.delitem(sys.modules, "mlflow.tracking", raising=False)  # as in a fresh command
    blocker = tmp_path / "not-a-dir"
    blocker.write_text("")
    uri = f"sqlite:///{blocker / 'mlflow.db'}"  # a store MLflow cannot create
    opener = RunOpener()
    with pytest.raises(CommandError, match="MLflow could not open run 'run-b' of experiment "
                                           "'exp' at sqlite:///"):
        opener.open(uri, "exp", "run-b", PARAMS)


def test_without_a_helper_the_command_opens_the_run_itself(tmp_path, monkeypatch):
    monkeypatch.setattr(sys, "executable", str(tmp_path / "no-such-python"))
    opener = RunOpener()
    assert opener._proc is None
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    run_id = opener.open(uri, "exp", "run-c", PARAMS)
    assert _params(uri, run_id)["train.lr"] == "0.002"
    monkeypatch.undo()
    assert "mlflow.tracking" in sys.modules and RunOpener()._proc is None  # loaded: no helper


def test_a_helper_that_dies_is_replaced_and_an_unasked_one_is_stopped(tmp_path, monkeypatch):
    monkeypatch.delitem(sys.modules, "mlflow.tracking", raising=False)  # as in a fresh command
    opener, idle = RunOpener(), RunOpener()
    opener._proc.kill()
    opener._proc.wait()
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    run_id = opener.open(uri, "exp", "run-d", PARAMS)  # died without answering: done here
    assert opener.open(uri, "exp", "run-d", PARAMS) == run_id  # asked again: done here too
    proc = idle._proc
    idle.close()
    assert proc.poll() is not None and idle._proc is None
    idle.close()  # twice: nothing left to stop
