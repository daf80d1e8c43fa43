"""DeepSpeed's CPU shm op is built once per machine (`make setup`) and then only loaded: not
rebuilt by a process whose PATH finds another ninja first (a system ninja 1.11 and the ninja
1.13 wheel read each other's build log as changed commands; every switch cost a ~50 s build)."""

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
pytestmark = pytest.mark.slow


def test_the_environments_ninja_comes_first(monkeypatch):
    from mmdist.train.engine import use_environment_ninja

    monkeypatch.setenv("PATH", "/usr/bin:/bin")
    use_environment_ninja()
    env_ninja = Path(sys.executable).parent / "ninja"
    assert shutil.which("ninja") == str(env_ninja)
    use_environment_ninja()  # once is enough
    assert os.environ["PATH"].split(os.pathsep).count(str(env_ninja.parent)) == 1


def _ops(path: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": str(ROOT), "PATH": path}
    r = subprocess.run([sys.executable, "-m", "mmdist.train.ops"], cwd=ROOT, env=env,
                       capture_output=True, text=True, timeout=900)
    assert r.returncode == 0, r.stderr[-3000:]
    return r


def test_a_built_op_is_loaded_not_rebuilt_whatever_the_path():
    so = Path(os.environ["TORCH_EXTENSIONS_DIR"]) / "deepspeed_shm_comm" / "deepspeed_shm_comm.so"
    system = "/usr/bin:/bin"  # as `make` runs it: the system's ninja first, where it has one
    venv = f"{Path(sys.executable).parent}:{system}"  # as the local cluster's jobs run
    for first, then in ((system, venv), (venv, system)):
        _ops(first)
        built = so.stat().st_mtime_ns
        r = _ops(then)
        assert "building" not in r.stdout, r.stdout
        assert so.stat().st_mtime_ns == built, f"built with PATH={first}, rebuilt with {then}"
