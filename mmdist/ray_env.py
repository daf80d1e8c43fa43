"""How mmdist starts or joins Ray: :func:`init_ray` / :func:`release_ray` for every command
(train, sweep, evaluate, predict, benches) and the options every local ``ray.init`` needs, also
used by the test suite's Ray fixture, so tests run on the Ray that users get.
"""

from __future__ import annotations

import os
from typing import Any

# Forwarded from the driver's environment to every Ray worker when set.
FORWARDED_ENV = ("TORCH_EXTENSIONS_DIR", "MLFLOW_DISABLE_TELEMETRY", "TOKENIZERS_PARALLELISM",
                 "HF_HUB_OFFLINE")
# Ray keeps about num_cpus idle worker processes and kills the rest. Ray Data tasks of
# data.cpus_per_task=0.5 beside the train workers need more than that, so with Ray's default
# it kills and restarts them all the time, each paying its imports again (figures:
# docs/performance.md). The raylet reads this when it starts.
WORKERS_SOFT_LIMIT = "RAY_num_workers_soft_limit"
# Ray starts its worker processes at niceness 15, so that they yield to its own services. On a
# machine whose cores the training workers need, any other process (the driver, the dashboard,
# Ray's services) then takes the core away from them at once: the demo's steps in a Ray Train
# worker ran 5-8% slower than the same engine in the driver (`mmdist bench train`, 2 cores).
# Each worker reads this from its environment; the local Ray mmdist starts runs its workers at
# the driver's priority (a user's own value wins; Ray's job supervisor does the same for itself).
WORKER_NICENESS = "RAY_worker_niceness"
# Ray Train settings for the one-node Ray mmdist starts itself (a user's own value wins). Ray
# Train passes them from the driver's environment to its controller and workers.
LOCAL_TRAIN_ENV = {
    # The preemption watcher is one more actor per run (a process importing ray.train) that
    # reports nodes being drained; with one node, a drain is the end of the whole cluster
    # anyway.
    "RAY_TRAIN_ENABLE_PREEMPTION_WATCHER": "0",
    # The controller polls its workers every 2 s by default, so a finished run waits up to 2 s
    # before its group is shut down and again before fit() returns; 0.5 s polls bring the
    # model registration seconds sooner (docs/performance.md).
    "RAY_TRAIN_HEALTH_CHECK_INTERVAL_S": "0.5",
}


def pin_ray_address() -> None:
    """``worker_process_setup_hook``: point Ray's own address lookups at this cluster.

    Ray Train's placement-group cleaner (a detached actor) asks the state API whether a
    controller is alive, and the state API finds its cluster by scanning the machine. With two
    Ray instances on one host (a `make cluster-up` cluster and a local `mmdist sweep`, or two
    test sessions) it fails ("Found multiple active Ray instances"), the placement group of
    every trial ASHA stops leaks, and the next trials wait forever for CPUs.
    """
    import ray  # heavy: not loaded for --help

    os.environ.setdefault("RAY_ADDRESS", ray.get_runtime_context().gcs_address)


def one_host_env(cpus: int | float) -> dict[str, str]:
    """The settings of a Ray on one host with ``cpus`` CPUs: the local Ray mmdist starts, and
    the head `cluster/local/up.sh` starts (``python -m mmdist.ray_env CPUS`` prints them):
    max(8, 4 x cpus) idle workers (:data:`WORKERS_SOFT_LIMIT`), workers at the driver's
    priority (:data:`WORKER_NICENESS`) and :data:`LOCAL_TRAIN_ENV`."""
    return {WORKERS_SOFT_LIMIT: str(max(8, int(4 * cpus))), WORKER_NICENESS: "0",
            **LOCAL_TRAIN_ENV}


def local_init_kwargs(num_cpus: int | float | None = None, dashboard: bool = False,
                      env_vars: dict[str, str] | None = None) -> dict[str, Any]:
    """Keyword arguments for ``ray.init`` starting a local Ray bound to 127.0.0.1."""
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    host = one_host_env(num_cpus or cores or 1)
    for key in (WORKERS_SOFT_LIMIT, *LOCAL_TRAIN_ENV):  # read by the raylet and Ray Train
        os.environ.setdefault(key, host[key])
    env = {k: os.environ[k] for k in FORWARDED_ENV if k in os.environ}
    # Workers stream a val pass per evaluation; their progress bars would drown the step lines.
    env.setdefault("RAY_DATA_DISABLE_PROGRESS_BARS", "1")
    env.setdefault(WORKER_NICENESS, os.environ.get(WORKER_NICENESS, host[WORKER_NICENESS]))
    env.update(env_vars or {})
    # address="local": a new Ray, even where `ray start` left its address in
    # /tmp/ray/ray_current_cluster. ray.init() would join that cluster instead (and refuse
    # num_cpus), or wait on its dead GCS if it crashed.
    return {"address": "local", "num_cpus": num_cpus, "include_dashboard": dashboard,
            "dashboard_host": "127.0.0.1", "_node_ip_address": "127.0.0.1",
            "runtime_env": {"env_vars": env,
                            "worker_process_setup_hook": "mmdist.ray_env.pin_ray_address"}}


# the driver job id of the connection init_ray made (a caller's own ray.init is left alone)
_RAY_OWNED: str | None = None


def init_ray(address: str | None = None, num_cpus: int | None = None,
             dashboard: bool = False) -> None:
    """Connect to $RAY_ADDRESS / ``address``, or start a local Ray bound to 127.0.0.1.

    Training and sweeps want the dashboard: Ray Train's placement-group cleaner asks the state
    API (served by the dashboard) whether the controller lives. Without it, trials stopped by
    ASHA leak their placement group and the next trial hangs (Ray issue 54305), and a training
    run prints "Failed to query Ray Train Controller actor state" every few seconds. It costs
    about 2 s of ``ray.init`` (2 cores, 2026-11-24; docs/performance.md) and binds 127.0.0.1
    like the rest.
    """
    import ray  # heavy: not loaded for --help

    global _RAY_OWNED
    if ray.is_initialized():
        return
    address = address or os.environ.get("RAY_ADDRESS")
    if address:
        # A submitted job already carries its runtime env (cluster/runtime_env.yaml); passing
        # another one here would be refused as a conflicting merge.
        ray.init(address=address, log_to_driver=True)
    else:
        ray.init(**local_init_kwargs(num_cpus, dashboard))
    _RAY_OWNED = ray.get_runtime_context().get_job_id()


def release_ray() -> None:
    """Disconnect from Ray if :func:`init_ray` connected, before the closing summary: worker
    output still in flight (Ray forwards it with a delay) would otherwise print after, and
    bury, the summary."""
    import ray  # heavy: not loaded for --help

    global _RAY_OWNED
    if (_RAY_OWNED and ray.is_initialized()
            and ray.get_runtime_context().get_job_id() == _RAY_OWNED):
        ray.shutdown()
    _RAY_OWNED = None


if __name__ == "__main__":  # cluster/local/up.sh: KEY=VALUE lines of one_host_env(CPUS)
    import sys

    for key, value in one_host_env(float(sys.argv[1])).items():
        print(f"{key}={value}")
