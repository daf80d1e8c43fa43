"""`mmdist evaluate`: the task's metrics of a model on a shard set, distributed with Ray Data,
logged to MLflow against the model version.

    mmdist evaluate --model models:/mmdist-demo@champion --data .cache/data/<set> --json
"""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

from mmdist import tracking
from mmdist.arguments import add_ray_arguments
from mmdist.console import Console
from mmdist.ray_env import init_ray, release_ray
from mmdist.serve.predict import resolve_model_dir
from mmdist.serve.pull import source_run

LOG_NAME = "evaluate.log"  # in the --cache folder: Ray's, Ray Data's and MLflow's own output


def configure_parser(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--model", required=True, metavar="URI_OR_DIR",
                        help="models:/NAME@ALIAS, models:/NAME/VERSION, runs:/RUN_ID/model or a "
                             "model directory")
    parser.add_argument("--data", required=True, metavar="DIR",
                        help="shard directory written by `mmdist prepare` (checksums verified)")
    parser.add_argument("--split", default="val", choices=("train", "val"),
                        help="which split to score (default: val)")
    parser.add_argument("--actors", type=int, default=1,
                        help="model replicas in the Ray Data actor pool (default: 1)")
    parser.add_argument("--use-gpu", action="store_true", help="one GPU per actor")
    add_ray_arguments(parser, num_cpus=False)
    parser.add_argument("--tracking-uri", default=None,
                        help="MLflow tracking URI (default: $MLFLOW_TRACKING_URI, else ./mlflow.db)")
    parser.add_argument("--no-log", action="store_true",
                        help="do not log the metrics to MLflow")
    parser.add_argument("--cache", default=".cache/models", help="where pulled models are kept")
    parser.add_argument("--verbose", action="store_true",
                        help="show Ray's and the libraries' own output as they print it "
                             f"(default: in <--cache>/{LOG_NAME})")


def log_evaluation(tracking_uri: str, model_uri: str, split: str, data: str,
                   metrics: dict[str, float]) -> str | None:
    """An MLflow evaluation run tagged with the model version; the version gets the metrics as
    tags too. Returns the run id."""
    from mlflow.tracking import MlflowClient  # heavy: not loaded for --help

    run_id, version = source_run(model_uri, tracking_uri)
    client = MlflowClient(tracking_uri)
    exp_id = client.get_run(run_id).info.experiment_id
    tags = {"mmdist.evaluation": "true", "mmdist.model_uri": model_uri,
            "mmdist.source_run_id": run_id, "mmdist.data": data, "mmdist.split": split}
    if version:
        tags.update({"mmdist.model_name": version["name"],
                     "mmdist.model_version": str(version["version"])})
    eval_run = client.create_run(exp_id, run_name=f"evaluate-{split}", tags=tags).info.run_id
    logger = tracking.MetricsLogger(tracking_uri, eval_run)
    logger.log(metrics, 0)
    logger.flush(raise_on_error=True)
    client.set_terminated(eval_run)
    if version:
        for k, v in metrics.items():
            client.set_model_version_tag(version["name"], version["version"],
                                         f"eval.{split}.{k}", f"{v:.6f}")
    return eval_run


def run(args: argparse.Namespace) -> dict[str, Any]:
    from mmdist.serve.batch import evaluate_distributed  # loads torch: not for --help

    turi = args.tracking_uri or tracking.tracking_uri()
    log_file = Path(args.cache).resolve() / LOG_NAME
    with Console(log_file, verbose=args.verbose) as console:
        model_dir = resolve_model_dir(args.model, turi, args.cache)
        init_ray(args.address)
        console.attach_ray()
        metrics = evaluate_distributed(model_dir, args.data, args.split, actors=args.actors,
                                       use_gpu=args.use_gpu)
        eval_run = None
        is_uri = args.model.startswith(("models:/", "runs:/"))
        if is_uri and not args.no_log:
            eval_run = log_evaluation(turi, args.model, args.split, str(args.data), metrics)
        release_ray()
    if not args.json:
        print(f"{args.model} on {args.data} ({args.split}):")
        for k, v in sorted(metrics.items()):
            print(f"  {k:<16} {v:.4f}")
        if eval_run:
            print(f"logged to MLflow run {eval_run}")
        if not args.verbose:
            print(f"Ray's and the libraries' own output: {log_file}")
    return {"ok": True, "model": args.model, "split": args.split, "metrics": metrics,
            "mlflow_run_id": eval_run, "log_file": str(log_file)}
