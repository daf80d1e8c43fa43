"""One trial of a sweep: the Tune function trainable that runs a multi-worker Ray Train trainer with
the trial's overrides, and forwards its validation reports to Tune."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from mmdist import tracking
from mmdist.config import Config
from mmdist.data.shards import read_manifest
from mmdist.train.retry import fit_with_retries
from mmdist.train.run import build_trainer, prepare_job
from mmdist.tune.space import refusal, trial_overrides


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
    # lazy: `mmdist --help` imports this module and must not load Ray or MLflow
    import ray.tune
    from mlflow.tracking import MlflowClient

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
    from ray.tune.integration.ray_train import TuneReportCallback  # heavy: not for --help

    class ValReportCallback(TuneReportCallback):
        def after_report(self, run_context, metrics, checkpoint):
            if any(k.startswith("val_") for k in metrics[0]):
                super().after_report(run_context, metrics, checkpoint)

    return ValReportCallback()


def trial_fn(config: dict[str, Any]) -> None:
    """Tune function trainable: one multi-worker Ray Train run with these overrides."""
    import ray.tune  # heavy: not for --help

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
    data_dir = Path(sweep["data_dir"])
    # the driver verified the shards and the feature cache entry before the trials; a sweep
    # started before it passed that on (resumed with --resume) verifies them here
    job, datasets = prepare_job(cfg, data_dir, trial_name, uri, run_id,
                                read_manifest(data_dir) if sweep.get("data_verified") else None,
                                sweep.get("feature_cache_entry"))
    result = fit_with_retries(  # the retry rule of `mmdist train`, per trial
        lambda: build_trainer(cfg, job, datasets, trial_name, sweep["storage"],
                              callbacks=[_val_report_callback()]),
        Path(job.storage), cfg.train.max_failures)
    tracking.set_terminated(uri, run_id, "FINISHED")
    out = result.return_value or {}
    out.update(checkpoint_path=result.checkpoint.path if result.checkpoint else None,
               mlflow_run_id=run_id, overrides=overrides)
    done = Path(sweep["report_dir"]) / "trials"
    done.mkdir(parents=True, exist_ok=True)
    (done / f"{trial_name}.json").write_text(json.dumps(out, default=str))
