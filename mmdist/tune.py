"""`mmdist sweep`: Ray Tune over fusion method x fusion stage x learning rate (any config key).

Every trial is itself a multi-worker DeepSpeed job: a Tune function trainable builds the same
TorchTrainer as `mmdist train` (``build_trainer``) and forwards its reports to Tune with
``TuneReportCallback`` (Ray Train V2 cannot nest ``Tuner(TorchTrainer)``). MLflow gets one parent
run for the sweep and one nested child run per trial, written by that trial's rank 0 only.
The best trial's consolidated model is registered and aliased like a training run, and a report
(table, heat map, learning curves) goes to the sweep folder and the parent run.

Combinations of the space that the config refuses (e.g. attention x late) are dropped before
the sweep starts and listed with their reason; a trial that raises is a failed trial, counted
and reported, and the sweep goes on.
"""

from __future__ import annotations

import argparse
import functools
import itertools
import json
import math
import random
import re
import time
from pathlib import Path
from typing import Any

from mmdist.config import FUSION_STAGES, FUSIONS, Config, ConfigError, load_config
from mmdist.train.startable import TRIAL_CPUS  # the CPU a trial's driver function reserves


def configure_parser(parser: argparse.ArgumentParser) -> None:
    from mmdist.arguments import add_config_arguments

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
    parser.add_argument("--address", default=None,
                        help="Ray cluster address (default: $RAY_ADDRESS, else a local Ray)")
    parser.add_argument("--num-cpus", type=int, default=None,
                        help="logical CPUs for a local Ray started by this command")
    parser.add_argument("--data-cache", default=None,
                        help="where synthetic shards go when data.path is not set (default: "
                             "<train.storage_path>/data, else .cache/data)")


# ---- the search space ------------------------------------------------------------------------


def parse_space_arg(item: str) -> tuple[str, Any]:
    """``model.fusion=concat,add`` -> (key, [..]); ``train.lr=loguniform:1e-4:1e-2`` -> range."""
    if "=" not in item:
        raise ConfigError([f"--space {item!r}: expected KEY=SPEC, e.g. model.fusion=concat,add"])
    key, spec = item.split("=", 1)
    key, spec = key.strip(), spec.strip()
    for kind in ("loguniform", "uniform"):
        if spec.startswith(kind + ":"):
            parts = spec.split(":")
            try:
                lo, hi = float(parts[1]), float(parts[2])
            except (IndexError, ValueError):
                raise ConfigError([f"--space {item!r}: expected {kind}:LO:HI"]) from None
            return key, {kind: [lo, hi]}
    import yaml

    return key, [yaml.safe_load(v) for v in spec.split(",") if v.strip()]


def default_space(cfg: Config) -> dict[str, Any]:
    """Every fusion method x every stage valid for this config, and a log-uniform lr range."""
    pairs = valid_fusion_pairs(cfg)
    return {"model.fusion": sorted({f for f, _ in pairs}, key=FUSIONS.index),
            "model.fusion_stage": sorted({s for _, s in pairs}, key=FUSION_STAGES.index),
            "train.lr": {"loguniform": [cfg.train.lr / 3, cfg.train.lr * 3]}}


def valid_fusion_pairs(cfg: Config) -> list[tuple[str, str]]:
    out = []
    for f, s in itertools.product(FUSIONS, FUSION_STAGES):
        try:
            cfg.override({"model.fusion": f, "model.fusion_stage": s})
            out.append((f, s))
        except ConfigError:
            pass
    return out


def resolve_space(cfg: Config, space_args: list[str]) -> dict[str, Any]:
    space = dict(cfg.tune.space or default_space(cfg))
    for item in space_args:
        key, spec = parse_space_arg(item)
        space[key] = spec
    cfg.override({"tune.space": space})  # validates every key and choice, all at once
    return space


def _choices(spec: Any) -> list | None:
    """The values of a finite dimension (a list, or {choice: [...]}); None for a range."""
    if isinstance(spec, list):
        return spec
    return spec.get("choice") if isinstance(spec, dict) else None


def refusal(cfg: Config, overrides: dict[str, Any]) -> str | None:
    """Why the config refuses ``overrides`` (its problems, each naming key and value), or None."""
    try:
        cfg.override(overrides)
        return None
    except ConfigError as e:
        return "; ".join(e.problems)


def space_points(cfg: Config, space: dict[str, Any]) -> tuple[list[dict], list[dict]]:
    """Every combination of the space's finite dimensions (lists and {choice: [...]}): those the
    config accepts, and those it refuses as ``{"overrides": {...}, "reason": "..."}``.

    Each value was checked on its own when the space was resolved; a combination can still be
    refused by a rule across keys (``model.fusion=attention`` with ``model.fusion_stage=late``).
    Those never become trials. Ranges are not enumerated: a sampled value the config refuses
    fails its trial before training starts.
    """
    keys = [k for k, spec in space.items() if _choices(spec) is not None]
    valid, dropped = [], []
    for combo in itertools.product(*(_choices(space[k]) for k in keys)):
        point = dict(zip(keys, combo))
        reason = refusal(cfg, point)
        if reason:
            dropped.append({"overrides": point, "reason": reason})
        else:
            valid.append(point)
    return valid, dropped


def to_tune_space(space: dict[str, Any], search: str,
                  points: list[dict] | None = None) -> dict[str, Any]:
    """Tune's param space for ``space``, over the combinations ``points`` of its finite
    dimensions (default: all of them; see :func:`space_points`).

    The finite dimensions are one joint key, ``_point``, so that a refused combination is never
    made: with ``search=grid`` a grid over the points (lists are grid dimensions), else a
    uniform choice among them (uniform over the accepted combinations, what resampling the
    refused ones would give). ``{choice: [...]}`` dimensions under a grid are sampled per trial
    as ``_choice``, among the completions the config accepts for that trial's grid point.
    Ranges stay independent keys.
    """
    from ray import tune

    finite = [k for k, spec in space.items() if _choices(spec) is not None]
    if points is None:
        points = [dict(zip(finite, c))
                  for c in itertools.product(*(_choices(space[k]) for k in finite))]
    grid_keys = [k for k in finite if search == "grid" and isinstance(space[k], list)]
    out: dict[str, Any] = {}
    if finite and not grid_keys:
        out["_point"] = tune.choice(points)
    elif finite and len(grid_keys) == len(finite):
        out["_point"] = tune.grid_search(points)
    elif finite:
        completions: list[tuple[dict, list[dict]]] = []
        for p in points:
            head = {k: p[k] for k in grid_keys}
            tail = {k: v for k, v in p.items() if k not in grid_keys}
            for h, tails in completions:
                if h == head:
                    tails.append(tail)
                    break
            else:
                completions.append((head, [tail]))
        out["_point"] = tune.grid_search([h for h, _ in completions])
        out["_choice"] = tune.sample_from(functools.partial(_pick_completion, completions))
    ranges = {"loguniform": tune.loguniform, "uniform": tune.uniform}
    for key, spec in space.items():
        if key not in finite:
            kind, args = next(iter(spec.items()))
            out[key] = ranges[kind](*args)
    return out


def _pick_completion(completions: list[tuple[dict, list[dict]]], config: dict) -> dict:
    """The sampled dimensions of one grid trial: one of the accepted completions of its point."""
    head = dict(config["_point"])
    return random.choice(next(tails for h, tails in completions if h == head))


def trial_overrides(config: dict[str, Any]) -> dict[str, Any]:
    """The dotted config keys of one trial: its point, its sampled choices, its ranges (Tune adds
    nothing else to our param space). Sweeps saved before points existed had only dotted keys."""
    out = dict(config.get("_point") or {})
    out.update(config.get("_choice") or {})
    out.update({k: v for k, v in config.items() if "." in k})
    return out


# ---- one trial ----------------------------------------------------------------------------


class TrialConfigError(ValueError):
    """The config refuses a trial's sampled values. Its problems as one message: a ConfigError
    raised in a trial reaches the driver re-built from its text, one "problem" per character."""


def run_trial(config: dict[str, Any]) -> None:
    """The trainable Tune runs: :func:`trial_fn`. A trial that raises is a failed trial (Tune
    records its error, the sweep goes on); its MLflow child run, if it has one, ends FAILED."""
    try:
        trial_fn(config)
    except Exception:
        _end_child_run_failed(config)
        raise


def _end_child_run_failed(config: dict[str, Any]) -> None:
    import ray.tune
    from mlflow.tracking import MlflowClient

    from mmdist import tracking

    sweep = config["_sweep"]
    trial_name = f"{sweep['name']}-{ray.tune.get_context().get_trial_id()}"
    try:
        client = MlflowClient(sweep["tracking_uri"])
        exp = client.get_experiment_by_name(sweep["cfg"]["tracking"]["experiment"])
        found = exp and client.search_runs(
            [exp.experiment_id], max_results=1,
            filter_string=f"tags.`{tracking.RUN_NAME_TAG}` = '{trial_name}'")
        if found:
            client.set_terminated(found[0].info.run_id, status="FAILED")
    except Exception as e:  # the trial's own error is the one to report
        print(f"[mmdist] {trial_name}: could not mark its MLflow run FAILED: {e}", flush=True)


def _val_report_callback():
    """``TuneReportCallback`` that forwards only reports holding validation metrics.

    A checkpoint saved before the first evaluation (``train.checkpoint_every`` below
    ``train.eval_every``) is reported without the sweep's metric, and Tune ends the whole sweep
    on a result without it; ASHA ignores such results anyway.
    """
    from ray.tune.integration.ray_train import TuneReportCallback

    class ValReportCallback(TuneReportCallback):
        def after_report(self, run_context, metrics, checkpoint):
            if any(k.startswith("val_") for k in metrics[0]):
                super().after_report(run_context, metrics, checkpoint)

    return ValReportCallback()


def trial_fn(config: dict[str, Any]) -> None:
    """Tune function trainable: one multi-worker TorchTrainer run with these overrides."""
    import ray.tune

    from mmdist import tracking
    from mmdist.train.retry import fit_with_retries
    from mmdist.train.run import build_trainer, prepare_job

    sweep = config["_sweep"]
    base = Config.from_dict(sweep["cfg"])
    overrides = trial_overrides(config)
    ctx = ray.tune.get_context()
    trial_name = f"{sweep['name']}-{ctx.get_trial_id()}"
    problem = refusal(base, overrides)
    if problem:  # refused combinations were dropped before the sweep; a sampled range value
        raise TrialConfigError(problem)  # fails here, before any run or worker exists
    cfg = base.override({**overrides, "train.run_name": trial_name})
    uri = sweep["tracking_uri"]
    run_id = tracking.get_or_create_run(uri, cfg.tracking.experiment, trial_name,
                                        parent_run_id=sweep["parent_run_id"])
    tracking.log_params(uri, run_id, {**cfg.flat(), **{f"trial.{k}": v
                                                       for k, v in overrides.items()}})
    job, datasets = prepare_job(cfg, Path(sweep["data_dir"]), trial_name, uri, run_id)
    result = fit_with_retries(  # the retry rule of `mmdist train`, per trial
        lambda: build_trainer(cfg, job, datasets, trial_name, sweep["storage"],
                              callbacks=[_val_report_callback()]),
        Path(job["storage"]), cfg.train.max_failures)
    tracking.set_terminated(uri, run_id, "FINISHED")
    out = result.return_value or {}
    out.update(checkpoint_path=result.checkpoint.path if result.checkpoint else None,
               mlflow_run_id=run_id, overrides=overrides)
    done = Path(sweep["report_dir"]) / "trials"
    done.mkdir(parents=True, exist_ok=True)
    (done / f"{trial_name}.json").write_text(json.dumps(out, default=str))


# ---- the sweep ----------------------------------------------------------------------------


def check_fits(cfg: Config, data_dir: str | Path | None = None) -> None:
    """Refuse before start when one trial needs more than the cluster has (no PENDING forever)
    or the shards are too small for one step or hold labels beyond ``model.num_classes``: the
    checks of ``mmdist preflight``."""
    import ray

    from mmdist.data.shards import read_manifest
    from mmdist.errors import CommandError
    from mmdist.train.startable import check_resources, cluster_resources, data_problems

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
    from mmdist.ray_env import release_ray

    cfg = load_config(args.config, args.overrides)
    summary = sweep(cfg, space_args=args.space, name=args.resume or args.name,
                    resume=bool(args.resume), address=args.address, num_cpus=args.num_cpus,
                    data_cache=args.data_cache)
    release_ray()
    _print_summary(summary)
    return summary


def sweep(cfg: Config, space_args: list[str] | None = None, name: str | None = None,
          resume: bool = False, address: str | None = None, num_cpus: int | None = None,
          data_cache: str | Path | None = None, register: bool | None = None) -> dict[str, Any]:
    """Run (or resume) a sweep and return its summary (what `--json` prints)."""
    import uuid

    import ray
    from ray import tune
    from ray.tune.schedulers import ASHAScheduler, FIFOScheduler

    from mmdist import tracking
    from mmdist.errors import CommandError
    from mmdist.ray_env import init_ray
    from mmdist.train.register import register_model
    from mmdist.train.run import check_data, ensure_data

    t0 = time.perf_counter()
    space = resolve_space(cfg, space_args or [])
    points, dropped = space_points(cfg, space)
    if not points:
        raise CommandError(
            "every combination of the sweep space is refused by the config, nothing to run: "
            + "; ".join(f"{_fmt_overrides(d['overrides'])}: {d['reason']}" for d in dropped))
    name = name or f"sweep-{cfg.model.task}-{uuid.uuid4().hex[:6]}"
    storage = str(Path(cfg.train.storage_path or "runs").resolve())
    report_dir = Path(storage) / name / "report"
    if resume and not tune.Tuner.can_restore(str(Path(storage) / name / "tune")):
        raise CommandError(f"--resume {name}: no sweep of that name under {storage}")
    data_dir = ensure_data(cfg, data_cache)
    check_data(data_dir)
    metric, mode = cfg.primary_metric, cfg.metric_mode
    init_ray(address, num_cpus, dashboard=True)
    check_fits(cfg, data_dir)  # before any MLflow run exists: a refused sweep leaves none
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
              "them:\n" + "\n".join(f"  {_fmt_overrides(d['overrides'])}: {d['reason']}"
                                     for d in dropped), flush=True)

    tune_space = to_tune_space(space, cfg.tune.search, points)
    tune_space["_sweep"] = {"cfg": cfg.to_dict(), "name": name, "tracking_uri": uri,
                            "parent_run_id": parent, "data_dir": str(data_dir),
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
            run_config=tune.RunConfig(name="tune", storage_path=tune_path, verbose=1,
                                      failure_config=tune.FailureConfig(max_failures=0,
                                                                        fail_fast=False)))
    grid = tuner.fit()
    expected = expected_trials(tune_space, cfg.tune.num_samples)
    unfinished = _unfinished_trials(Path(tune_path) / "tune", expected)
    if unfinished:  # Ctrl+C: Tune saved its state and returned early
        raise CommandError(
            f"sweep {name} was interrupted with {unfinished} of {expected} trial(s) unfinished; "
            f"its state is saved under {tune_path}. Resume it with the same --config and "
            f"overrides: mmdist sweep --resume {name}")

    rows = _trial_rows(grid, metric, mode, report_dir)
    failed = [{"overrides": r["overrides"], "error": r["error"]} for r in rows if r["failed"]]
    valid = [r for r in rows if not r["failed"] and r["metric"] is not None]
    if not valid:
        tracking.set_terminated(uri, parent, "FAILED")
        if failed and len(failed) == len(rows):
            raise CommandError(
                f"sweep {name}: all {len(rows)} trial(s) failed, no model to register: "
                + "; ".join(f"{_fmt_overrides(f['overrides'])}: {f['error']}" for f in failed)
                + f" (logs under {tune_path})")
        raise CommandError(f"sweep {name}: no trial reported {metric}; see {tune_path}")
    best = (max if mode == "max" else min)(valid, key=lambda r: r["metric"])
    files = write_report(rows, grid, metric, mode, report_dir, dropped)
    for f in files:
        _retry_log_artifact(uri, parent, f)
    tracking.MetricsLogger(uri, parent).log({f"best_{metric}": best["metric"]}, 0)
    tracking.MetricsLogger(uri, parent).flush()

    reg = {"model_uri": None, "alias": None}
    if (cfg.tracking.register if register is None else register) and best.get("model_dir"):
        reg = register_model(uri, parent, Path(best["model_dir"]),
                             cfg.override(best["overrides"]), {metric: best["final_metric"]
                                                               or best["metric"]})
    tracking.set_terminated(uri, parent, "FINISHED")
    summary = {
        "ok": True, "name": name, "parent_run_id": parent, "trials": len(rows),
        "stopped_early": sum(r["stopped_early"] for r in rows),
        "failed_trials": len(failed), "failed": failed, "dropped": dropped,
        "best_config": best["overrides"], "best_metric": best["metric"],
        "metric": metric, "model_uri": reg["model_uri"], "alias": reg["alias"],
        "report_dir": str(report_dir), "trial_steps": sum(r["steps"] for r in rows),
        "seconds": round(time.perf_counter() - t0, 1),
    }
    return summary


def expected_trials(tune_space: dict[str, Any], num_samples: int) -> int:
    """How many trials Tune makes of ``tune_space`` (what :func:`to_tune_space` built): every
    grid point ``num_samples`` times; sampled keys do not multiply."""
    n = num_samples
    for spec in tune_space.values():
        if isinstance(spec, dict) and set(spec) == {"grid_search"}:
            n *= len(spec["grid_search"])
    return n


def _unfinished_trials(tune_dir: Path, expected: int) -> int:
    """Trials of ``expected`` that the saved experiment state does not list as finished or
    failed.

    After Ctrl+C, Tune saves its state one last time (trials still PENDING or RUNNING there)
    and then returns the grid with those trials stopped, which looks like a finished sweep;
    the saved state tells the two apart. Tune creates trials one at a time as slots free up,
    so a Ctrl+C between one trial's end and the next one's creation leaves a state with only
    finished trials in it: the ones never created count as unfinished too.
    """
    from ray.tune import ExperimentAnalysis

    trials = ExperimentAnalysis(str(tune_dir)).trials
    done = sum(t.status in ("TERMINATED", "ERROR") for t in trials)
    return max(expected - done, len(trials) - done)


def _retry_log_artifact(uri: str, run_id: str, path: Path) -> None:
    from mlflow.tracking import MlflowClient

    from mmdist.tracking import retry

    retry(lambda: MlflowClient(uri).log_artifact(run_id, str(path), "sweep_report"),
          f"logging {path.name} to MLflow")


def _trial_rows(grid, metric: str, mode: str, report_dir: Path) -> list[dict[str, Any]]:
    """One row per trial: its overrides, best metric, steps, whether ASHA stopped it."""
    rows = []
    done_dir = report_dir / "trials"
    finished = {}
    if done_dir.exists():
        for p in done_dir.glob("*.json"):
            d = json.loads(p.read_text())
            finished[json.dumps(d["overrides"], sort_keys=True)] = d
    for res in grid:
        conf = trial_overrides(res.config or {})
        df = res.metrics_dataframe
        failed = res.error is not None
        series = df[metric].dropna() if df is not None and metric in df else None
        best_val = None
        if series is not None and len(series):
            best_val = float(series.max() if mode == "max" else series.min())
        done = finished.get(json.dumps(conf, sort_keys=True))
        steps = int((res.metrics or {}).get("global_step", 0) or 0)
        row = {
            "overrides": conf, "metric": None if series is None or not len(series)
            else float(series.iloc[-1]), "best_metric_seen": best_val, "steps": steps,
            "failed": failed, "stopped_early": not failed and done is None,
            "error": error_line(res.error) if failed else "",
            "final_metric": (done or {}).get("metrics", {}).get(metric),
            "model_dir": None, "history": df,
        }
        if done:
            row["steps"] = int(done.get("global_step", steps))
            if done.get("checkpoint_path"):
                row["model_dir"] = str(Path(done["checkpoint_path"]) / "model")
            if row["final_metric"] is not None:
                row["metric"] = float(row["final_metric"])
        rows.append(row)
    return rows


def write_report(rows: list[dict], grid, metric: str, mode: str, out: Path,
                 dropped: list[dict] = ()) -> list[Path]:
    """trials.csv, trials.md, heatmap.png (fusion x stage), curves.png (top trials).

    ``dropped``: the combinations the config refused (:func:`space_points`), listed in
    trials.md and marked "refused" on the heat map. Failed trials are in the tables with their
    error, and left out of the heat map and the curves.
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import pandas as pd

    out.mkdir(parents=True, exist_ok=True)
    table = pd.DataFrame([{**r["overrides"], metric: r["metric"], "steps": r["steps"],
                           "stopped_early": r["stopped_early"], "failed": r["failed"],
                           "error": r["error"]} for r in rows])
    table = table.sort_values(metric, ascending=(mode == "min"), na_position="last")
    table.to_csv(out / "trials.csv", index=False)
    md = table.to_markdown(index=False) if _has_tabulate() else table.to_string(index=False)
    if dropped:
        md += "\n\nDropped before the sweep, refused by the config:\n\n" + "\n".join(
            f"- {_fmt_overrides(d['overrides'])}: {d['reason']}" for d in dropped)
    (out / "trials.md").write_text(md + "\n")
    files = [out / "trials.csv", out / "trials.md"]

    # Heat map: best metric per fusion method x stage.
    points = [r["overrides"] for r in rows] + [d["overrides"] for d in dropped]
    fusions = sorted({p.get("model.fusion") for p in points} - {None},
                     key=lambda f: FUSIONS.index(f))
    stages = sorted({p.get("model.fusion_stage") for p in points} - {None},
                    key=lambda s: FUSION_STAGES.index(s))
    if fusions:
        stages = stages or ["(fixed)"]

        def cell(p: dict) -> tuple[int, int] | None:
            if "model.fusion" not in p:
                return None
            return fusions.index(p["model.fusion"]), stages.index(p.get("model.fusion_stage",
                                                                        "(fixed)"))

        grid_vals = [[math.nan] * len(stages) for _ in fusions]
        empty = {cell(d["overrides"]): "refused" for d in dropped}
        empty.update({cell(r["overrides"]): "failed" for r in rows if r["failed"]})
        for r in rows:
            if r["metric"] is None or r["failed"] or cell(r["overrides"]) is None:
                continue
            i, j = cell(r["overrides"])
            cur = grid_vals[i][j]
            better = max if mode == "max" else min
            grid_vals[i][j] = r["metric"] if math.isnan(cur) else better(cur, r["metric"])
        fig, ax = plt.subplots(figsize=(1.6 + 1.4 * len(stages), 1.2 + 0.5 * len(fusions)))
        im = ax.imshow(grid_vals, cmap="viridis" if mode == "max" else "viridis_r", aspect="auto")
        ax.set_xticks(range(len(stages)), stages)
        ax.set_yticks(range(len(fusions)), fusions)
        for i, row in enumerate(grid_vals):
            for j, v in enumerate(row):
                ax.text(j, i, empty.get((i, j), "-") if math.isnan(v) else f"{v:.3f}",
                        ha="center", va="center",
                        color="white" if not math.isnan(v) else "grey", fontsize=9)
        ax.set_xlabel("fusion stage")
        ax.set_ylabel("fusion method")
        ax.set_title(f"best {metric} per fusion method x stage")
        fig.colorbar(im, ax=ax)
        fig.tight_layout()
        fig.savefig(out / "heatmap.png", dpi=120)
        plt.close(fig)
        files.append(out / "heatmap.png")

    # Learning curves of the top trials.
    ranked = [r for r in rows
              if r["metric"] is not None and r["history"] is not None and not r["failed"]]
    ranked.sort(key=lambda r: r["metric"], reverse=(mode == "max"))
    fig, ax = plt.subplots(figsize=(7, 4))
    for r in ranked[:5]:
        h = r["history"]
        if metric in h and "global_step" in h:
            h = h.dropna(subset=[metric])
            label = ", ".join(f"{k.split('.')[-1]}={v:.3g}" if isinstance(v, float)
                              else f"{k.split('.')[-1]}={v}" for k, v in r["overrides"].items())
            ax.plot(h["global_step"], h[metric], marker="o", label=label)
    ax.set_xlabel("optimizer step")
    ax.set_ylabel(metric)
    ax.set_title("learning curves, top trials")
    if ranked:
        ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(out / "curves.png", dpi=120)
    plt.close(fig)
    files.append(out / "curves.png")
    return files


def _has_tabulate() -> bool:
    try:
        import tabulate  # noqa: F401

        return True
    except ImportError:
        return False


_EXCEPTION_LINE = re.compile(r"^(?:\w+\.)*(\w*(?:Error|Exception|Interrupt)(?:\([\w.]+\))?): ")


def error_line(error: BaseException | str) -> str:
    """What went wrong in a trial, from the (remote) traceback text Tune keeps: the last
    ``SomeError: message`` line with the rest of its message, the class without its module;
    at most 500 characters."""
    lines = [x for x in str(error).splitlines() if x.strip()]
    starts = [i for i, x in enumerate(lines) if _EXCEPTION_LINE.match(x)]
    if not starts:
        return (lines[-1].strip() if lines else type(error).__name__)[:500]
    first, *rest = lines[starts[-1]:]
    text = " ".join([_EXCEPTION_LINE.sub(r"\1: ", first), *(x.strip() for x in rest)])
    return text if len(text) <= 500 else text[:497] + "..."


def _fmt_overrides(overrides: dict[str, Any]) -> str:
    return " ".join(f"{k}={v}" for k, v in overrides.items())


def _print_summary(s: dict[str, Any]) -> None:
    print("\n" + "=" * 72)
    print(f"sweep        {s['name']}  (MLflow parent run {s['parent_run_id']})")
    print(f"trials       {s['trials']}  stopped early {s['stopped_early']}  "
          f"failed {s['failed_trials']}  trial-steps {s['trial_steps']}")
    for f in s["failed"]:
        print(f"failed       {_fmt_overrides(f['overrides'])}: {f['error']}")
    for d in s["dropped"]:
        print(f"dropped      {_fmt_overrides(d['overrides'])}: {d['reason']}")
    print(f"best         {s['metric']} = {s['best_metric']:.4f}  with {s['best_config']}")
    if s["model_uri"]:
        print(f"model        {s['model_uri']}  (alias @{s['alias']})")
    print(f"report       {s['report_dir']}  (trials.csv, heatmap.png, curves.png)")
    print("=" * 72, flush=True)
