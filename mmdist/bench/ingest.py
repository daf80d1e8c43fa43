"""`mmdist bench ingest`: the Ray Data pipeline vs a torch DataLoader over the same shards.

Both sides run the same :func:`mmdist.data.preprocess.preprocess_batch` on the same shard
files with the same batch size and the same number of CPU workers, in one run:

* DataLoader: ``DataLoader(ShardBatches(...), batch_size=None, num_workers=workers)``; each worker
  reads whole shard files and yields preprocessed batches. It runs first, before Ray starts,
  so Ray's own processes cannot slow it down.
* Ray Data: the local Ray ``mmdist train`` starts (``ray_env.local_init_kwargs``, ``num_cpus=
  cpus``, dashboard on), then the training pipeline of
  :func:`mmdist.data.pipeline.build_dataset` consumed as training consumes it
  (``torch_batches.iter_torch``).

Throughput is measured two ways: from the first batch to the last (start-up reported
separately) and over the whole epoch (``iter()`` to the last batch, each side's per-epoch
start included). The breakdown says where the Ray side spends its time: the cost of the
preprocessing itself (measured in one process), the ideal rate on ``cpus`` cores, the operator
times from Ray Data's stats, the share of ``cpus`` x time its tasks were running, the CPU of
its workers vs the driver vs Ray's daemons, and the time the consumer spent waiting.

Without ``--data`` it writes realistic shards once into ``.cache/bench_ingest/``: 224-pixel
JPEGs, 2-5 s of 22.05 kHz audio, sentence captions (:mod:`mmdist.bench.realistic_shards`).

The Ray side runs the training pipeline unchanged, with the settings that bring it to the
DataLoader's rate on a small node: where each lives and why is documented there
(:mod:`mmdist.data.pipeline`, :mod:`mmdist.data.ray_scheduling`,
:mod:`mmdist.data.torch_batches`, :mod:`mmdist.data.preprocess`); what each was measured to
change is in ``docs/performance.md``. Before timing, the bench warms up: the first execution
starts Ray Data's stats and autoscaling-coordinator actors, whose imports cost seconds of CPU
once per job, and the warm-up waits until the coordinator answers (cold start is reported
separately).

``--workers N`` runs N worker processes on each side on the same ``--cpus``: N DataLoader
workers, and N Ray Data tasks in flight (each reserving cpus/N CPUs, as training's
``data.cpus_per_task=0.5`` does with 2 per CPU). More processes than cores hide Ray's gap
between tasks but delay the first batch (every task runs at a fraction of a core). Ray keeps
only about num_cpus idle workers by default and restarts the rest (each restart imports
again), so the bench raises ``RAY_num_workers_soft_limit`` as every local Ray mmdist starts.

On a shared machine wall-clock rates swing with other tenants (and a side with more runnable
processes gets a larger share), so the bench also reports CPU milliseconds per sample summed
over every process of each side (:mod:`mmdist.bench.cpu_meter`): the cost a dedicated box would
pay.
"""

from __future__ import annotations

import argparse
import os
import time
import warnings
from pathlib import Path
from typing import Any

from threadpoolctl import threadpool_limits

from mmdist.bench.cpu_meter import CpuMeter
from mmdist.bench.ray_breakdown import ray_breakdown
from mmdist.bench.realistic_shards import realistic_shards, video_shards
from mmdist.config import load_config
from mmdist.data.preprocess import PreprocessSpec, preprocess_batch, reuse_freed_memory
from mmdist.data.shards import shard_paths, verify_manifest
from mmdist.errors import CommandError
from mmdist.ray_env import local_init_kwargs

# Ray and torch (and the mmdist modules that import them) are imported inside the functions
# that use them: `mmdist bench --help` imports this module to build its parser.

IDLE_S = 3.0  # seconds of idle Ray measured before each timed epoch


def configure_parser(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--data", metavar="DIR", default=None,
                        help="shard directory to read (default: generate realistic shards)")
    parser.add_argument("--split", default="train", choices=("train", "val"),
                        help="which split of --data to read (default: train)")
    parser.add_argument("--batch-size", type=int, default=32, help="rows per batch (default: 32)")
    parser.add_argument("--num-batches", type=int, default=0,
                        help="batches to time on each side after the first (default: all)")
    parser.add_argument("--cpus", type=int, default=2,
                        help="CPU workers on each side: DataLoader workers and Ray's num_cpus "
                             "(default: 2)")
    parser.add_argument("--workers", type=int, default=None,
                        help="worker processes on each side: DataLoader num_workers, and Ray "
                             "Data tasks in flight (each reserves --cpus/--workers CPUs) "
                             "(default: --cpus)")
    parser.add_argument("--rows", type=int, default=4096,
                        help="rows of the generated realistic shards (default: 4096)")
    parser.add_argument("--shard-rows", type=int, default=256,
                        help="rows per generated shard (default: 256; `mmdist prepare` writes "
                             "1000, and 64-row shards measure mostly Ray's per-task overhead)")
    parser.add_argument("--map-batch-size", type=int, default=None,
                        help="rows per preprocess call inside Ray Data (default: --batch-size, "
                             "the DataLoader's batch, so both sides make the same calls)")
    parser.add_argument("--config", default="demo", metavar="PRESET_OR_YAML",
                        help="config whose data.* sizes drive preprocessing (default: demo)")
    parser.add_argument("--repeat", type=int, default=1,
                        help="alternate DataLoader and Ray Data rounds this often and report "
                             "the median of each (default: 1)")
    parser.add_argument("--video", action="store_true",
                        help="video rows: data.video_frames frames each, decoded from the "
                             "shards' frame strips as training does (without --data: the "
                             "synthetic video source); rates also in frames/s")
    parser.add_argument("--skip-dataloader", action="store_true",
                        help="measure only the Ray Data side (for tuning)")


def run(args: argparse.Namespace) -> dict[str, Any]:
    cfg = load_config(args.config)
    if args.batch_size < 1 or args.cpus < 1:
        raise CommandError(f"--batch-size={args.batch_size} and --cpus={args.cpus} must be >= 1")
    video = bool(getattr(args, "video", False))
    make = video_shards if video else realistic_shards
    # absolute: Ray's tasks do not run in this process's working folder
    data_dir = (Path(args.data) if args.data else make(args.rows, args.shard_rows, cfg)).resolve()
    manifest = verify_manifest(data_dir)
    paths = shard_paths(data_dir, manifest, args.split)
    if not paths:
        raise CommandError(f"{data_dir}: no {args.split} shards")
    spec = PreprocessSpec.from_config(cfg.data, augment=False, video=video)
    k = spec.video_frames
    rows = sum(s["rows"] for s in manifest["shards"] if s["split"] == args.split)
    limit = args.num_batches or None
    workers = args.workers or args.cpus
    if workers < 1:
        raise CommandError(f"--workers={workers} must be >= 1")
    print(f"bench ingest: {rows} rows in {len(paths)} shard(s) of {data_dir}, batch "
          f"{args.batch_size}, {args.cpus} CPU(s), {workers} worker process(es) a side; images -> "
          f"{spec.image_size}px uint8, audio -> {spec.n_mels}x{spec.frames} log-mel"
          + (f", video -> {k} frames" if video else ""))

    load_before = os.getloadavg()[0]
    fn_cost = preprocess_cost(paths[0], spec, data_dir, args.batch_size)
    dls, rays = [], []
    for _ in range(max(1, args.repeat)):
        # The DataLoader runs while Ray is down, so Ray's processes never slow the baseline.
        if not args.skip_dataloader:
            dls.append(time_dataloader(data_dir, args.split, spec, args.batch_size, workers,
                                       limit))
        # Same preprocess_batch calls on both sides: Ray's map chunks = the DataLoader batch.
        rays.append(time_ray_data(paths, spec, data_dir, args.batch_size, args.cpus, limit,
                                  args.map_batch_size or args.batch_size, workers))
    dl = _median(dls) if dls else None
    ray_res = _median(rays)
    # epoch rates: their own medians over the rounds
    dl_epoch = _median(dls, "epoch_samples_per_s")["epoch_samples_per_s"] if dls else None
    ray_epoch = _median(rays, "epoch_samples_per_s")["epoch_samples_per_s"]
    load_after = os.getloadavg()[0]
    paired = [round(r["epoch_samples_per_s"] / d["epoch_samples_per_s"], 3)
              for d, r in zip(dls, rays)]
    if len(rays) > 1:
        for key in ("samples_per_s", "epoch_samples_per_s"):
            print(f"  rounds ({key}): DataLoader {[round(r[key]) for r in dls]}, Ray Data "
                  f"{[round(r[key]) for r in rays]}")

    ideal = args.cpus / fn_cost
    summary = {
        "ray_data_samples_per_s": round(ray_res["samples_per_s"], 1),
        "dataloader_samples_per_s": round(dl["samples_per_s"], 1) if dl else None,
        "ratio": round(ray_res["samples_per_s"] / dl["samples_per_s"], 3) if dl else None,
        "ray_data_epoch_samples_per_s": round(ray_epoch, 1),
        "dataloader_epoch_samples_per_s": round(dl_epoch, 1) if dl else None,
        "epoch_ratio": round(ray_epoch / dl_epoch, 3) if dl else None,
        # each round's Ray epoch over the DataLoader epoch just before it: the machine's slow
        # swings (other tenants) hit both halves of a pair alike, unlike separate medians
        "epoch_ratio_by_round": paired,
        "epoch_ratio_paired_median": _median_of(paired),
        "rows": rows, "batch_size": args.batch_size, "cpus": args.cpus, "workers": workers,
        "data": str(data_dir),
        "preprocess_ms_per_sample": round(fn_cost * 1e3, 3),
        "ideal_samples_per_s": round(ideal, 1),
        "ray_data_startup_s": round(ray_res["startup_s"], 2),
        "ray_data_warmup_s": round(ray_res["warmup_s"], 2),
        "dataloader_startup_s": round(dl["startup_s"], 2) if dl else None,
        "ray_data_breakdown": ray_res["breakdown"],
        "ray_data_cpu_s": ray_res["cpu_s"],
        "ray_data_idle_cpu_s_per_s": ray_res["idle_cpu_s_per_s"],
        "dataloader_cpu_s": dl["cpu_s"] if dl else None,
        "ray_data_cpu_ms_per_sample": _cpu_ms_per_sample(ray_res),
        "dataloader_cpu_ms_per_sample": _cpu_ms_per_sample(dl) if dl else None,
        "loadavg_1m_before": round(load_before, 2),
        "loadavg_1m_after": round(load_after, 2),
        "video_frames": k,  # frames per sample; frames/s = samples/s x video_frames
        "ray_data_frames_per_s": round(ray_epoch * k, 1) if k else None,
        "dataloader_frames_per_s": round(dl_epoch * k, 1) if k and dl else None,
    }
    print(f"  preprocess_batch alone: {fn_cost * 1e3:.2f} ms/sample in one process -> ideal "
          f"{ideal:.0f} samples/s on {args.cpus} CPU(s)")
    if dl:
        print(f"  DataLoader ({workers} workers): {dl['samples_per_s']:.0f} samples/s from the "
              f"first batch (after {dl['startup_s']:.1f} s), {dl_epoch:.0f} over the epoch")
    print(f"  Ray Data (num_cpus={args.cpus}, {workers} tasks in flight): "
          f"{ray_res['samples_per_s']:.0f} samples/s from the first batch (after "
          f"{ray_res['startup_s']:.1f} s), {ray_epoch:.0f} over the epoch; "
          f"{ray_res['warmup_s']:.1f} s warm-up before")
    if k:
        print(f"  video frames/s over the epoch ({k} a sample): DataLoader "
              f"{summary['dataloader_frames_per_s']}, Ray Data {summary['ray_data_frames_per_s']}")
    print(f"  CPU ms per sample (all processes, iter() to the last batch): DataLoader "
          f"{summary['dataloader_cpu_ms_per_sample']}, Ray Data "
          f"{summary['ray_data_cpu_ms_per_sample']}; load average before/after: "
          f"{load_before:.1f}/{load_after:.1f}")
    if dl:
        print(f"    DataLoader CPU s by process: {dl['cpu_s']}")
    print(f"    Ray Data CPU s by process:   {ray_res['cpu_s']}")
    idle = ray_res["idle_cpu_s_per_s"]
    print(f"    the same Ray idle, CPU s per s: {round(sum(idle.values()), 3)} {idle} (over the "
          f"epoch: {ray_res['breakdown']['cpu_idle_background_s']} CPU-s of background)")
    if dl:
        print(f"  ratio Ray Data / DataLoader: {summary['ratio']:.2f}x from the first batch, "
              f"{summary['epoch_ratio']:.2f}x over the epoch")
        if len(paired) > 1:
            print(f"  over the epoch, round by round: {paired}, median "
                  f"{summary['epoch_ratio_paired_median']:.2f}x")
    print("  where the Ray Data side spends its time:")
    for k, v in ray_res["breakdown"].items():
        print(f"    {k}: {v}")
    return summary


# ---- the two sides ------------------------------------------------------------------------------


def preprocess_cost(path: str, spec: Any, data_dir: Path, batch_size: int) -> float:
    """Seconds per sample of ``preprocess_batch`` in this process (after one warm-up batch)."""
    from mmdist.data.shard_batches import shard_tables  # torch: not --help
    from mmdist.data.shards import load_tokenizer

    reuse_freed_memory()  # as in the workers of both sides
    tok = load_tokenizer(data_dir)
    batches = list(shard_tables([path], batch_size))
    with threadpool_limits(1):  # one BLAS thread, like every worker
        preprocess_batch(batches[0], spec, tok)
        t0 = time.perf_counter()
        n = 0
        for b in batches:
            preprocess_batch(b, spec, tok)
            n += len(b["sample_id"])
    return (time.perf_counter() - t0) / max(n, 1)


def _cpu_ms_per_sample(res: dict[str, Any]) -> float:
    # the meter runs from iter() to the last batch, so divide by every row delivered
    return round(sum(res["cpu_s"].values()) / max(res["epoch_samples"], 1) * 1e3, 3)


def _median(results: list[dict[str, Any]], key: str = "samples_per_s") -> dict[str, Any]:
    return sorted(results, key=lambda r: r[key])[len(results) // 2]


def _median_of(values: list[float]) -> float | None:
    if not values:
        return None
    v = sorted(values)
    mid = len(v) // 2
    return round(v[mid] if len(v) % 2 else (v[mid - 1] + v[mid]) / 2, 3)


def _consume(it, limit: int | None) -> dict[str, float]:
    """Drain ``it``. ``samples_per_s`` counts from the first batch on (steady state, start-up
    excluded); ``epoch_samples_per_s`` counts every row from ``iter()`` to the last batch.

    The first is slightly kind to whichever side hands over more finished rows at once when the
    first batch arrives (a Ray task returns its whole shard as one block; a DataLoader worker one
    32-row batch), the second charges each side its per-epoch start (forking workers, starting
    an execution); with short runs report both.
    """
    t_start = time.perf_counter()
    first = next(it)
    t_first = time.perf_counter()
    first_rows = len(first["sample_id"])
    n, batches, wait = 0, 0, 0.0
    del first
    while limit is None or batches < limit:
        t = time.perf_counter()
        try:
            b = next(it)
        except StopIteration:
            break
        wait += time.perf_counter() - t
        n += len(b["sample_id"])
        batches += 1
    t_end = time.perf_counter()
    elapsed = t_end - t_first
    return {"samples_per_s": n / max(elapsed, 1e-9), "startup_s": t_first - t_start,
            "elapsed_s": elapsed, "wait_s": wait, "samples": n,
            "epoch_samples": n + first_rows,
            "epoch_samples_per_s": (n + first_rows) / max(t_end - t_start, 1e-9)}


def time_dataloader(data_dir: Path, split: str, spec: Any, batch_size: int, cpus: int,
                    limit: int | None) -> dict[str, float]:
    from mmdist.data.shard_batches import shard_dataloader  # torch: not --help

    with warnings.catch_warnings():
        # --workers above the core count is the point of that layout, not a mistake to warn of
        warnings.filterwarnings("ignore", message="This DataLoader will create")
        dl = shard_dataloader(data_dir, split, batch_size, num_workers=cpus, spec=spec,
                              verify=False)
        with CpuMeter() as cpu:
            res = _consume(iter(dl), limit)
    res["cpu_s"] = cpu.by_kind()
    return res


def time_ray_data(paths: list[str], spec: Any, data_dir: Path, batch_size: int, cpus: int,
                  limit: int | None, map_batch_size: int | None,
                  workers: int | None = None) -> dict[str, Any]:
    # heavy (Ray/torch): `mmdist --help` imports this module to build its parser
    import ray

    from mmdist.data import ray_scheduling
    from mmdist.data.pipeline import MAP_BATCH_SIZE, build_dataset
    from mmdist.data.shards import load_tokenizer
    from mmdist.data.torch_batches import iter_torch

    started = not ray.is_initialized()
    if started:
        # The Ray `mmdist train` starts (dashboard included, see train.run.init_ray): its
        # processes' background CPU is part of what a training job pays for its data.
        ray.init(**local_init_kwargs(cpus, dashboard=True), log_to_driver=False,
                 configure_logging=False)
    try:
        ray.data.DataContext.get_current().enable_progress_bars = False
        tok = load_tokenizer(data_dir)
        mbs = map_batch_size or MAP_BATCH_SIZE
        # Warm-up, not timed: the first execution starts Ray Data's stats and autoscaling
        # actors and worker processes that import ray.data, numpy, PIL (seconds of CPU each
        # on 2 cores, once per job). DataLoader workers are forks that already hold them.
        # Two tasks per CPU so every worker runs one; then wait until the autoscaling
        # coordinator answers (until it does, executions see zero CPUs and run one task).
        t0 = time.perf_counter()
        ray.data.range(8, override_num_blocks=2).map_batches(lambda b: b).materialize()
        workers = workers or cpus
        # Ray counts resources in 1/10000ths: 2/3 must round down or 3 x 0.6667 > 2 CPUs
        per_task = int(cpus / workers * 10_000) / 10_000
        for _ in build_dataset(paths[:2 * workers], spec, tok, mbs, cpus_per_task=per_task
                               ).iter_batches(batch_size=None):
            pass
        ray_scheduling.wait_for_autoscaling_coordinator(timeout_s=120)
        warmup_s = time.perf_counter() - t0
        # What Ray costs while nothing runs (its processes' timers and polls), to tell that
        # background from the cost of the work in the breakdown.
        with CpuMeter() as idle:
            time.sleep(IDLE_S)
        idle_cpu = idle.by_kind()
        ds = build_dataset(paths, spec, tok, map_batch_size=mbs, cpus_per_task=per_task)
        with CpuMeter() as cpu:
            res = _consume(iter(iter_torch(ds, batch_size=batch_size)), limit)
        res["cpu_s"] = cpu.by_kind()
        res["idle_cpu_s_per_s"] = {k: round(v / IDLE_S, 3) for k, v in idle_cpu.items()}
        res["breakdown"] = ray_breakdown(ds, res, cpus)
        res["warmup_s"] = warmup_s
        if os.environ.get("MMDIST_BENCH_STATS"):
            print(ds.stats())
    finally:
        if started:
            ray.shutdown()
    return res
