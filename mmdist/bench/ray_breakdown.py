"""Where the Ray Data side of `mmdist bench ingest` spends its time: Ray Data's own operator
and iterator stats beside the consumer's timings and the CPU seconds of each process kind."""

from __future__ import annotations

from typing import Any


def ray_breakdown(ds: Any, res: dict[str, Any], cpus: int) -> dict[str, Any]:
    """Seconds spent per stage of the Ray Data path, from Ray's own stats and our consumer.

    ``task_*`` sums are over all tasks (two run at once on two CPUs); ``udf_s`` is the time
    inside ``preprocess_batch``; ``tasks_busy_share`` is ``tasks_wall_s`` over ``cpus`` x the
    whole iteration (what is missing to 1.0 is CPU time with no task running: scheduling gaps
    between tasks, start and tail); ``iter_*`` are the consumer side in the driver (waiting for
    blocks, slicing/formatting them into batches, converting to torch). ``cpu_*`` split the
    measured CPU seconds into the read+preprocess workers and everything else Ray runs;
    ``cpu_idle_background_s`` is what the same Ray used per second while nothing ran (measured
    for ``bench.ingest.IDLE_S`` before the epoch) times the epoch's length: the part of Ray's
    extra CPU that is not work.
    """

    def total(x: Any) -> float | None:
        if x is None:
            return None
        v = getattr(x, "sum", None)
        if v is None and hasattr(x, "get"):
            v = x.get()
        return round(float(v), 2) if v is not None else None

    cpu = res.get("cpu_s", {})
    workers = cpu.get("ray::worker", 0.0)
    out: dict[str, Any] = {"consumer_elapsed_s": round(res["elapsed_s"], 2),
                           "consumer_wait_s": round(res["wait_s"], 2),
                           "cpu_workers_s": round(workers, 2),
                           "cpu_driver_s": cpu.get("driver", 0.0),
                           "cpu_idle_background_s": round(
                               sum(res.get("idle_cpu_s_per_s", {}).values())
                               * (res["startup_s"] + res["elapsed_s"]), 2),
                           "cpu_ray_daemons_s": round(sum(cpu.values()) - workers
                                                      - cpu.get("driver", 0.0), 2)}
    try:
        summary = ds._get_stats_summary()
        for op in summary.operators_stats:
            wall = total(op.wall_time)
            out[f"op {op.operator_name}"] = {
                "tasks_wall_s": wall, "tasks_cpu_s": total(op.cpu_time),
                "udf_s": total(op.function_body_time),
                "output_build_s": total(op.output_build_time),
                "tasks_busy_share": (round(wall / (cpus * (res["startup_s"] + res["elapsed_s"])),
                                           2) if wall else None)}
        it = summary.iter_stats
        for name in ("time_to_first_batch", "wait_time", "get_time", "format_time",
                     "collate_time", "finalize_batch_time", "blocked_production_wait_time"):
            out[f"iter {name}_s"] = total(getattr(it, name, None))
    except Exception as e:  # stats internals change between Ray versions; never fail the bench
        out["stats_error"] = f"{type(e).__name__}: {e}"
    return out
