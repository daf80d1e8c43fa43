"""The local Ray mmdist starts: Ray Train settings for one node, a user's own value kept, and
Ray Train still forwarding them from the driver to its controller (where they are read)."""

import os

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
