"""The local cluster for real: cluster/local/up.sh, token-authenticated `ray job submit`, the
MLflow server, `make submit-train` registering its model there, cluster/local/down.sh.

The cluster comes up twice, once as `make cluster-up` starts it (MLflow without auth) and once
with `--mlflow-auth`; each mode runs one train job. Each cluster runs on free ports with its own
state folder, so it never touches a cluster the user has up (or another test session's).
"""

import base64
import json
import os
import re
import shutil
import socket
import subprocess
import tempfile
import time
import urllib.error
import urllib.request
from pathlib import Path
from types import SimpleNamespace

import pytest

ROOT = Path(__file__).resolve().parents[2]
RAY = str(ROOT / ".venv" / "bin" / "ray")
pytestmark = pytest.mark.slow


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _clean_env(**extra: str) -> dict[str, str]:
    """This process's environment without any Ray/MLflow cluster settings, plus ``extra``."""
    env = {k: v for k, v in os.environ.items()
           if not k.startswith(("RAY_AUTH", "RAY_ADDRESS", "MMDIST_", "MLFLOW_TRACKING"))}
    env.update(extra)
    return env


def _read_env_file(path: Path) -> dict[str, str]:
    out = {}
    for line in path.read_text().splitlines():
        if line and not line.startswith("#"):
            k, v = line.split("=", 1)
            out[k] = v
    return out


def test_up_refuses_a_port_in_use_naming_the_setting(tmp_path):
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        r = subprocess.run([str(ROOT / "cluster/local/up.sh")], cwd=ROOT, capture_output=True,
                           text=True, timeout=60,
                           env=_clean_env(MMDIST_CLUSTER_DIR=str(tmp_path / "c"),
                                          MMDIST_RAY_PORT=str(port)))
    assert r.returncode == 1
    assert f"port {port} on 127.0.0.1 (Ray GCS) is already in use" in r.stderr
    assert "MMDIST_RAY_PORT" in r.stderr
    assert not (tmp_path / "c" / "ray.pid").exists()


@pytest.fixture(scope="module", params=[True, False], ids=["auth", "noauth"])
def cluster(request):
    auth = request.param
    # A short path: Ray's unix sockets live under the state folder (108-byte limit).
    state = Path(tempfile.mkdtemp(prefix="mmc", dir="/tmp"))
    env = _clean_env(MMDIST_CLUSTER_DIR=str(state), MMDIST_RAY_PORT=str(_free_port()),
                     MMDIST_DASHBOARD_PORT=str(_free_port()),
                     MMDIST_MLFLOW_PORT=str(_free_port()), MMDIST_CLUSTER_CPUS="2")
    if auth:
        env["MMDIST_MLFLOW_AUTH"] = "1"  # MLflow's basic-auth app, generated password
        # An admin password left in the user's shell must not replace the generated one.
        env["MLFLOW_AUTH_ADMIN_PASSWORD"] = "from-the-users-shell"
    else:
        # An auth config path left in the user's shell must not reach the no-auth server (the
        # server reads it on every run search; a missing file gave HTTP 500).
        env["MLFLOW_AUTH_CONFIG_PATH"] = str(state / "no-such-auth.ini")
    try:
        t0 = time.perf_counter()
        up = subprocess.run([str(ROOT / "cluster/local/up.sh")], env=env, cwd=ROOT,
                            capture_output=True, text=True, timeout=420)
        assert up.returncode == 0, up.stdout + up.stderr
        up_s = time.perf_counter() - t0
        print(f"cluster ({'auth' if auth else 'noauth'}) up in {up_s:.0f} s")
        env_file = state / "env"
        assert env_file.stat().st_mode & 0o077 == 0, "the env file must be private (0600)"
        assert (state / "ray_token").stat().st_mode & 0o077 == 0
        yield SimpleNamespace(state=state, env=env, vars=_read_env_file(env_file), up_s=up_s,
                              auth=auth)
    finally:
        t0 = time.perf_counter()
        down = subprocess.run([str(ROOT / "cluster/local/down.sh")], env=env, cwd=ROOT,
                              capture_output=True, text=True, timeout=240)
        print(f"cluster down in {time.perf_counter() - t0:.0f} s: {down.stdout}{down.stderr}")
        for pidfile in ("ray.pid", "mlflow.pid"):
            assert not (state / pidfile).exists(), down.stdout + down.stderr
        shutil.rmtree(state, ignore_errors=True)


def _submit(cluster, workdir: Path, *entry: str, **env: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [RAY, "job", "submit", "--address", cluster.vars["RAY_ADDRESS"],
         "--working-dir", str(workdir), "--", *entry],
        env=_clean_env(**env), cwd=workdir, capture_output=True, text=True, timeout=600)


def _mlflow_request(cluster, path: str, body: dict | None = None,
                    user: str | None = None, password: str | None = None):
    """GET (or POST ``body`` as JSON) ``path`` on the cluster's MLflow server: its status code
    and body, errors (status >= 400) included."""
    req = urllib.request.Request(cluster.vars["MLFLOW_TRACKING_URI"] + path,
                                 data=None if body is None else json.dumps(body).encode(),
                                 headers={"Content-Type": "application/json"})
    if user:
        req.add_header("Authorization", "Basic " + base64.b64encode(
            f"{user}:{password}".encode()).decode())
    try:
        with urllib.request.urlopen(req, timeout=30) as r:
            return SimpleNamespace(code=r.status, body=r.read().decode())
    except urllib.error.HTTPError as e:
        return SimpleNamespace(code=e.code, body=e.read().decode(errors="replace"))


def test_up_is_idempotent_and_the_env_file_names_both_services(cluster):
    v = cluster.vars
    assert v["RAY_ADDRESS"].startswith("http://127.0.0.1:")
    assert v["MMDIST_RAY_GCS_ADDRESS"].startswith("127.0.0.1:")
    assert v["RAY_AUTH_MODE"] == "token"
    assert v["MLFLOW_TRACKING_URI"].startswith("http://127.0.0.1:")
    if cluster.auth:
        assert v["MLFLOW_TRACKING_USERNAME"] == "admin" and v["MLFLOW_TRACKING_PASSWORD"]
    else:
        assert "MLFLOW_TRACKING_USERNAME" not in v and "MLFLOW_TRACKING_PASSWORD" not in v
    # Again, here without the auth setting: the running server keeps its mode, the env file too.
    again = subprocess.run([str(ROOT / "cluster/local/up.sh")], cwd=ROOT,
                           env={k: x for k, x in cluster.env.items() if k != "MMDIST_MLFLOW_AUTH"},
                           capture_output=True, text=True, timeout=120)
    assert again.returncode == 0, again.stderr
    assert "already running" in again.stdout
    assert _read_env_file(cluster.state / "env") == v


def test_mlflow_server_runs_without_mlflows_job_consumers(cluster):
    """The server's process group: the `mlflow server` CLI and its uvicorn worker, not MLflow 3's
    job runner and its 8 huey consumers (GenAI jobs mmdist never submits)."""
    pgid = int((cluster.state / "mlflow.pid").read_text())
    ps = subprocess.run(["ps", "-eo", "pgid=,args="], capture_output=True, text=True)
    procs = [line.split(None, 1)[1] for line in ps.stdout.splitlines()
             if line.split(None, 1)[0] == str(pgid)]
    assert any("uvicorn" in p for p in procs), procs  # the server itself is this group
    assert not [p for p in procs if "huey" in p or "_job_runner" in p], procs


def test_mlflow_server_answers_run_searches(cluster):
    """Every run search of the no-auth server was an HTTP 500 (KeyError: 'mlflow') when up.sh
    pointed MLFLOW_AUTH_CONFIG_PATH at an auth config it had not written."""
    assert _mlflow_request(cluster, "/health").code == 200
    creds = ({"user": "admin", "password": cluster.vars["MLFLOW_TRACKING_PASSWORD"]}
             if cluster.auth else {})
    for path, body in (("/api/2.0/mlflow/runs/search", {"experiment_ids": ["0"]}),
                       ("/api/2.0/mlflow/experiments/search", {"max_results": 1})):
        r = _mlflow_request(cluster, path, body, **creds)
        assert r.code == 200, f"{path}: HTTP {r.code}: {r.body[-2000:]}"
    log = (cluster.state / "logs" / "mlflow.log").read_text(errors="replace")
    assert "Traceback" not in log, log[-4000:]


AUTH_ONLY = pytest.mark.parametrize("cluster", [True], ids=["auth"], indirect=True)


@AUTH_ONLY  # only the --mlflow-auth server has a password
def test_mlflow_server_refuses_requests_without_the_password(cluster):
    password = cluster.vars["MLFLOW_TRACKING_PASSWORD"]
    assert len(password) >= 24 and (cluster.state / "mlflow_admin_password").stat().st_mode \
        & 0o077 == 0
    api = "/api/2.0/mlflow/experiments/search?max_results=1"
    for user, pw in ((None, None), ("admin", "password"), ("admin", password[:-1]),
                     ("admin", cluster.env["MLFLOW_AUTH_ADMIN_PASSWORD"])):
        assert _mlflow_request(cluster, api, user=user, password=pw).code == 401, (user, pw)
    assert _mlflow_request(cluster, api, user="admin", password=password).code == 200


@AUTH_ONLY  # the Ray head is the same in both modes: checked once
def test_submit_without_the_token_is_refused_and_with_it_succeeds(cluster, tmp_path):
    work = tmp_path / "job"
    work.mkdir()
    (work / "hello.py").write_text(
        "import os, ray\nray.init()\nprint('CPUS', ray.cluster_resources()['CPU'])\n"
        # a job's workers run at the driver's priority (up.sh starts Ray with niceness 0)
        "print('NICE', ray.get(ray.remote(lambda: os.nice(0)).remote()))\n"
        # idle Ray Data workers are kept between epochs: max(8, 4 x CPUs), as the local Ray's
        "print('SOFT', ray.get(ray.remote(\n"
        "    lambda: os.environ.get('RAY_num_workers_soft_limit')).remote()))\n")
    # No token anywhere: not in the environment, and a home folder without ~/.ray/auth_token.
    no_token = _submit(cluster, work, "python", "hello.py", HOME=str(tmp_path))
    assert no_token.returncode != 0
    assert "authentication token" in (no_token.stdout + no_token.stderr).lower()
    wrong = _submit(cluster, work, "python", "hello.py", HOME=str(tmp_path),
                    RAY_AUTH_MODE="token", RAY_AUTH_TOKEN="not-the-token")
    assert wrong.returncode != 0
    assert "authentication" in (wrong.stdout + wrong.stderr).lower()

    t0 = time.perf_counter()
    ok = _submit(cluster, work, "python", "hello.py", RAY_AUTH_MODE="token",
                 RAY_AUTH_TOKEN_PATH=cluster.vars["RAY_AUTH_TOKEN_PATH"])
    print(f"token job submitted and finished in {time.perf_counter() - t0:.0f} s")
    assert ok.returncode == 0, ok.stdout[-3000:] + ok.stderr[-3000:]
    assert "CPUS 2.0" in ok.stdout
    assert "NICE 0" in ok.stdout, ok.stdout[-3000:]
    assert "SOFT 8" in ok.stdout, ok.stdout[-3000:]  # 2 CPUs
    assert "succeeded" in ok.stdout + ok.stderr


@pytest.mark.timeout(1500)
def test_submit_train_finds_run_and_registered_model_on_the_server(cluster, monkeypatch):
    """`make submit-train CONFIG=tiny ARGS="..."` as cluster/README.md says (cluster/submit.sh:
    preflight, ray job submit), SUCCEEDED, then the run and the model are on the MLflow server."""
    from mlflow.tracking import MlflowClient

    args = f"--json train.storage_path={cluster.state / 'runs'} tracking.model_name=cluster-tiny"
    t0 = time.perf_counter()
    job = subprocess.run(
        ["make", "--no-print-directory", "submit-train", "CONFIG=tiny", f"ARGS={args}"],
        env=_clean_env(MMDIST_CLUSTER_DIR=str(cluster.state)), cwd=ROOT,
        capture_output=True, text=True, timeout=1400)
    print(f"make submit-train (setup + preflight + job) took {time.perf_counter() - t0:.0f} s")
    out = job.stdout + job.stderr
    assert job.returncode == 0, out[-6000:]
    assert f"ray job submit to {cluster.vars['RAY_ADDRESS']}" in out  # this cluster, not .cluster
    assert "preflight: all 5 checks passed" in out
    summaries = []
    for line in job.stdout.splitlines():
        # Ray Data's progress bars share the stream: the JSON line may follow their escapes.
        start = line.find('{"')
        if start >= 0 and '"run_id"' in line:
            summaries.append(json.loads(line[start:].strip()))
    assert summaries, "the job printed no --json summary with run_id:\n" + job.stdout[-4000:]
    s = summaries[-1]
    # a readable log: no Ray Data progress bars, each of rank 0's step lines once
    assert "row/s" not in out
    steps = re.findall(r"\[mmdist\] step \d+/\d+ ", out)
    assert steps and len(steps) == len(set(steps)), steps
    assert s["ok"] is True and s["model_uri"] == "models:/cluster-tiny/1"
    assert s["tracking_uri"] == cluster.vars["MLFLOW_TRACKING_URI"]
    # up.sh's Ray is one host: Ray Train started no preemption watcher; and the command's job
    # ends with its run: no placement-group cleaner either (train.backend.trainer_and_backend)
    listed = subprocess.run(
        [RAY, "list", "actors", "--address", cluster.vars["RAY_ADDRESS"], "--format", "json",
         "--limit", "10000"],
        env=_clean_env(RAY_AUTH_MODE="token",
                       RAY_AUTH_TOKEN_PATH=cluster.vars["RAY_AUTH_TOKEN_PATH"]),
        capture_output=True, text=True, timeout=120)
    text = listed.stdout
    assert listed.returncode == 0 and "[" in text, text[-2000:] + listed.stderr[-2000:]
    classes = {a["class_name"] for a in json.loads(text[text.index("["):text.rindex("]") + 1])}
    assert {"TrainController", "SplitCoordinator"} <= classes, classes
    # the driver split the data itself (pipeline.worker_shards): no dataset manager
    assert not {"PreemptionWatcher", "PlacementGroupCleaner", "DatasetManager"} & classes, classes

    if cluster.auth:
        password = cluster.vars["MLFLOW_TRACKING_PASSWORD"]
        assert password not in out  # no secret in the job's logs
        for k in ("MLFLOW_TRACKING_USERNAME", "MLFLOW_TRACKING_PASSWORD"):
            monkeypatch.setenv(k, cluster.vars[k])
    else:
        for k in ("MLFLOW_TRACKING_USERNAME", "MLFLOW_TRACKING_PASSWORD"):
            monkeypatch.delenv(k, raising=False)
    client = MlflowClient(cluster.vars["MLFLOW_TRACKING_URI"])
    run = client.get_run(s["run_id"])
    if cluster.auth:
        assert password not in json.dumps(run.data.params)
    assert run.info.status == "FINISHED"
    assert run.data.metrics, "the run on the server has no metrics"
    # a run search, what failed with HTTP 500 on the no-auth server
    found = client.search_runs([run.info.experiment_id], f"attributes.run_id = '{s['run_id']}'")
    assert [r.info.run_id for r in found] == [s["run_id"]]
    version = client.get_model_version_by_alias("cluster-tiny", s["alias"])
    assert version.run_id == s["run_id"]
    assert Path(s["checkpoint"]).is_relative_to(cluster.state / "runs")
    log = (cluster.state / "logs" / "mlflow.log").read_text(errors="replace")
    assert "Traceback" not in log, log[-4000:]
