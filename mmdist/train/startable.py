"""Whether a run can start at all, decided before any worker is asked for: the resources it
asks of the cluster, a shard set large enough for one step, class labels the head can output.

`mmdist train` and `mmdist sweep` refuse a run that could never start with every problem at
once (Ray Train would wait for workers forever, or torch fail deep inside the loss on every
attempt); `mmdist preflight` reports the same rules as checks before a submit.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from mmdist.config import Config, task_class
from mmdist.data.hf_audio import AudioFeatures
from mmdist.data.image_processor import image_processor_facts
from mmdist.data.shards import read_manifest
from mmdist.errors import CommandError

TRIAL_CPUS = 0.01  # the CPU a sweep trial's driver function reserves (mmdist.tune)



@dataclass
class Check:
    """One preflight check: its name, whether it passed, and what was found."""

    name: str
    ok: bool
    detail: str


# ---- resources ---------------------------------------------------------------------------------


def cluster_resources(ray) -> tuple[dict[str, float], list[dict[str, float]], str]:
    nodes = [n.get("Resources", {}) for n in ray.nodes() if n.get("Alive")]
    return dict(ray.cluster_resources()), nodes, f"the cluster ({len(nodes)} node(s))"


def local_resources(cfg: Config) -> tuple[dict[str, float], list[dict[str, float]]]:
    total = {"CPU": float(len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity")
                          else os.cpu_count() or 1)}
    if cfg.train.use_gpu:  # only then pay for importing torch
        import torch  # heavy: not loaded for --help

        total["GPU"] = float(torch.cuda.device_count())
    return total, [total]


def check_resources(cfg: Config, total: dict[str, float], nodes: list[dict[str, float]],
                    where: str = "the cluster", sweep: bool = False) -> Check:
    """Enough CPUs/GPUs in all, ``data.cpus_per_task`` left for a Ray Data task, and a node that
    fits one worker."""
    t = cfg.train
    trials = cfg.tune.max_concurrent_trials if sweep else 1
    data_cpus = cfg.data.cpus_per_task  # what each Ray Data read+preprocess task reserves
    worker_cpus = t.num_workers * t.cpus_per_worker * trials
    need_cpu = worker_cpus + data_cpus + (TRIAL_CPUS * trials if sweep else 0.0)
    need_gpu = float(t.num_workers * trials) if t.use_gpu else 0.0
    have_cpu, have_gpu = total.get("CPU", 0.0), total.get("GPU", 0.0)
    per_trial = (f" x {trials} concurrent trials (tune.max_concurrent_trials)"
                 if sweep and trials > 1 else "")
    asks = (f"train.num_workers={t.num_workers} x train.cpus_per_worker={t.cpus_per_worker:g}"
            f"{per_trial} = {worker_cpus:g} CPUs for workers + data.cpus_per_task="
            f"{data_cpus:g} for Ray Data"
            + (f" + {TRIAL_CPUS * trials:g} for trial drivers" if sweep else "")
            + f" = {need_cpu:g} CPUs" + (f", {need_gpu:g} GPUs (train.use_gpu=true)" if need_gpu else ""))
    has = f"{where} has {have_cpu:g} CPUs, {have_gpu:g} GPUs"
    problems = []
    if have_cpu + 1e-9 < need_cpu:
        problems.append(f"needs {need_cpu:g} CPUs, {has}")
    if have_gpu < need_gpu:
        problems.append(f"needs {need_gpu:g} GPUs, {has}")
    if nodes:
        biggest_cpu = max(n.get("CPU", 0.0) for n in nodes)
        biggest_gpu = max(n.get("GPU", 0.0) for n in nodes)
        if biggest_cpu < t.cpus_per_worker:
            problems.append(f"one worker needs train.cpus_per_worker={t.cpus_per_worker:g} CPUs "
                            f"on one node; the largest node has {biggest_cpu:g}")
        if t.use_gpu and biggest_gpu < 1:
            problems.append("one worker needs 1 GPU on one node; no node has a GPU")
    if problems:
        return Check("resources", False, "; ".join(problems) + f" ({asks})")
    return Check("resources", True, f"{has}; the config asks {asks}")


def data_size_problems(cfg: Config, counts: dict[str, Any], where: str) -> list[str]:
    """Problems with the row counts of a shard set (``manifest["counts"]``) for ``cfg``: a
    train split too small for one optimizer step, no val rows."""
    t = cfg.train
    train_rows, val_rows = int(counts.get("train_rows", 0)), int(counts.get("val_rows", 0))
    accum, per_step = t.grad_accum_steps, t.train_batch_size  # one optimizer step, all ranks
    problems = []
    if train_rows < per_step:
        problems.append(
            f"{where}: the train split has {train_rows} rows, fewer than one optimizer step "
            f"needs ({per_step} = train.micro_batch_size={t.micro_batch_size} x "
            f"train.num_workers={t.num_workers}" + (f" x {accum} accumulation steps" if accum > 1
                                                   else "")
            + "); prepare more rows or lower train.micro_batch_size")
    if val_rows < 1:
        problems.append(f"{where}: the val split has no rows (prepare with --val-fraction > 0 "
                        "and at least two rows)")
    return problems


def reads_labels(cfg: Config) -> bool:
    """Whether a task of ``cfg`` trains a class head on the ``label`` column."""
    m = cfg.model
    return any(task_class(t).reads_labels(m) for t in task_class(m.task).components(m))


def label_problems(cfg: Config, labels: dict[str, Any] | None, where: str) -> list[str]:
    """A class label the head cannot output (``manifest["labels"]``, see
    ``shards.label_summary``): torch would fail deep inside the loss, on every attempt."""
    if not labels or labels.get("max") is None or not reads_labels(cfg):
        return []
    n, top = cfg.model.num_classes, int(labels["max"])
    if top < n or n == 0:  # 0: taken from these labels (with_data_defaults)
        return []
    return [f"model.num_classes={n} but the data has labels up to {top} ({where}): set "
            f"model.num_classes={top + 1} (labels count from 0)"]


def with_data_defaults(cfg: Config, manifest: dict[str, Any]) -> Config:
    """``cfg`` with what the data and the pretrained parts decide: ``model.num_classes`` from
    the shards' largest label when it is 0 (a task with a class head); ``model.aux_classes``
    from the per-modality labels the shards have (``manifest["modality_labels"]``) when unset,
    so auxiliary per-modality objectives are on whenever the labels allow; the preprocessing a
    pretrained encoder expects (:func:`processor_settings`).

    Raises:
        CommandError: ``model.num_classes=0`` and the shards record no class label.
    """
    cfg = processor_settings(cfg)
    m, changes = cfg.model, {}
    if m.num_classes == 0 and reads_labels(cfg):
        top = (manifest.get("labels") or {}).get("max")
        if top is None:
            raise CommandError(f"model.num_classes=0 takes the classes from the data, and the "
                             f"shards of task {m.task} record no class label (column `label`): "
                             "prepare them with labels or set model.num_classes")
        changes["model.num_classes"] = max(2, int(top) + 1)
    if not m.aux_classes and m.aux_weight > 0:
        found = {mod: int(s["max"]) + 1
                 for mod, s in (manifest.get("modality_labels") or {}).items()
                 if s and s.get("max") is not None and mod in m.modalities and s["max"] >= 1}
        if found:
            changes["model.aux_classes"] = found
    return cfg.override(changes) if changes else cfg


def processor_settings(cfg: Config) -> Config:
    """A pretrained encoder sees what it was trained on: its image processor's side sets
    ``data.image_size`` (its mean and std are applied inside the encoder), its feature
    extractor's rate sets ``data.sample_rate`` (its features replace mmdist's log-mel)."""
    m, changes = cfg.model, {}
    encodes = m.fusion_stage != "early"
    if encodes and m.image_pretrained and Path(m.image_pretrained).is_dir() \
            and "image" in m.modalities:
        changes["data.image_size"] = int(image_processor_facts(m.image_pretrained)["size"])
    if encodes and m.audio_pretrained and "audio" in m.modalities:
        rate = AudioFeatures(m.audio_pretrained).sampling_rate
        changes["data.sample_rate"] = rate
    flat = cfg.flat()
    changed = {k: v for k, v in changes.items() if flat[k] != v}
    return cfg.override(changed) if changed else cfg


def storage_problem(folder: str | Path, key: str = "train.storage_path") -> str | None:
    """Why a local folder cannot hold a run (checkpoints, its log, its sample ledger), found
    by creating it and writing a file there; None when it can, or for a remote URI (Ray Train
    writes those through pyarrow; ``mmdist preflight`` checks them from a worker)."""
    text = str(folder)
    if "://" in text and not text.startswith("file://"):
        return None
    path = Path(text.removeprefix("file://"))
    probe = path / f".mmdist-write-check-{os.getpid()}"
    try:
        path.mkdir(parents=True, exist_ok=True)
        probe.write_bytes(b"ok")
        probe.unlink()
    except OSError as e:
        return (f"{key}={path}: cannot write there ({type(e).__name__}: {e.strerror or e}); "
                "checkpoints, the run's log and its sample ledger go there: set a writable "
                "folder")
    return None


def data_problems(cfg: Config, manifest: dict[str, Any], where: str) -> list[str]:
    """Every problem of a shard set for ``cfg``: its size (:func:`data_size_problems`) and its
    labels (:func:`label_problems`)."""
    return (data_size_problems(cfg, manifest.get("counts") or {}, where)
            + label_problems(cfg, manifest.get("labels"), where))


def require_startable(cfg: Config, data_dir: str | Path) -> None:
    """Refuse a training run that could never start, once Ray is up and before any worker is
    asked for: more CPUs/GPUs than the connected cluster has (Ray Train would wait for them
    forever) or a shard set too small for one step. Every problem is listed at once.

    On an autoscaling cluster that will grow to fit, set ``MMDIST_SKIP_RESOURCE_CHECK=1``.

    Raises:
        CommandError: naming the keys, the resources asked for and what the cluster has.
    """
    import ray  # heavy: not loaded for --help

    problems = []
    if not os.environ.get("MMDIST_SKIP_RESOURCE_CHECK"):
        res = check_resources(cfg, *cluster_resources(ray))
        if not res.ok:
            problems.append(f"resources: {res.detail} (an autoscaling cluster that will grow: "
                            "set MMDIST_SKIP_RESOURCE_CHECK=1)")
    problems += data_problems(cfg, read_manifest(data_dir), f"data {data_dir}")
    if problems:
        raise CommandError(f"this run cannot start: {len(problems)} problem(s):\n"
                           + "\n".join(f"  - {p}" for p in problems))
