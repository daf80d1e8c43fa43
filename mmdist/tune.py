"""`mmdist sweep`: Ray Tune over fusion method x fusion stage x learning rate (any config key).

Every trial is itself a multi-worker DeepSpeed job: a Tune function trainable builds the same
TorchTrainer as `mmdist train` (``build_trainer``) and forwards its reports to Tune with
``TuneReportCallback`` (Ray Train V2 cannot nest ``Tuner(TorchTrainer)``). MLflow gets one parent
run for the sweep and one nested child run per trial, written by that trial's rank 0 only.
The best trial's consolidated model is registered and aliased like a training run, and a report
(table, heat map, learning curves) goes to the sweep folder and the parent run.
"""

from __future__ import annotations

import argparse
import itertools
import json
import math
import time
from pathlib import Path
from typing import Any

from mmdist.config import FUSION_STAGES, FUSIONS, Config, ConfigError, load_config
from mmdist.preflight import TRIAL_CPUS  # the CPU a trial's driver function reserves


def configure_parser(parser: argparse.ArgumentParser) -> None:
    from mmdist.cli import add_config_arguments

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


def to_tune_space(space: dict[str, Any], search: str) -> dict[str, Any]:
    from ray import tune

    ranges = {"loguniform": tune.loguniform, "uniform": tune.uniform}
    out = {}
    for key, spec in space.items():
        if isinstance(spec, dict):
            kind, args = next(iter(spec.items()))
            out[key] = tune.choice(args) if kind == "choice" else ranges[kind](*args)
        else:
            out[key] = tune.grid_search(spec) if search == "grid" else tune.choice(spec)
    return out


def trial_overrides(config: dict[str, Any]) -> dict[str, Any]:
    """The dotted config keys of one trial (Tune adds nothing else to our param space)."""
    return {k: v for k, v in config.items() if "." in k}


def skip_invalid(cfg: Config, overrides: dict[str, Any]) -> str | None:
    try:
        cfg.override(overrides)
        return None
    except ConfigError as e:
        return "; ".join(e.problems)


# ---- one trial ----------------------------------------------------------------------------


def trial_fn(config: dict[str, Any]) -> None:
    """Tune function trainable: one multi-worker TorchTrainer run with these overrides."""
    import ray.tune
    from ray.tune.integration.ray_train import TuneReportCallback

    from mmdist import tracking
    from mmdist.train.run import build_trainer, prepare_job

    sweep = config["_sweep"]
    base = Config.from_dict(sweep["cfg"])
    overrides = trial_overrides(config)
    problem = skip_invalid(base, overrides)
    ctx = ray.tune.get_context()
    trial_name = f"{sweep['name']}-{ctx.get_trial_id()}"
    if problem:  # e.g. attention x late: report once so the trial ends, marked invalid
        ray.tune.report({"invalid": 1, "training_iteration": 1})
        return
    cfg = base.override({**overrides, "train.run_name": trial_name})
    uri = sweep["tracking_uri"]
    run_id = tracking.get_or_create_run(uri, cfg.tracking.experiment, trial_name,
                                        parent_run_id=sweep["parent_run_id"])
    tracking.log_params(uri, run_id, {**cfg.flat(), **{f"trial.{k}": v
                                                       for k, v in overrides.items()}})
    job, datasets = prepare_job(cfg, Path(sweep["data_dir"]), trial_name, uri, run_id)
    trainer = build_trainer(cfg, job, datasets, trial_name, sweep["storage"],
                            callbacks=[TuneReportCallback()])
    result = trainer.fit()
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
    or the shards are too small for one step: the checks of ``mmdist preflight``."""
    import ray

    from mmdist.cli import CommandError
    from mmdist.data.shards import read_manifest
    from mmdist.preflight import _cluster_resources, check_resources, data_size_problems

    problems = []
    one_trial = cfg.override({"tune.max_concurrent_trials": 1})
    res = check_resources(one_trial, *_cluster_resources(ray), sweep=True)
    if not res.ok:
        problems.append(f"one trial {res.detail}")
    if data_dir is not None:
        counts = read_manifest(data_dir).get("counts") or {}
        problems += data_size_problems(cfg, counts, f"data {data_dir}")
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
    from mmdist.train.run import release_ray

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
    from mmdist.cli import CommandError
    from mmdist.train.register import register_model
    from mmdist.train.run import check_data, ensure_data, init_ray

    t0 = time.perf_counter()
    space = resolve_space(cfg, space_args or [])
    name = name or f"sweep-{cfg.model.task}-{uuid.uuid4().hex[:6]}"
    storage = str(Path(cfg.train.storage_path or "runs").resolve())
    report_dir = Path(storage) / name / "report"
    if resume and not tune.Tuner.can_restore(str(Path(storage) / name / "tune")):
        raise CommandError(f"--resume {name}: no sweep of that name under {storage}")
    data_dir = ensure_data(cfg, data_cache)
    check_data(data_dir)
    resolved = cfg.resolve()
    metric, mode = resolved["primary_metric"], resolved["metric_mode"]
    init_ray(address, num_cpus, dashboard=True)
    check_fits(cfg, data_dir)  # before any MLflow run exists: a refused sweep leaves none
    uri = tracking.tracking_uri(cfg)
    parent = tracking.get_or_create_run(uri, cfg.tracking.experiment, name,
                                        tags={"mmdist.sweep": "true"})
    tracking.log_params(uri, parent, {**cfg.flat(), "sweep.space": json.dumps(space),
                                      "sweep.metric": metric})
    print(f"[mmdist] sweep {name}: space {json.dumps(space)}; metric {metric} ({mode})",
          flush=True)

    tune_space = to_tune_space(space, cfg.tune.search)
    tune_space["_sweep"] = {"cfg": cfg.to_dict(), "name": name, "tracking_uri": uri,
                            "parent_run_id": parent, "data_dir": str(data_dir),
                            "storage": storage, "report_dir": str(report_dir)}
    scheduler = (ASHAScheduler(grace_period=cfg.tune.grace_period,
                               reduction_factor=cfg.tune.reduction_factor, max_t=10**6)
                 if cfg.tune.scheduler == "asha" else FIFOScheduler())
    trainable = tune.with_resources(trial_fn, {"CPU": TRIAL_CPUS})
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
            run_config=tune.RunConfig(name="tune", storage_path=tune_path, verbose=1))
    grid = tuner.fit()
    expected = expected_trials(tune_space, cfg.tune.num_samples)
    unfinished = _unfinished_trials(Path(tune_path) / "tune", expected)
    if unfinished:  # Ctrl+C: Tune saved its state and returned early
        raise CommandError(
            f"sweep {name} was interrupted with {unfinished} of {expected} trial(s) unfinished; "
            f"its state is saved under {tune_path}. Resume it with the same --config and "
            f"overrides: mmdist sweep --resume {name}")

    rows = _trial_rows(grid, metric, mode, report_dir)
    valid = [r for r in rows if not r["invalid"] and r["metric"] is not None]
    if not valid:
        raise CommandError(f"sweep {name}: no trial reported {metric}; see {tune_path}")
    best = (max if mode == "max" else min)(valid, key=lambda r: r["metric"])
    files = write_report(rows, grid, metric, mode, report_dir)
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
        "invalid_trials": sum(r["invalid"] for r in rows),
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
        invalid = bool((res.metrics or {}).get("invalid"))
        series = df[metric].dropna() if df is not None and metric in df else None
        best_val = None
        if series is not None and len(series):
            best_val = float(series.max() if mode == "max" else series.min())
        done = finished.get(json.dumps(conf, sort_keys=True))
        steps = int((res.metrics or {}).get("global_step", 0) or 0)
        row = {
            "overrides": conf, "metric": None if series is None or not len(series)
            else float(series.iloc[-1]), "best_metric_seen": best_val, "steps": steps,
            "invalid": invalid, "stopped_early": not invalid and done is None and res.error is None,
            "error": str(res.error)[:200] if res.error else "",
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


def write_report(rows: list[dict], grid, metric: str, mode: str, out: Path) -> list[Path]:
    """trials.csv, trials.md, heatmap.png (fusion x stage), curves.png (top trials)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import pandas as pd

    out.mkdir(parents=True, exist_ok=True)
    table = pd.DataFrame([{**r["overrides"], metric: r["metric"], "steps": r["steps"],
                           "stopped_early": r["stopped_early"], "invalid": r["invalid"],
                           "error": r["error"]} for r in rows])
    table = table.sort_values(metric, ascending=(mode == "min"), na_position="last")
    table.to_csv(out / "trials.csv", index=False)
    (out / "trials.md").write_text(table.to_markdown(index=False) if _has_tabulate()
                                   else table.to_string(index=False))
    files = [out / "trials.csv", out / "trials.md"]

    # Heat map: best metric per fusion method x stage.
    fusions = sorted({r["overrides"].get("model.fusion") for r in rows} - {None},
                     key=lambda f: FUSIONS.index(f))
    stages = sorted({r["overrides"].get("model.fusion_stage") for r in rows} - {None},
                    key=lambda s: FUSION_STAGES.index(s))
    if fusions:
        stages = stages or ["(fixed)"]
        grid_vals = [[math.nan] * len(stages) for _ in fusions]
        for r in rows:
            if r["metric"] is None:
                continue
            i = fusions.index(r["overrides"]["model.fusion"])
            j = stages.index(r["overrides"].get("model.fusion_stage", "(fixed)"))
            cur = grid_vals[i][j]
            better = max if mode == "max" else min
            grid_vals[i][j] = r["metric"] if math.isnan(cur) else better(cur, r["metric"])
        fig, ax = plt.subplots(figsize=(1.6 + 1.4 * len(stages), 1.2 + 0.5 * len(fusions)))
        im = ax.imshow(grid_vals, cmap="viridis" if mode == "max" else "viridis_r", aspect="auto")
        ax.set_xticks(range(len(stages)), stages)
        ax.set_yticks(range(len(fusions)), fusions)
        for i, row in enumerate(grid_vals):
            for j, v in enumerate(row):
                ax.text(j, i, "-" if math.isnan(v) else f"{v:.3f}", ha="center", va="center",
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
    ranked = [r for r in rows if r["metric"] is not None and r["history"] is not None]
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


def _print_summary(s: dict[str, Any]) -> None:
    print("\n" + "=" * 72)
    print(f"sweep        {s['name']}  (MLflow parent run {s['parent_run_id']})")
    print(f"trials       {s['trials']}  stopped early {s['stopped_early']}  "
          f"invalid {s['invalid_trials']}  trial-steps {s['trial_steps']}")
    print(f"best         {s['metric']} = {s['best_metric']:.4f}  with {s['best_config']}")
    if s["model_uri"]:
        print(f"model        {s['model_uri']}  (alias @{s['alias']})")
    print(f"report       {s['report_dir']}  (trials.csv, heatmap.png, curves.png)")
    print("=" * 72, flush=True)
