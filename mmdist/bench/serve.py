"""`mmdist bench serve`: the model on Ray Serve with request batching against without, side by
side in one run: requests/s and p50/p99 latency at 1, 8 and 32 concurrent HTTP clients.

Both applications (one replica each, the same CPUs) are deployed at once on a local Ray; for each
client count the rounds alternate which side goes first. The clients are asyncio tasks in this
process, sending one synthetic example (every modality the model takes) to ``POST /predict``.
On a small machine they share its cores with the replicas: compare the two sides, not the
absolute figures across machines.
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import json
import socket
import time
from pathlib import Path
from typing import Any

from mmdist import tracking
from mmdist.arguments import add_ray_arguments
from mmdist.errors import CommandError

SIDES = ("batched", "unbatched")


def configure_parser(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--model", default="models:/mmdist-demo@champion", metavar="URI_OR_DIR",
                        help="the model to serve (default: models:/mmdist-demo@champion, what "
                             "`make demo` registers)")
    parser.add_argument("--clients", default="1,8,32",
                        help="comma-separated numbers of concurrent clients (default: 1,8,32)")
    parser.add_argument("--requests", type=int, default=200,
                        help="requests per side, client count and round (default: 200)")
    parser.add_argument("--rounds", type=int, default=2,
                        help="rounds per client count, alternating which side goes first "
                             "(default: 2)")
    parser.add_argument("--max-batch-size", type=int, default=32,
                        help="batch size of the batched side (default: 32; the other side: 1)")
    parser.add_argument("--batch-wait-ms", type=float, default=5.0,
                        help="how long a batch waits for more requests, ms (default: 5)")
    parser.add_argument("--cpus-per-replica", type=float, default=1.0,
                        help="Ray CPUs per replica, each side one replica (default: 1)")
    add_ray_arguments(parser, address=False)
    parser.add_argument("--port", type=int, default=0,
                        help="HTTP port on 127.0.0.1 (default: 0, a free one)")
    parser.add_argument("--tracking-uri", default=None,
                        help="MLflow tracking URI (default: $MLFLOW_TRACKING_URI, else ./mlflow.db)")
    parser.add_argument("--cache", default=".cache/models",
                        help="where pulled model versions are kept (default: .cache/models)")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def example_body(modalities: list[str]) -> bytes:
    """One synthetic example (mmdist.data.synthetic), every modality the model takes."""
    from mmdist.data.synthetic import generate_sample

    s = generate_sample(0)
    fields = {"text": s.text, "image": base64.b64encode(s.image).decode(),
              "audio": base64.b64encode(s.audio).decode()}
    return json.dumps({k: v for k, v in fields.items() if k in modalities}).encode()


async def load(url: str, body: bytes, clients: int, requests: int) -> dict[str, Any]:
    """``requests`` POSTs of ``body`` from ``clients`` concurrent clients: latencies, wall time,
    and the responses that were not 200."""
    import aiohttp  # heavy: not loaded for --help

    latencies: list[float] = []
    errors: list[str] = []
    todo = iter(range(requests))
    headers = {"content-type": "application/json"}
    async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=clients)) as session:

        async def client() -> None:
            for _ in todo:
                t = time.perf_counter()
                async with session.post(url, data=body, headers=headers) as r:
                    text = await r.text()
                latencies.append(time.perf_counter() - t)
                if r.status != 200:
                    errors.append(f"{r.status} {text[:200]}")

        t0 = time.perf_counter()
        await asyncio.gather(*(client() for _ in range(clients)))
        wall = time.perf_counter() - t0
    return {"latencies": latencies, "wall_s": wall, "errors": errors}


def summarize(runs: list[dict[str, Any]]) -> dict[str, Any]:
    """Pooled over rounds: requests/s (all requests / all wall time), p50 and p99 latency."""
    import numpy as np  # heavy: not loaded for --help

    lat = np.array([x for r in runs for x in r["latencies"]]) * 1000
    wall = sum(r["wall_s"] for r in runs)
    return {"requests": int(lat.size), "requests_per_s": round(lat.size / wall, 2),
            "p50_ms": round(float(np.percentile(lat, 50)), 2),
            "p99_ms": round(float(np.percentile(lat, 99)), 2),
            "errors": sum(len(r["errors"]) for r in runs)}


def run(args: argparse.Namespace) -> dict[str, Any]:
    from ray import serve  # heavy: not loaded for --help

    from mmdist.ray_env import init_ray, release_ray
    from mmdist.serve.deploy import start

    try:
        counts = [int(x) for x in args.clients.split(",") if x.strip()]
    except ValueError:
        raise CommandError(f"--clients {args.clients!r}: expected numbers like 1,8,32") from None
    if not counts or min(counts) < 1 or args.requests < 1 or args.rounds < 1:
        raise CommandError("--clients, --requests and --rounds must be >= 1")
    port = args.port or free_port()
    model = args.model
    if not model.startswith(("models:/", "runs:/")):
        model = str(Path(model).resolve())  # replicas run in other folders
    common = {"model": model, "tracking_uri": args.tracking_uri or tracking.tracking_uri(),
              "cache": str(Path(args.cache).resolve()),
              "batch_wait_ms": args.batch_wait_ms, "poll_s": 0,
              "cpus": args.cpus_per_replica}
    init_ray(None, num_cpus=args.num_cpus)
    try:
        deployed = {}
        for side, size in zip(SIDES, (args.max_batch_size, 1)):
            deployed[side] = start({**common, "max_batch_size": size}, "127.0.0.1", port,
                                   f"bench-{side}", f"/{side}")
        info = deployed["batched"]
        print(f"serving {info['model_uri']} ({info['task']}, {'+'.join(info['modalities'])}) "
              f"on 127.0.0.1:{port}: batched (max {args.max_batch_size}) and unbatched, "
              f"one replica of {args.cpus_per_replica:g} CPU each")
        body = example_body(info["modalities"])
        results: dict[str, dict[int, dict[str, Any]]] = {s: {} for s in SIDES}
        for c in counts:
            runs: dict[str, list] = {s: [] for s in SIDES}
            for side in SIDES:  # warm-up: connections, first batches
                asyncio.run(load(deployed[side]["url"] + "/predict", body, c, 2 * c))
            for r in range(args.rounds):
                for side in (SIDES if r % 2 == 0 else SIDES[::-1]):
                    runs[side].append(asyncio.run(load(deployed[side]["url"] + "/predict",
                                                       body, c, args.requests)))
            for side in SIDES:
                results[side][c] = summarize(runs[side])
            b, u = results["batched"][c], results["unbatched"][c]
            print(f"{c:>3} clients  batched {b['requests_per_s']:8.1f} req/s  p50 "
                  f"{b['p50_ms']:7.1f} ms  p99 {b['p99_ms']:7.1f} ms | unbatched "
                  f"{u['requests_per_s']:8.1f} req/s  p50 {u['p50_ms']:7.1f} ms  p99 "
                  f"{u['p99_ms']:7.1f} ms | batched/unbatched "
                  f"{b['requests_per_s'] / u['requests_per_s']:.2f}x", flush=True)
    finally:
        serve.shutdown()
        release_ray()
    errors = sum(results[s][c]["errors"] for s in SIDES for c in counts)
    return {"ok": errors == 0, "model_uri": info["model_uri"], "task": info["task"],
            "modalities": info["modalities"], "max_batch_size": args.max_batch_size,
            "cpus_per_replica": args.cpus_per_replica, "rounds": args.rounds,
            "requests_per_round": args.requests, "errors": errors,
            "results": {s: {str(c): results[s][c] for c in counts} for s in SIDES},
            "speedup": {str(c): round(results["batched"][c]["requests_per_s"]
                                      / results["unbatched"][c]["requests_per_s"], 2)
                        for c in counts}}
