"""`mmdist preflight`: check that a cluster can run a config, before `ray job submit`.

    mmdist preflight --config demo --address 127.0.0.1:6379 train.num_workers=8 train.use_gpu=true

Checks, each printed as one OK/FAIL line:

- resources: the cluster (or, with no cluster, this machine) has the CPUs and GPUs the Ray Train
  workers ask for, ``data.cpus_per_task`` left for a Ray Data read task, and a node big enough
  for one worker;
- storage: the checkpoint folder (``train.storage_path``, else ``./runs``) is writable from a
  Ray worker (a tiny task writes and deletes a file there);
- mlflow: the tracking server answers ``/health`` (and accepts the credentials, if any), or a
  sqlite/file store's folder is writable;
- data: ``data.path/manifest.json`` is readable and parses (read from a worker), its splits
  are large enough for one step and its labels fit ``model.num_classes``, or synthetic data
  will be generated;
- deepspeed: the DeepSpeed config is valid for the world size.

Every problem is collected; the command fails once, with one line per problem.

`mmdist train` runs the same resource and data-size rules (:func:`require_startable`) once Ray
is up, so a run that could never start fails at once instead of waiting for workers forever.
"""

from __future__ import annotations

import argparse
import base64
import json
import os
import socket
import sys
import urllib.error
import urllib.request
import uuid
from dataclasses import asdict
from pathlib import Path
from typing import Any

import pyarrow.fs as pafs

from mmdist.arguments import add_config_arguments
from mmdist.config import Config, load_config
from mmdist.errors import CommandError
from mmdist.tracking import tracking_uri
from mmdist.train.deepspeed_config import deepspeed_config, precision_problem
from mmdist.train.startable import (
    Check,
    check_resources,
    cluster_resources,
    data_size_problems,
    label_problems,
    local_resources,
)


def configure_parser(parser: argparse.ArgumentParser) -> None:
    add_config_arguments(parser)
    parser.add_argument(
        "--address", default=None,
        help="GCS address (host:port) of the Ray cluster to check (default: "
             "$MMDIST_RAY_GCS_ADDRESS, then $RAY_ADDRESS; with neither, this machine is checked "
             "and no Ray is started)")
    parser.add_argument("--sweep", action="store_true",
                        help="check for a sweep: tune.max_concurrent_trials trials at once")
    parser.add_argument("--timeout", type=float, default=60.0,
                        help="seconds to wait for the checks that run on a worker (default: 60)")


def run(args: argparse.Namespace) -> dict[str, Any]:
    cfg = load_config(args.config, args.overrides)
    checks = preflight(cfg, address=resolve_address(args.address), sweep=args.sweep,
                       timeout=args.timeout)
    for c in checks:
        print(f"{'OK' if c.ok else 'FAIL':<5} {c.name:<10} {c.detail}", flush=True)
    problems = [f"{c.name}: {c.detail}" for c in checks if not c.ok]
    summary = {"ok": not problems, "checks": [asdict(c) for c in checks]}
    if problems:
        message = (f"preflight found {len(problems)} problem(s):\n"
                   + "\n".join(f"  - {p}" for p in problems))
        if getattr(args, "json", False):  # keep the per-check summary on the JSON line
            print(f"error: {message}", flush=True)
            return {**summary, "error": message}
        raise CommandError(message)
    print(f"preflight: all {len(checks)} checks passed", flush=True)
    return summary


def resolve_address(address: str | None) -> str | None:
    """--address, else $MMDIST_RAY_GCS_ADDRESS, else $RAY_ADDRESS; None: no cluster."""
    return (address or os.environ.get("MMDIST_RAY_GCS_ADDRESS")
            or os.environ.get("RAY_ADDRESS") or None)


def preflight(cfg: Config, address: str | None = None, sweep: bool = False,
              timeout: float = 60.0) -> list[Check]:
    """Run every check and return them all (failed ones included); never raises for a problem.

    With ``address`` it connects to that cluster (and disconnects after). Without it, an
    already connected Ray (``ray.is_initialized()``) is checked; else this machine, starting
    nothing.
    """
    checks: list[Check] = []
    ray_mod, connected_here, on_cluster = None, False, bool(address)
    if address and address.startswith(("http://", "https://")):
        checks.append(Check("cluster", False,
                            f"{address} is a dashboard URL; preflight connects to the Ray GCS: "
                            "pass --address HOST:PORT (the head's --port, 6379 by default)"))
        address = None
    elif address:
        try:
            import ray  # heavy: not loaded for --help

            if not ray.is_initialized():
                ray.init(address=address, log_to_driver=False, logging_level="WARNING")
                connected_here = True
            ray_mod = ray
        except Exception as e:  # noqa: BLE001 - any failure to connect is the finding
            checks.append(Check("cluster", False, f"cannot connect to Ray at {address}: "
                                f"{type(e).__name__}: {str(e).splitlines()[0][:300]}"))
    else:
        if "ray" in sys.modules and sys.modules["ray"].is_initialized():
            ray_mod = sys.modules["ray"]
    try:
        if ray_mod is not None:
            checks.append(check_resources(cfg, *cluster_resources(ray_mod), sweep=sweep))
        elif not checks:  # no cluster asked for: this machine
            checks.append(check_resources(cfg, *local_resources(cfg), sweep=sweep,
                                          where="this machine (no Ray cluster given)"))
        checks.append(check_storage(cfg, ray_mod, on_cluster, timeout))
        checks.append(check_mlflow(cfg, on_cluster))
        checks.append(check_data(cfg, ray_mod, on_cluster, timeout))
        checks.append(check_deepspeed(cfg, on_cluster))
    finally:
        if connected_here:
            ray_mod.shutdown()
    return checks


# ---- storage and data, checked from a worker ---------------------------------------------------


def _probe_write(folder: str) -> str:
    """Create ``folder``, write and delete a file in it; return where (runs on a worker)."""
    name = f".mmdist-preflight-{uuid.uuid4().hex[:8]}"
    if "://" in folder:
        fs, root = pafs.FileSystem.from_uri(folder)
        fs.create_dir(root, recursive=True)
        path = f"{root.rstrip('/')}/{name}"
        with fs.open_output_stream(path) as f:
            f.write(b"ok")
        fs.delete_file(path)
    else:
        Path(folder).mkdir(parents=True, exist_ok=True)
        path = Path(folder) / name
        path.write_bytes(b"ok")
        path.unlink()
    return socket.gethostname()


def _probe_manifest(path: str) -> dict[str, Any]:
    """Read and parse a manifest.json (runs on a worker)."""
    if "://" in path:
        fs, p = pafs.FileSystem.from_uri(path)
        with fs.open_input_stream(p) as f:
            return json.loads(f.read())
    return json.loads(Path(path).read_text())


def _on_worker(ray, fn, arg: str, timeout: float):
    """Run ``fn(arg)`` in a zero-CPU Ray task; exceptions come back as the task's cause."""
    task = ray.remote(num_cpus=0, max_retries=0)(fn)
    ref = task.remote(arg)
    try:
        return ray.get(ref, timeout=timeout)
    except ray.exceptions.RayTaskError as e:
        raise e.cause if e.cause is not None else e from None
    except ray.exceptions.GetTimeoutError:
        ray.cancel(ref, force=True)
        raise TimeoutError(f"no worker ran the check within {timeout:g} s") from None


def _is_remote_uri(path: str) -> bool:
    return "://" in path and not path.startswith("file://")


def check_storage(cfg: Config, ray=None, on_cluster: bool = False,
                  timeout: float = 60.0) -> Check:
    """The checkpoint folder is writable from a worker (from here when there is no cluster)."""
    raw = cfg.train.storage_path
    if on_cluster and (raw is None or not (_is_remote_uri(raw) or os.path.isabs(raw))):
        shown = "not set (./runs)" if raw is None else f"{raw!r} (relative)"
        return Check("storage", False,
                     f"train.storage_path is {shown}: a submitted job runs in a temporary copy "
                     "of the project, so checkpoints would be lost; set "
                     "train.storage_path=/an/absolute/shared/path (or s3://...)")
    folder = raw or "runs"
    if not _is_remote_uri(folder):
        folder = str(Path(folder.removeprefix("file://")).resolve())
    try:
        if ray is not None:
            host = _on_worker(ray, _probe_write, folder, timeout)
            where = f"from a Ray worker on {host}"
        else:
            _probe_write(folder)
            where = "from this machine"
    except Exception as e:  # noqa: BLE001 - the failure is the finding
        return Check("storage", False, f"train.storage_path={folder}: cannot write there: "
                     f"{type(e).__name__}: {e}")
    return Check("storage", True, f"{folder} is writable {where}")


def check_data(cfg: Config, ray=None, on_cluster: bool = False, timeout: float = 60.0) -> Check:
    """data.path/manifest.json is readable and parses (from a worker), or data is synthetic."""
    if not cfg.data.path:
        return Check("data", True, f"data.path not set: synthetic, will be generated "
                     f"({cfg.data.synthetic_samples} samples)")
    path = cfg.data.path
    if on_cluster and not (_is_remote_uri(path) or os.path.isabs(path)):
        return Check("data", False, f"data.path={path!r} is relative: a submitted job runs in a "
                     "temporary copy of the project; use an absolute shared path or a URI")
    manifest = f"{path.rstrip('/')}/manifest.json"
    if not _is_remote_uri(manifest):
        manifest = str(Path(manifest.removeprefix("file://")).resolve())
    try:
        m = (_on_worker(ray, _probe_manifest, manifest, timeout) if ray is not None
             else _probe_manifest(manifest))
    except FileNotFoundError:
        return Check("data", False, f"data.path={path}: {manifest} not found (write the shards "
                     "with `mmdist prepare`)")
    except json.JSONDecodeError as e:
        return Check("data", False, f"data.path={path}: {manifest} is not valid JSON: {e}")
    except Exception as e:  # noqa: BLE001
        return Check("data", False, f"data.path={path}: cannot read {manifest}: "
                     f"{type(e).__name__}: {e}")
    if not isinstance(m, dict):
        return Check("data", False, f"data.path={path}: {manifest} is not a JSON object")
    counts = m.get("counts") or {}
    problems = (data_size_problems(cfg, counts, f"data.path={path}") if counts else []) \
        + label_problems(cfg, m.get("labels"), f"data.path={path}")
    if problems:
        return Check("data", False, "; ".join(problems))
    rows = ", ".join(f"{k}={v}" for k, v in sorted(counts.items()) if k.endswith("rows"))
    return Check("data", True, f"{manifest} parses" + (f" ({rows})" if rows else ""))


# ---- MLflow ---------------------------------------------------------------------------------------


def check_mlflow(cfg: Config, on_cluster: bool = False) -> Check:
    """A tracking server answers /health (and takes the credentials); a local store is writable."""
    if on_cluster and not (cfg.tracking.tracking_uri or os.environ.get("MLFLOW_TRACKING_URI")):
        return Check("mlflow", False,
                     "no tracking URI (tracking.tracking_uri or $MLFLOW_TRACKING_URI): a "
                     "submitted job would write runs to a sqlite file in its temporary copy of "
                     "the project; start the tracking server (make cluster-up) or set one")
    uri = tracking_uri(cfg)
    if uri.startswith(("http://", "https://")):
        base = uri.rstrip("/")
        try:
            with urllib.request.urlopen(f"{base}/health", timeout=10) as r:
                status = r.status
        except (urllib.error.URLError, OSError) as e:
            return Check("mlflow", False, f"tracking server {uri} is not reachable: "
                         f"{getattr(e, 'reason', e)}")
        if status != 200:
            return Check("mlflow", False, f"tracking server {uri}/health answered {status}")
        user = os.environ.get("MLFLOW_TRACKING_USERNAME")
        if user:  # basic auth: check the credentials too, not only that the server is up
            pw = os.environ.get("MLFLOW_TRACKING_PASSWORD", "")
            req = urllib.request.Request(
                f"{base}/api/2.0/mlflow/experiments/search?max_results=1",
                headers={"Authorization": "Basic "
                         + base64.b64encode(f"{user}:{pw}".encode()).decode()})
            try:
                urllib.request.urlopen(req, timeout=10).close()
            except urllib.error.HTTPError as e:
                return Check("mlflow", False, f"tracking server {uri} refused user {user!r} "
                             f"(HTTP {e.code}): check MLFLOW_TRACKING_PASSWORD")
            except (urllib.error.URLError, OSError) as e:
                return Check("mlflow", False, f"tracking server {uri}: {e}")
            return Check("mlflow", True, f"tracking server {uri} is healthy; user {user!r} "
                         "accepted")
        return Check("mlflow", True, f"tracking server {uri} is healthy")
    if uri.startswith(("sqlite:///", "file://")) or "://" not in uri:
        path = Path(uri.removeprefix("sqlite:///").removeprefix("file://"))
        folder = path.parent if uri.startswith("sqlite:///") else path
        probe = folder
        while not probe.exists() and probe != probe.parent:
            probe = probe.parent  # the folder is created on first use: its parent must be writable
        if not os.access(probe, os.W_OK):
            return Check("mlflow", False, f"tracking store {uri}: {probe} is not writable")
        return Check("mlflow", True, f"local tracking store {uri} (folder {probe} is writable)")
    return Check("mlflow", True, f"tracking URI {uri}: scheme not checked by preflight")


# ---- DeepSpeed -----------------------------------------------------------------------------------


def check_deepspeed(cfg: Config, on_cluster: bool = False) -> Check:
    """The generated DeepSpeed config is valid for world size train.num_workers, and (for this
    machine) its precision can run here."""
    world = cfg.train.num_workers
    try:
        ds = deepspeed_config(cfg, world)
    except ValueError as e:
        return Check("deepspeed", False, str(e))
    problem = None if on_cluster else precision_problem(cfg)
    if problem:
        return Check("deepspeed", False, problem)
    return Check("deepspeed", True,
                 f"world size {world}: ZeRO-{ds['zero_optimization']['stage']}, "
                 f"train_batch_size={ds['train_batch_size']} = micro batch "
                 f"{ds['train_micro_batch_size_per_gpu']} x {world} x accumulation "
                 f"{ds['gradient_accumulation_steps']}")
