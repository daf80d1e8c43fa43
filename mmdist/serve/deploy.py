"""`mmdist serve`: the registered model on Ray Serve, an HTTP JSON API on 127.0.0.1:8000.

    mmdist serve models:/mmdist-demo@champion
    mmdist serve models:/mmdist-demo@champion --max-replicas 4 --use-gpu --port 9000
    mmdist serve models:/mmdist-demo@champion --address auto --detach --json

``POST /predict`` takes ``{"text": ..., "image": <base64>, "audio": <base64>, "video": <base64>}``
(any subset; or a list of them) and answers what ``mmdist predict --json`` prints, with the model version;
``GET /health``; ``POST /reload`` follows the alias now (replicas also look it up every
``--poll-s``). The command serves until Ctrl-C; ``--detach`` returns once the model answers and
leaves it running on the Ray cluster it joined.
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import time
import urllib.request
from pathlib import Path
from typing import Any

from mmdist import tracking
from mmdist.arguments import add_ray_arguments
from mmdist.errors import CommandError

APP_NAME = "mmdist"


def configure_parser(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("model", metavar="URI_OR_DIR",
                        help="models:/NAME@ALIAS (followed when the alias moves), "
                             "models:/NAME/VERSION or a model directory")
    parser.add_argument("--host", default="127.0.0.1",
                        help="address the HTTP server binds (default: 127.0.0.1, this machine "
                             "only)")
    parser.add_argument("--port", type=int, default=8000, help="HTTP port (default: 8000)")
    parser.add_argument("--replicas", type=int, default=1,
                        help="model replicas; the least when autoscaling (default: 1)")
    parser.add_argument("--max-replicas", type=int, default=None,
                        help="autoscale between --replicas and this many replicas on ongoing "
                             "requests (default: no autoscaling)")
    parser.add_argument("--target-ongoing-requests", type=float, default=None,
                        help="autoscaling target of ongoing requests per replica (default: "
                             "--max-batch-size)")
    parser.add_argument("--cpus-per-replica", type=float, default=1.0,
                        help="Ray CPUs reserved per replica (default: 1)")
    parser.add_argument("--use-gpu", action="store_true",
                        help="one GPU per replica, the model on cuda (default: CPU)")
    parser.add_argument("--max-batch-size", type=int, default=16,
                        help="rows per model call gathered from concurrent requests by "
                             "@serve.batch; 1 turns batching off (default: 16)")
    parser.add_argument("--batch-wait-ms", type=float, default=5.0,
                        help="how long a batch waits for more requests, ms (default: 5)")
    parser.add_argument("--poll-s", type=float, default=30.0,
                        help="seconds between look-ups of the alias; 0: only on POST /reload "
                             "(default: 30)")
    parser.add_argument("--max-request-bytes", type=int, default=16 * 2**20,
                        help="largest request body taken; larger ones get 413 (default: 16 MiB)")
    parser.add_argument("--max-rows", type=int, default=256,
                        help="most objects in one request (default: 256)")
    parser.add_argument("--app-name", default=APP_NAME,
                        help=f"Serve application name (default: {APP_NAME})")
    add_ray_arguments(parser)
    parser.add_argument("--detach", action="store_true",
                        help="return once the model answers and leave it serving on the Ray "
                             "cluster joined with --address (default: serve until Ctrl-C)")
    parser.add_argument("--tracking-uri", default=None,
                        help="MLflow tracking URI (default: $MLFLOW_TRACKING_URI, else the local "
                             "store ./mlflow.db)")
    parser.add_argument("--cache", default=".cache/models",
                        help="where pulled model versions are kept (default: .cache/models)")


def settings_from_args(args: argparse.Namespace) -> dict[str, Any]:
    """`mmdist serve` flags -> :func:`mmdist.serve.deployment.build_app` arguments."""
    model = args.model
    if not model.startswith(("models:/", "runs:/")):
        if not (Path(model) / "config.json").exists():
            raise CommandError(f"{model}: not a model directory (no config.json) and not a "
                               "models:/ or runs:/ URI")
        model = str(Path(model).resolve())  # replicas run in other folders
    return {"model": model, "tracking_uri": args.tracking_uri or tracking.tracking_uri(),
            "cache": str(Path(args.cache).resolve()),
            "device": "cuda" if args.use_gpu else "cpu",
            "max_batch_size": args.max_batch_size, "batch_wait_ms": args.batch_wait_ms,
            "poll_s": args.poll_s, "max_request_bytes": args.max_request_bytes,
            "max_rows": args.max_rows, "replicas": args.replicas,
            "max_replicas": args.max_replicas,
            "target_ongoing_requests": args.target_ongoing_requests,
            "cpus": args.cpus_per_replica, "gpus": 1.0 if args.use_gpu else 0.0}


def problems(args: argparse.Namespace) -> list[str]:
    out = []
    if not 0 < args.port < 65536:
        out.append(f"--port={args.port}: must be 1-65535")
    if args.replicas < 1:
        out.append(f"--replicas={args.replicas}: must be >= 1")
    if args.max_replicas is not None and args.max_replicas < args.replicas:
        out.append(f"--max-replicas={args.max_replicas}: must be >= --replicas={args.replicas}")
    if args.cpus_per_replica < 0:
        out.append(f"--cpus-per-replica={args.cpus_per_replica}: must be >= 0")
    return out


def check_model(model: str, tracking_uri: str) -> None:
    """Refuse, before any replica starts, a registered model or alias that does not exist."""
    from mmdist.serve.deployment import resolve

    if model.startswith("models:/"):
        try:
            resolve(model, tracking_uri)
        except Exception as e:  # MlflowException: no such model, alias or version
            raise CommandError(f"{model}: not found in {tracking_uri} "
                               f"({getattr(e, 'message', e)})") from None


def check_port_free(host: str, port: int) -> None:
    with socket.socket() as s:
        try:
            s.bind((host, port))
        except OSError as e:
            raise CommandError(f"--host {host} --port {port}: cannot listen there "
                               f"({e.strerror}); pick another --port") from None


def get_json(url: str, timeout: float = 10.0) -> dict[str, Any]:
    with urllib.request.urlopen(url, timeout=timeout) as r:  # noqa: S310 (our own server)
        return json.loads(r.read())


def start(settings: dict[str, Any], host: str = "127.0.0.1", port: int = 8000,
          app_name: str = APP_NAME, route_prefix: str = "/") -> dict[str, Any]:
    """Deploy the model on the Ray this process is connected to; returns once it answers
    ``GET /health``: ``url``, ``model_uri``, ``model_version``, ``app_name``."""
    from ray import serve  # heavy: not loaded for --help

    from mmdist.serve.deployment import build_app

    try:
        app = build_app(settings)
    except ValueError as e:
        raise CommandError(str(e)) from None
    serve.start(http_options={"host": host, "port": port})
    t = time.perf_counter()
    serve.run(app, name=app_name, route_prefix=route_prefix)
    base = f"http://{'127.0.0.1' if host in ('0.0.0.0', '::') else host}:{port}"
    url = base + route_prefix.rstrip("/")
    health = get_json(url + "/health")
    return {"ok": True, "url": url, "app_name": app_name, "deploy_seconds":
            round(time.perf_counter() - t, 1), **{k: health[k] for k in (
                "model_uri", "model_version", "model_source", "task", "modalities")}}


def run(args: argparse.Namespace) -> dict[str, Any]:
    from ray import serve  # heavy: not loaded for --help

    from mmdist.ray_env import init_ray, release_ray

    bad = problems(args)
    if args.detach and not (args.address or os.environ.get("RAY_ADDRESS")):
        bad.append("--detach: needs a Ray cluster that outlives this command (--address or "
                   "$RAY_ADDRESS; start one with `ray start --head`)")
    if bad:
        raise CommandError("; ".join(bad))
    settings = settings_from_args(args)
    check_model(settings["model"], settings["tracking_uri"])
    if not (args.address or os.environ.get("RAY_ADDRESS")):
        check_port_free(args.host, args.port)
    init_ray(args.address, num_cpus=args.num_cpus)
    try:
        out = start(settings, args.host, args.port, args.app_name)
    except RuntimeError as e:  # a replica that cannot load the model
        release_ray()
        raise CommandError(f"{args.model}: the deployment did not start: {e}") from None
    print(f"[mmdist] serving {out['model_uri']} ({args.model}) at {out['url']}: "
          f"POST /predict, GET /health, POST /reload", flush=True)
    if args.detach:
        return {**out, "detached": True}
    print("[mmdist] Ctrl-C to stop", flush=True)
    try:
        while True:
            time.sleep(3600)
    except KeyboardInterrupt:
        serve.delete(args.app_name)
        release_ray()
    return {**out, "detached": False, "stopped": True}
