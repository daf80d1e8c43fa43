"""`mmdist sweep`: Ray Tune over fusion method x fusion stage x learning rate (any config key).

Every trial is itself a multi-worker DeepSpeed job: a Tune function trainable builds the same
Ray Train trainer as `mmdist train` (``build_trainer``) and forwards its reports to Tune with
``TuneReportCallback`` (Ray Train V2 cannot nest a trainer in a ``Tuner``). MLflow gets one parent
run for the sweep and one nested child run per trial, written by that trial's rank 0 only.
The best trial's consolidated model is registered and aliased like a training run, and a report
(table, heat map, learning curves) goes to the sweep folder and the parent run.

Combinations of the space that the config refuses (e.g. attention x late) are dropped before
the sweep starts and listed with their reason; a trial that raises is a failed trial, counted
and reported, and the sweep goes on.

The parts: :mod:`~mmdist.tune.space` (the search space), :mod:`~mmdist.tune.trial` (one trial),
:mod:`~mmdist.tune.report` (the sweep report); this module runs the sweep.
"""

from __future__ import annotations

import argparse
import json
import time
import uuid
from pathlib import Path
from typing import Any

from mmdist import tracking
from mmdist.arguments import add_config_arguments, add_ray_arguments
from mmdist.config import Config, load_config
from mmdist.console import Console
from mmdist.data.shards import read_manifest
from mmdist.errors import CommandError
from mmdist.ray_env import init_ray, release_ray
from mmdist.train.register import register_model
from mmdist.train.run import check_data, ensure_data
from mmdist.train.startable import (
    TRIAL_CPUS,  # the CPU a trial's driver function reserves
    check_resources,
    cluster_resources,
    data_problems,
    storage_problem,
    with_data_defaults,
)
from mmdist.tune.report import error_line, format_overrides, trial_rows, write_report
from mmdist.tune.space import (
    default_space,
    expected_trials,
    parse_space_arg,
    refusal,
    resolve_space,
    space_points,
    to_tune_space,
    trial_overrides,
    valid_fusion_pairs,
)
from mmdist.tune.trial import TrialConfigError, run_trial, trial_fn

__all__ = ["TrialConfigError", "best_trial", "check_fits", "concurrent_trials", "configure_parser",
           "default_space", "error_line", "expected_trials", "parse_space_arg", "refusal",
           "resolve_space", "run", "run_trial", "space_points", "sweep", "to_tune_space",
           "trial_cpus", "trial_fn", "trial_overrides", "valid_fusion_pairs", "write_report"]


def configure_parser(parser: argparse.ArgumentParser) -> None:
    add_config_arguments(parser)
    parser.add_argument("--space", action="append", default=[], metavar="KEY=SPEC",
                        help="replace one search dimension (repeatable): KEY=a,b,c (choices), "
                             "KEY=loguniform:LO:HI or KEY=uniform:LO:HI (a range). "
                             "Example: --space model.fusion=concat,attention "
                             "--space train.lr=loguniform:1e-4:1e-2")
    parser.add_argument("--name", default=None,
                        help="sweep name (folder under train.storage_path and MLflow parent run); "
                             "default: sweep-<task>-<random>")
    parser.add_argument("--resume", default=None, metavar="NAME",
                        help="resume the interrupted sweep NAME (same config and space)")
    add_ray_arguments(parser)
    parser.add_argument("--data-cache", default=None,
                        help="where synthetic shards go when data.path is not set (default: "
                             "<train.storage_path>/data, else .cache/data)")
    parser.add_argument("--verbose", action="store_true",
                        help="show Tune's status tables and every trial's output (default: a "
                             "line per finished trial; the rest in <storage>/<sweep>/mmdist.log)")


def check_fits(cfg: Config, data_dir: str | Path | None = None) -> None:
    """Refuse before start when one trial needs more than the cluster has (no PENDING forever)
    or the shards are too small for one step or hold labels beyond ``model.num_classes``: the
    checks of ``mmdist preflight``."""
    import ray  # heavy: not loaded for --help

    problems = []
    one_trial = cfg.override({"tune.max_concurrent_trials": 1})
    res = check_resources(one_trial, *cluster_resources(ray), sweep=True)
    if not res.ok:
        problems.append(f"one trial {res.detail}")
    if data_dir is not None:
        problems += data_problems(cfg, read_manifest(data_dir), f"data {data_dir}")
    if problems:
        raise CommandError("this sweep cannot start: " + "; ".join(problems))


def trial_cpus(cfg: Config) -> float:
    """CPUs one trial holds while it runs: its workers and the trial function itself."""
    return cfg.train.num_workers * cfg.train.cpus_per_worker + TRIAL_CPUS


def concurrent_trials(cfg: Config, cluster_cpus: float) -> int:
    """tune.max_concurrent_trials, lowered so that CPU for one data task is always left over
    (trials holding every CPU starve their own Ray Data reads and wait forever)."""
    fit = int((cluster_cpus - cfg.data.cpus_per_task + 1e-9) // trial_cpus(cfg))
    return max(1, min(cfg.tune.max_concurrent_trials, fit))


def run(args: argparse.Namespace) -> dict[str, Any]:
    cfg = load_config(args.config, args.overrides)
    name = args.resume or args.name or f"sweep-{cfg.model.task}-{uuid.uuid4().hex[:6]}"
    log_file = Path(cfg.train.storage_path or "runs").resolve() / name / "mmdist.log"
    problem = storage_problem(log_file.parent.parent)
    if problem:
        raise CommandError(problem)
    with Console(log_file, verbose=args.verbose, worker_lines=False) as console:
        summary = sweep(cfg, space_args=args.space, name=name, resume=bool(args.resume),
                        address=args.address, num_cpus=args.num_cpus,
                        data_cache=args.data_cache, console=console)
        release_ray()
    summary["log_file"] = str(log_file)
    _print_summary(summary)
    return summary


def sweep(cfg: Config, space_args: list[str] | None = None, name: str | None = None,
          resume: bool = False, address: str | None = None, num_cpus: int | None = None,
          data_cache: str | Path | None = None, register: bool | None = None,
          console: Console | None = None) -> dict[str, Any]:
    """Run (or resume) a sweep and return its summary (what `--json` prints); ``console``
    (the CLI's) takes Tune's and the trials' output once Ray is up."""
    # heavy (Ray/torch): `mmdist --help` imports this module to build its parser
    import ray
    from ray import tune
    from ray.tune.schedulers import ASHAScheduler, FIFOScheduler

    from mmdist.tune.progress import TrialLines

    t0 = time.perf_counter()
    space = resolve_space(cfg, space_args or [])
    points, dropped = space_points(cfg, space)
    if not points:
        raise CommandError(
            "every combination of the sweep space is refused by the config, nothing to run: "
            + "; ".join(f"{format_overrides(d['overrides'])}: {d['reason']}" for d in dropped))
    name = name or f"sweep-{cfg.model.task}-{uuid.uuid4().hex[:6]}"
    storage = str(Path(cfg.train.storage_path or "runs").resolve())
    report_dir = Path(storage) / name / "report"
    if resume and not tune.Tuner.can_restore(str(Path(storage) / name / "tune")):
        raise CommandError(f"--resume {name}: no sweep of that name under {storage}")
    data_dir = ensure_data(cfg, data_cache)
    manifest = check_data(data_dir)  # verified once here: the trials read it, unhashed
    cfg = with_data_defaults(cfg, manifest)
    metric, mode = cfg.primary_metric, cfg.metric_mode
    init_ray(address, num_cpus, dashboard=True)
    quiet = console is not None and console.attach_ray()
    check_fits(cfg, data_dir)  # before any MLflow run exists: a refused sweep leaves none
    from mmdist.models.feature_build import feature_cache_for  # torch: not for --help

    # frozen encoders' outputs: built (or verified) once, before the trials
    feature_cache = feature_cache_for(cfg, data_dir, source=manifest)
    uri = tracking.tracking_uri(cfg)
    parent = tracking.get_or_create_run(uri, cfg.tracking.experiment, name,
                                        tags={"mmdist.sweep": "true"})
    tracking.log_params(uri, parent, {**cfg.flat(), "sweep.space": json.dumps(space),
                                      "sweep.metric": metric,
                                      "sweep.dropped": json.dumps([d["overrides"]
                                                                   for d in dropped])})
    print(f"[mmdist] sweep {name}: space {json.dumps(space)}; metric {metric} ({mode})",
          flush=True)
    if dropped:
        print(f"[mmdist] {len(dropped)} combination(s) of the space dropped, the config refuses "
              "them:\n" + "\n".join(f"  {format_overrides(d['overrides'])}: {d['reason']}"
                                     for d in dropped), flush=True)

    tune_space = to_tune_space(space, cfg.tune.search, points)
    tune_space["_sweep"] = {"cfg": cfg.to_dict(), "name": name, "tracking_uri": uri,
                            "parent_run_id": parent, "data_dir": str(data_dir),
                            # verified above; the trials read these files without hashing
                            # them again (the files, not their contents, go in Tune's state)
                            "data_verified": True,
                            "feature_cache_entry": feature_cache and feature_cache["entry"],
                            "storage": storage, "report_dir": str(report_dir)}
    scheduler = (ASHAScheduler(grace_period=cfg.tune.grace_period,
                               reduction_factor=cfg.tune.reduction_factor, max_t=10**6)
                 if cfg.tune.scheduler == "asha" else FIFOScheduler())
    trainable = tune.with_resources(run_trial, {"CPU": TRIAL_CPUS})
    concurrency = concurrent_trials(cfg, ray.cluster_resources().get("CPU", 0))
    if concurrency < cfg.tune.max_concurrent_trials:
        print(f"[mmdist] running {concurrency} trial(s) at a time, not "
              f"tune.max_concurrent_trials={cfg.tune.max_concurrent_trials}: each trial holds "
              f"{trial_cpus(cfg):g} CPUs and its data tasks need {cfg.data.cpus_per_task:g}",
              flush=True)
    tune_path = str(Path(storage) / name)
    if resume:
        tuner = tune.Tuner.restore(str(Path(tune_path) / "tune"), trainable,
                                   resume_errored=True)
    else:
        tuner = tune.Tuner(
            trainable, param_space=tune_space,
            tune_config=tune.TuneConfig(metric=metric, mode=mode, scheduler=scheduler,
                                        num_samples=cfg.tune.num_samples,
                                        max_concurrent_trials=concurrency),
            # a trial that raises is failed, not retried, and the others go on
            run_config=tune.RunConfig(
                name="tune", storage_path=tune_path, verbose=0 if quiet else 1,
                callbacks=[TrialLines(console, expected_trials(tune_space, cfg.tune.num_samples),
                                      metric)] if quiet else None,
                failure_config=tune.FailureConfig(max_failures=0, fail_fast=False)))
    expected = expected_trials(tune_space, cfg.tune.num_samples)
    grid = tuner.fit()
    unfinished = _unfinished_trials(Path(tune_path) / "tune", expected)
    if unfinished:  # Ctrl+C: Tune saved its state and returned early
        raise CommandError(
            f"sweep {name} was interrupted with {unfinished} of {expected} trial(s) unfinished; "
            f"its state is saved under {tune_path}. Resume it with the same --config and "
            f"overrides: mmdist sweep --resume {name}")

    rows = trial_rows(grid, metric, mode, report_dir)
    failed = [{"overrides": r["overrides"], "error": r["error"]} for r in rows if r["failed"]]
    valid = [r for r in rows if not r["failed"] and r["metric"] is not None]
    if not valid:
        tracking.set_terminated(uri, parent, "FAILED")
        if failed and len(failed) == len(rows):
            raise CommandError(
                f"sweep {name}: all {len(rows)} trial(s) failed, no model to register: "
                + "; ".join(f"{format_overrides(f['overrides'])}: {f['error']}" for f in failed)
                + f" (logs under {tune_path})")
        raise CommandError(f"sweep {name}: no trial reported {metric}; see {tune_path}")
    best = best_trial(valid, mode)
    files = write_report(rows, grid, metric, mode, report_dir, dropped)
    for f in files:
        _retry_log_artifact(uri, parent, f)
    tracking.MetricsLogger(uri, parent).log({f"best_{metric}": best["metric"]}, 0)
    tracking.MetricsLogger(uri, parent).flush()

    reg = {"model_uri": None, "alias": None}
    if (cfg.tracking.register if register is None else register) and best.get("model_dir"):
        reg = register_model(uri, parent, Path(best["model_dir"]),
                             cfg.override(best["overrides"]), {metric: best["final_metric"]
                                                               or best["metric"]},
                             data_dir=data_dir)
    tracking.set_terminated(uri, parent, "FINISHED")
    summary = {
        "ok": True, "name": name, "parent_run_id": parent, "trials": len(rows),
        "stopped_early": sum(r["stopped_early"] for r in rows),
        "failed_trials": len(failed), "failed": failed, "dropped": dropped,
        "best_config": best["overrides"], "best_metric": best["metric"],
        "metric": metric, "model_uri": reg["model_uri"], "alias": reg["alias"],
        "alias_error": reg.get("alias_error"),
        "report_dir": str(report_dir), "trial_steps": sum(r["steps"] for r in rows),
        "seconds": round(time.perf_counter() - t0, 1),
    }
    return summary


def best_trial(rows: list[dict[str, Any]], mode: str) -> dict[str, Any]:
    """The best of the trials that ran to the end (they have a model to register), or of all
    when none did. A trial ASHA stopped is judged at an early rung, against finished trials
    judged at the end; with concurrent trials the order of reports decides which ones ASHA
    stops, so an early rung can look better than a finished run and leave nothing to
    register."""
    finished = [r for r in rows if r.get("model_dir")]
    return (max if mode == "max" else min)(finished or rows, key=lambda r: r["metric"])


def _unfinished_trials(tune_dir: Path, expected: int) -> int:
    """Trials of ``expected`` that the saved experiment state does not list as finished or
    failed.

    After Ctrl+C, Tune saves its state one last time (trials still PENDING or RUNNING there)
    and then returns the grid with those trials stopped, which looks like a finished sweep;
    the saved state tells the two apart. Tune creates trials one at a time as slots free up,
    so a Ctrl+C between one trial's end and the next one's creation leaves a state with only
    finished trials in it: the ones never created count as unfinished too.
    """
    from ray.tune import ExperimentAnalysis  # heavy: not for --help

    trials = ExperimentAnalysis(str(tune_dir)).trials
    done = sum(t.status in ("TERMINATED", "ERROR") for t in trials)
    return max(expected - done, len(trials) - done)


def _retry_log_artifact(uri: str, run_id: str, path: Path) -> None:
    from mlflow.tracking import MlflowClient  # heavy: not for --help

    tracking.retry(lambda: MlflowClient(uri).log_artifact(run_id, str(path), "sweep_report"),
                   f"logging {path.name} to MLflow")


def _print_summary(s: dict[str, Any]) -> None:
    print("\n" + "=" * 72)
    print(f"sweep        {s['name']}  (MLflow parent run {s['parent_run_id']})")
    print(f"trials       {s['trials']}  stopped early {s['stopped_early']}  "
          f"failed {s['failed_trials']}  trial-steps {s['trial_steps']}")
    for f in s["failed"]:
        print(f"failed       {format_overrides(f['overrides'])}: {f['error']}")
    for d in s["dropped"]:
        print(f"dropped      {format_overrides(d['overrides'])}: {d['reason']}")
    print(f"best         {s['metric']} = {s['best_metric']:.4f}  with {s['best_config']}")
    if s["model_uri"]:
        print(f"model        {s['model_uri']}  (alias @{s['alias']})")
    print(f"report       {s['report_dir']}  (trials.csv, heatmap.png, curves.png)")
    if s.get("log_file"):
        print(f"log          {s['log_file']}  (Tune, Ray, trials; --verbose shows them)")
    print("=" * 72, flush=True)
