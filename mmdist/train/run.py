"""`mmdist train`: the driver of a training run.

setup (data, Ray, MLflow run) -> Ray Train's fit() on N workers -> register the consolidated
model -> summary. The same function runs locally and under ``ray job submit`` (jobs/train.py).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import shutil
import time
import uuid
from pathlib import Path
from typing import Any

from mmdist.arguments import add_config_arguments, add_ray_arguments
from mmdist.config import Config, load_config
from mmdist.console import Console
from mmdist.data.generated import synthetic_source_name
from mmdist.data.prepare import prepare_synthetic
from mmdist.data.shards import ManifestError, shard_labels, verify_manifest
from mmdist.errors import CommandError
from mmdist.ray_env import init_ray, release_ray
from mmdist.train import checkpoint as ckpt_lib
from mmdist.train.deepspeed_config import deepspeed_config
from mmdist.train.elastic import plan_resume
from mmdist.train.faults import from_environ
from mmdist.train.job import Job
from mmdist.train.retry import fit_with_retries
from mmdist.train.run_opener import RunOpener
from mmdist.train.startable import (
    label_problems,
    require_startable,
    storage_problem,
    with_data_defaults,
)
from mmdist.train.watch import phase_clock


def configure_parser(parser: argparse.ArgumentParser) -> None:

    add_config_arguments(parser)
    add_ray_arguments(parser)
    parser.add_argument("--data-cache", default=None,
                        help="where synthetic shards are written when data.path is not set "
                             "(default: <train.storage_path>/data when a storage path is set, "
                             "shared by all nodes of a cluster; else .cache/data)")
    parser.add_argument("--verbose", action="store_true",
                        help="show Ray's, DeepSpeed's and the workers' own output as Ray prints "
                             "it (default: in the run's log file, <storage>/<run>/mmdist.log)")


def run(args: argparse.Namespace) -> dict[str, Any]:
    opener = RunOpener()  # imports MLflow beside the config, torch and Ray loading here
    try:
        cfg = load_config(args.config, args.overrides)
        if not cfg.train.run_name:  # named now: its folder holds the log from the first line on
            cfg = cfg.override({"train.run_name": default_run_name(cfg)})
        log_file = run_log_file(cfg)
        problem = storage_problem(log_file.parent.parent)
        if problem:
            raise CommandError(problem)
        with Console(log_file, verbose=args.verbose) as console:
            summary = train(cfg, address=args.address, num_cpus=args.num_cpus,
                            data_cache=args.data_cache, console=console,
                            started_at=getattr(args, "started_at", None), run_opener=opener,
                            placement_group_cleaner=False)  # the job ends with the command
            release_ray()
    finally:
        opener.close()
    _print_summary({**summary, "log_file": str(log_file)})
    return {**summary, "log_file": str(log_file)}


def run_log_file(cfg: Config) -> Path:
    """Where a run's library output goes: ``<train.storage_path>/<run name>/mmdist.log``."""
    return (Path(cfg.train.storage_path or "runs").resolve() / str(cfg.train.run_name)
            / "mmdist.log")


def default_run_name(cfg: Config) -> str:
    m = cfg.model
    return f"{m.task}-{m.fusion}-{m.fusion_stage}-{uuid.uuid4().hex[:6]}"


def ensure_data(cfg: Config, data_cache: str | Path | None = None) -> Path:
    """The shard directory: data.path, or shards of ``data.synthetic_source`` prepared (once)
    for this config."""
    if cfg.data.path:
        return Path(cfg.data.path).resolve()
    if data_cache is None:
        data_cache = (Path(cfg.train.storage_path) / "data" if cfg.train.storage_path
                      else Path(".cache/data"))
    d = cfg.data
    key = (f"{synthetic_source_name(cfg)}-n{d.synthetic_samples}-s{cfg.train.seed}"
           f"-img{d.image_size}-sr{d.sample_rate}-a{d.audio_seconds}-v{d.vocab_size}"
           f"-val{d.val_fraction}")
    out = Path(data_cache).resolve() / key
    prepare_synthetic(out, cfg, seed=cfg.train.seed)
    return out


def check_data(data_dir: Path, cfg: Config | None = None) -> dict[str, Any]:
    """Before Ray starts: refuse shards whose checksums do not match the manifest and, given
    ``cfg``, class labels beyond ``model.num_classes``; return the verified manifest, which the
    run's datasets then use without reading every shard again. (Size and resource problems
    are reported together once Ray is up: :func:`mmdist.train.startable.require_startable`.)"""

    try:
        manifest = verify_manifest(data_dir)
    except ManifestError as e:
        raise CommandError(str(e)) from None
    if cfg is None:
        return manifest
    problems = label_problems(cfg, shard_labels(data_dir, manifest), f"data {data_dir}")
    problems += tokenizer_problems(cfg, data_dir)
    if problems:
        raise CommandError(f"this run cannot start: {len(problems)} problem(s):\n"
                           + "\n".join(f"  - {p}" for p in problems))
    return manifest


def tokenizer_problems(cfg: Config, data_dir: Path) -> list[str]:
    """A pretrained LM reads token ids of its own tokenizer only: shards prepared with another
    one would train it on the wrong words."""
    lm = cfg.model.decoder_pretrained
    if not lm or not (Path(lm) / "tokenizer.json").exists():
        return []
    from mmdist.data.tokenizer import TextTokenizer  # light: tokenizers only

    theirs = TextTokenizer.load(lm).tokenizer.get_vocab(with_added_tokens=True)
    ours = TextTokenizer.load(data_dir / "tokenizer").tokenizer.get_vocab(with_added_tokens=True)
    if theirs == ours:
        return []
    return [f"data.path={data_dir}: its shards were tokenised with another tokenizer than "
            f"model.decoder_pretrained={lm!r}'s; prepare them again with `mmdist prepare ... "
            f"--tokenizer {lm}`"]


def check_resumable(cfg: Config, run_dir: Path) -> Config:
    """Before anything starts: a run name with checkpoints resumes the newest complete one;
    refuse it now, with the reason, if the workers could not load it. Returns ``cfg``, set to
    run ZeRO on one worker as the checkpoint was written (an older mmdist ran ZeRO-1/2 there;
    a checkpoint of more workers re-partitions into a ZeRO-1/2 engine only)."""

    chosen, skipped = ckpt_lib.choose_checkpoint(run_dir)
    for note in skipped:
        print(f"[mmdist] WARNING: skipping incomplete checkpoint {note}", flush=True)
    if chosen is None:
        return cfg
    t, written = cfg.train, ckpt_lib.stage_written(chosen)
    saved_world = plan_resume(run_dir, t.num_workers).saved_world
    if (t.num_workers == 1 and t.zero_stage in (1, 2) and written in (0, t.zero_stage)
            and written != t.zero_stage_at()):
        cfg = cfg.override({"train.zero_on_one_worker": written != 0})
        why = (f": a checkpoint of {saved_world} workers is re-partitioned through a DeepSpeed "
               "universal checkpoint, which loads into a ZeRO-1/2 engine only"
               if saved_world != 1 and written else "")
        print(f"[mmdist] run {run_dir.name}: its checkpoint was written at ZeRO-{written}; "
              f"resuming at ZeRO-{written} (train.zero_on_one_worker="
              f"{str(written != 0).lower()}){why}", flush=True)
    try:
        ckpt_lib.check_resume(chosen, cfg.train.num_workers, cfg.train.zero_stage_at(),
                              cfg.to_dict()["model"])
    except ValueError as e:
        raise CommandError(f"run {run_dir.name}: {e}") from None
    moved = ""
    if saved_world != cfg.train.num_workers:
        moved = (f", written by {saved_world} worker(s), on {cfg.train.num_workers} at "
                 f"ZeRO-{cfg.train.zero_stage_at()}" + (
                     ": its optimizer state is re-partitioned through a DeepSpeed universal "
                     "checkpoint; steps and the LR schedule continue" if written else ""))
    print(f"[mmdist] run {run_dir.name} resumes from {chosen.name}{moved}", flush=True)
    return cfg


def build_trainer(cfg: Config, job: Job, datasets: dict, run_name: str,
                  storage_path: str, callbacks: list | None = None,
                  placement_group_cleaner: bool = True):
    """The Ray Train trainer for one run; shared by `mmdist train` and every sweep trial.
    ``placement_group_cleaner=False`` where the driver's job ends with the run
    (:func:`mmdist.train.backend.trainer_and_backend`)."""
    # heavy (Ray/torch): `mmdist --help` imports this module to build its parser
    from ray.train import CheckpointConfig, FailureConfig, RunConfig, ScalingConfig

    from mmdist.data.pipeline import worker_shards
    from mmdist.train.backend import trainer_and_backend
    from mmdist.train.entry import train_fn_per_worker

    t = cfg.train
    resources = {"CPU": t.cpus_per_worker}
    if t.use_gpu:
        resources["GPU"] = 1
    trainer_cls, backend = trainer_and_backend(t.use_gpu, placement_group_cleaner)
    # train split across the workers, val whole for each (worker_shards: made here, not by
    # Ray Train's datasets=, so its coordinator starts beside Ray Train's controller)
    shards = worker_shards(datasets, t.num_workers, cfg.data.deterministic)
    return trainer_cls(
        train_fn_per_worker,
        **backend,
        train_loop_config={"cfg": cfg.to_dict(), "job": job.to_dict(), "data": shards},
        scaling_config=ScalingConfig(num_workers=t.num_workers, use_gpu=t.use_gpu,
                                     resources_per_worker=resources),
        run_config=RunConfig(
            name=run_name, storage_path=storage_path,
            # mmdist decides retries (train.retry.fit_with_retries); Ray keeps preemptions
            failure_config=FailureConfig(max_failures=0),
            checkpoint_config=CheckpointConfig(num_to_keep=t.keep_checkpoints),
            callbacks=callbacks),
    )


def prepare_job(cfg: Config, data_dir: Path, run_name: str, uri: str | None,
                run_id: str | None, manifest: dict[str, Any] | None,
                feature_cache_entry: str | None = None) -> tuple[Job, dict]:
    """What every worker needs beyond the config, and the Ray Datasets.

    ``manifest``: the shard manifest :func:`check_data` verified (None: verify it here);
    ``feature_cache_entry``: a feature-cache entry the sweep's driver verified (taken without
    hashing its shards again when it is this config's entry)."""
    from mmdist.data.pipeline import build_datasets  # loads Ray: not --help
    from mmdist.data.shards import load_tokenizer
    from mmdist.models.feature_build import feature_cache_for

    manifest = manifest or verify_manifest(data_dir)
    tok = load_tokenizer(data_dir)
    job = Job(data_dir=str(data_dir), train_rows=int(manifest["counts"]["train_rows"]),
              vocab=tok.model_vocab(), run_name=run_name,
              storage=str(Path(cfg.train.storage_path or "runs").resolve() / run_name),
              tracking_uri=uri, mlflow_run_id=run_id, faults=from_environ(),
              labels=manifest.get("labels"))
    # model.init_from, downloaded once per run (each sweep trial is a run of its own)
    job = dataclasses.replace(job, init_dir=init_from_dir(cfg, uri, Path(job.storage)))
    # frozen encoders' outputs, computed once per key (data.feature_cache), else raw media
    cache = feature_cache_for(cfg, data_dir, verified_entry=feature_cache_entry,
                              source=manifest)
    return job, build_datasets(data_dir, cfg, cache, manifest=manifest)


def init_from_dir(cfg: Config, tracking_uri: str, run_storage: Path) -> str | None:
    """A local mmdist model directory for ``model.init_from``: the directory itself, or a
    registered model / run (``models:/NAME@ALIAS``, ``models:/NAME/VERSION``,
    ``runs:/RUN_ID/model``) downloaded once into the run's storage (a resumed run reuses it).

    Raises:
        CommandError: not found (the message names the key and the URI).
    """
    src = cfg.model.init_from
    if not src:
        return None
    if Path(src).is_dir():
        return str(Path(src).resolve())
    if not src.startswith(("models:/", "runs:/")):
        raise CommandError(f"model.init_from={src!r}: not a model directory here, nor a "
                           "models:/NAME@ALIAS, models:/NAME/VERSION or runs:/RUN_ID/model URI")
    from mmdist import tracking  # heavy (MLflow): not for --help

    dst = run_storage / "init_from"
    if not (dst / "config.json").exists():
        shutil.rmtree(dst, ignore_errors=True)
        try:
            tracking.download_model(src, dst, tracking_uri)
        except Exception as e:  # MLflow's own errors: not found, no such alias
            raise CommandError(f"model.init_from={src!r}: {e}") from None
    print(f"[mmdist] starting from {src} ({dst})", flush=True)
    return str(dst)


def train(cfg: Config, address: str | None = None, num_cpus: int | None = None,
          data_cache: str | Path | None = None, console: Console | None = None,
          started_at: float | None = None,
          run_opener: RunOpener | None = None,
          placement_group_cleaner: bool = True) -> dict[str, Any]:
    """Run one training job end to end and return its summary (what `--json` prints);
    ``console`` (the CLI's) sorts what Ray forwards from the workers once Ray is up.
    ``started_at``: when the command started (``time.time()``); its start-up counts from
    there, the seconds before this call being the ``command`` phase (interpreter, imports).
    ``run_opener``: the helper that opens the MLflow run (the command starts it first; else
    one starts here). ``placement_group_cleaner=False``: this process's connection to Ray ends
    with the run, as the command's does (:func:`mmdist.train.backend.trainer_and_backend`)."""
    opener = run_opener or RunOpener()
    try:
        return _train(cfg, address, num_cpus, data_cache, console, started_at, opener,
                      placement_group_cleaner)
    finally:
        opener.close()


def _train(cfg: Config, address: str | None, num_cpus: int | None,
           data_cache: str | Path | None, console: Console | None, started_at: float | None,
           opener: RunOpener, placement_group_cleaner: bool) -> dict[str, Any]:
    # heavy (MLflow): not for --help
    from mmdist import tracking
    from mmdist.train.register import register_model

    t0 = time.perf_counter()
    phases, mark = phase_clock(started_at)
    data_dir = ensure_data(cfg, data_cache)
    manifest = check_data(data_dir, cfg)
    cfg = with_data_defaults(cfg, manifest)
    run_name = cfg.train.run_name or default_run_name(cfg)
    storage = str(Path(cfg.train.storage_path or "runs").resolve())
    cfg = check_resumable(cfg, Path(storage) / run_name)
    mark("data_checks")
    init_ray(address, num_cpus, dashboard=True)
    if console:
        console.attach_ray()
    require_startable(cfg, data_dir)  # resources + data size, or refuse now
    mark("ray_init")

    uri = tracking.tracking_uri(cfg)
    job, datasets = prepare_job(cfg, data_dir, run_name, uri, None, manifest)
    mark("datasets")  # while the helper opens the MLflow run
    resolved = cfg.resolve()
    run_id = opener.open(uri, cfg.tracking.experiment, run_name, {
        **cfg.flat(), **{f"derived.{k}": v for k, v in resolved.items()},
        "deepspeed_config": json.dumps(deepspeed_config(cfg))})
    job = dataclasses.replace(job, mlflow_run_id=run_id)
    print(f"[mmdist] run {run_name}: MLflow run {run_id} at {uri}", flush=True)
    mark("mlflow_run")
    job = dataclasses.replace(job, started_at=phases.pop("_start"), driver_phases=phases)
    try:
        result = fit_with_retries(
            lambda: build_trainer(cfg, dataclasses.replace(job, fit_at=time.time()), datasets,
                                  run_name, storage,
                                  placement_group_cleaner=placement_group_cleaner),
            Path(job.storage), cfg.train.max_failures)
    except BaseException:
        tracking.set_terminated(uri, run_id, "FAILED")
        raise
    out = result.return_value or {}
    metrics = out.get("metrics") or {k: v for k, v in result.metrics.items()
                                      if k.startswith("val_")}
    # metric values rank 0 could not deliver (tracking server down at the end of training)
    delivered_late = tracking.deliver_pending(uri, run_id, out.get("mlflow_pending") or [])
    reg = {"model_uri": None, "alias": None, "version": None}
    if cfg.tracking.register:
        with result.checkpoint.as_directory() as ckpt_dir:
            reg = register_model(uri, run_id, Path(ckpt_dir) / "model", cfg, metrics,
                                 checkpoint=result.checkpoint.path, data_dir=data_dir)
    tracking.retry(lambda: tracking.set_terminated(uri, run_id, "FINISHED"),
                   "closing the MLflow run")
    return {
        "ok": True,
        "run_id": run_id,
        "run_name": run_name,
        "model_uri": reg["model_uri"],
        "alias": reg["alias"],
        "alias_error": reg.get("alias_error"),
        "global_step": int(out.get("global_step", result.metrics.get("global_step", 0))),
        "bad_steps": int(out.get("bad_steps_total", 0)),
        "resumes": out.get("resumes", []),
        "mlflow_failed_flushes": int(out.get("mlflow_failed_flushes", 0)),
        "mlflow_delivered_late": delivered_late,
        "metrics": metrics,
        "seconds": round(time.perf_counter() - t0, 1),
        # to the first optimizer step of the last attempt, and by phase
        "startup_seconds": out.get("startup_seconds"),
        "startup_phases": out.get("startup_phases") or {},
        "tracking_uri": uri,
        "checkpoint": result.checkpoint.path if result.checkpoint else None,
        "data_dir": str(data_dir),
    }


def _print_summary(s: dict[str, Any]) -> None:
    print("\n" + "=" * 72)
    print(f"run          {s['run_name']}  (MLflow run {s['run_id']})")
    print(f"steps        {s['global_step']} in {s['seconds']:.0f} s")
    if s.get("startup_seconds") is not None:
        slowest = sorted(s["startup_phases"].items(), key=lambda kv: -kv[1])[:3]
        print(f"first step   {s['startup_seconds']:.1f} s after start (slowest: "
              + ", ".join(f"{k} {v:.1f} s" for k, v in slowest) + ")")
    for k, v in sorted(s["metrics"].items()):
        print(f"{k:<12} {v:.4f}")
    if s["model_uri"]:
        print(f"model        {s['model_uri']}  "
              + (f"(alias @{s['alias']})" if s["alias"] else "(no alias: see above)"))
    print(f"tracking     {s['tracking_uri']}")
    if s.get("log_file"):
        print(f"log          {s['log_file']}  (Ray, DeepSpeed, workers; --verbose shows them)")
    if s["tracking_uri"].startswith("sqlite:///"):
        print(f"open the UI  mlflow ui --backend-store-uri {s['tracking_uri']} --host 127.0.0.1")
    print("=" * 72, flush=True)
