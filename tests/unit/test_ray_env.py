"""The local Ray mmdist starts: Ray Train settings for one node, a user's own value kept, and
Ray Train still forwarding them from the driver to its controller (where they are read)."""

import os
from pathlib import Path

from mmdist.ray_env import LOCAL_TRAIN_ENV, local_init_kwargs


def test_local_ray_sets_one_node_train_settings_and_keeps_the_users(monkeypatch):
    for key in LOCAL_TRAIN_ENV:
        monkeypatch.delenv(key, raising=False)
    monkeypatch.setenv("RAY_TRAIN_HEALTH_CHECK_INTERVAL_S", "3")
    kwargs = local_init_kwargs(num_cpus=2)
    assert os.environ["RAY_TRAIN_ENABLE_PREEMPTION_WATCHER"] == "0"
    assert os.environ["RAY_TRAIN_HEALTH_CHECK_INTERVAL_S"] == "3"  # the user's, not ours
    assert kwargs["_node_ip_address"] == "127.0.0.1" and kwargs["num_cpus"] == 2


def test_ray_train_forwards_the_settings_from_the_driver(monkeypatch):
    from ray.train.v2._internal.constants import get_env_vars_to_propagate

    for key, value in LOCAL_TRAIN_ENV.items():
        monkeypatch.setenv(key, value)
    assert get_env_vars_to_propagate().items() >= LOCAL_TRAIN_ENV.items()


def test_local_ray_workers_run_at_the_drivers_priority(monkeypatch):
    """Ray starts workers at niceness 15: on a machine whose cores the training workers need,
    every other process would preempt them. The local Ray runs them at 0, a user's value kept."""
    from mmdist.ray_env import WORKER_NICENESS

    monkeypatch.delenv(WORKER_NICENESS, raising=False)
    assert local_init_kwargs(num_cpus=2)["runtime_env"]["env_vars"][WORKER_NICENESS] == "0"
    monkeypatch.setenv(WORKER_NICENESS, "5")
    assert local_init_kwargs(num_cpus=2)["runtime_env"]["env_vars"][WORKER_NICENESS] == "5"


def test_the_local_ray_starts_its_own_beside_a_stale_ray_start_address(tmp_path):
    """`ray start` writes its address to <ray temp dir>/ray_current_cluster and a crash leaves it
    there; a plain ray.init() joins that address (and refuses num_cpus) or waits on a dead GCS.
    The local Ray mmdist starts is always a new one."""
    import shutil
    import subprocess
    import sys
    import tempfile

    ray_tmp = tempfile.mkdtemp(prefix="rt", dir="/tmp")  # short: Ray's socket paths
    try:
        (Path(ray_tmp) / "ray").mkdir()
        (Path(ray_tmp) / "ray" / "ray_current_cluster").write_text("127.0.0.1:1")
        env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
        env["RAY_TMPDIR"] = ray_tmp
        r = subprocess.run(
            [sys.executable, "-c",
             "import ray\nfrom mmdist.ray_env import init_ray\ninit_ray(num_cpus=1)\n"
             "print('GCS', ray.get_runtime_context().gcs_address)\nray.shutdown()"],
            env=env, capture_output=True, text=True, timeout=180)
        assert r.returncode == 0, r.stderr[-3000:]
        gcs = r.stdout.split("GCS ")[1].split()[0]
        assert gcs != "127.0.0.1:1"  # a Ray of its own, not the address in the file
    finally:
        shutil.rmtree(ray_tmp, ignore_errors=True)


def test_one_host_settings_are_the_local_rays_and_up_sh_reads_them():
    """One source for both: the local Ray's settings, and the KEY=VALUE lines up.sh reads."""
    import subprocess
    import sys

    from mmdist.ray_env import WORKER_NICENESS, WORKERS_SOFT_LIMIT, one_host_env

    env = one_host_env(2)
    assert env[WORKERS_SOFT_LIMIT] == "8" and one_host_env(4)[WORKERS_SOFT_LIMIT] == "16"
    assert env[WORKER_NICENESS] == "0" and env.items() >= LOCAL_TRAIN_ENV.items()
    r = subprocess.run([sys.executable, "-m", "mmdist.ray_env", "2"], capture_output=True,
                       text=True, timeout=60)
    assert r.returncode == 0, r.stderr
    assert dict(line.split("=", 1) for line in r.stdout.split()) == env
