"""Building feature-cache entries (``mmdist.data.feature_cache`` says what and why).

A Ray Data stage, ``read_parquet(source shards) -> map_batches(FeatureEncoder)`` on an actor
pool (each actor loads the frozen backbones once; one GPU per actor when the cluster has GPUs,
fractions of the CPUs otherwise), whose output the driver writes as Parquet feature shards with
their sha256 in ``cache_manifest.json``: one feature shard per source shard, the same rows in
the same order (Ray Data keeps the order here), so a run reading the cache sees the blocks, and
so the batches, that it would see reading the source shards.

    cache = feature_cache_for(cfg, data_dir)   # None, or the entry's verified manifest
    datasets = build_datasets(data_dir, cfg, cache)
"""

from __future__ import annotations

import json
import shutil
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from mmdist.data.feature_cache import (
    FORMAT,
    cache_plan,
    entry_lock,
    read_cache_manifest,
    verify_cache,
    write_cache_manifest,
)
from mmdist.data.feature_read import PLACEHOLDER
from mmdist.data.preprocess import PreprocessSpec, preprocess_batch
from mmdist.data.shards import sha256_file, verify_manifest

if TYPE_CHECKING:
    from mmdist.config import Config
    from mmdist.data.feature_cache import CachePlan

ENCODE_BATCH = 32  # rows per encoder forward pass in the build
BUILDS_LOG = ".builds.jsonl"  # one line per build under the cache root (what tests count)


class FeatureEncoder:
    """Ray Data actor UDF: raw shard rows (a pyarrow Table) -> the same rows less the cached
    media, plus ``<m>_features``/``<m>_feature_mask`` (raw bytes per row), ``<m>_shape`` and
    ``has_<m>``, from the frozen backbones (``features()`` of the HF encoders)."""

    def __init__(self, cfg: dict[str, Any], modalities: list[str], spec: dict[str, Any],
                 tokenizer_dir: str, device: str, threads: int):
        import torch

        from mmdist.config import Config
        from mmdist.data.tokenizer import TextTokenizer
        from mmdist.models.builder import _hf_encoder

        torch.set_num_threads(max(1, threads))
        c = Config.from_dict(cfg)
        self.device = torch.device(device)
        self.modalities = list(modalities)
        # the projector (width 8) is built and never used: only the backbone runs
        self.encoders = {m: _hf_encoder(c.model, m, 8, {}, 0).eval().to(self.device)
                         for m in self.modalities}
        self.spec = PreprocessSpec(**spec)
        self.tokenizer = TextTokenizer.load(tokenizer_dir)

    def __call__(self, table: pa.Table) -> pa.Table:
        import torch

        from mmdist.data.preprocess import arrow_to_numpy

        batch = preprocess_batch(arrow_to_numpy(table), self.spec, self.tokenizer)
        drop = set(self.modalities) & set(PLACEHOLDER)  # text stays: ids and masks come from it
        out = {c: table.column(c) for c in table.column_names if c not in drop}
        with torch.inference_mode():
            for m in self.modalities:
                enc = self.encoders[m]
                if m == "text":
                    h, mask = enc.features(torch.from_numpy(batch["input_ids"]).to(self.device),
                                           torch.from_numpy(batch["attention_mask"]).to(
                                               self.device))
                else:
                    h, mask = enc.features(torch.from_numpy(batch[m]).to(self.device))
                h = h.float().cpu().numpy()
                mask = mask.cpu().numpy().astype(np.uint8)
                out[f"{m}_features"] = pa.array([r.tobytes() for r in h], pa.binary())
                out[f"{m}_feature_mask"] = pa.array([r.tobytes() for r in mask], pa.binary())
                out[f"{m}_shape"] = pa.array([",".join(map(str, h.shape[1:]))] * len(h))
                out[f"has_{m}"] = pa.array(batch[f"has_{m}"])
        return pa.table(out)


def _resources() -> tuple[dict[str, Any], str, int]:
    """``map_batches`` resources, the device and torch threads of each encoder actor."""
    import ray.data

    total = ray.cluster_resources()
    gpus, cpus = int(total.get("GPU", 0)), float(total.get("CPU", 1))
    if gpus:
        return ({"num_gpus": 1, "num_cpus": 1,
                 "compute": ray.data.ActorPoolStrategy(min_size=1, max_size=gpus)}, "cuda", 4)
    n = max(1, round(cpus - 0.5))  # beside the read tasks (0.5 CPU each)
    per = max(0.25, (cpus - 0.5) / n)
    return ({"num_cpus": per, "compute": ray.data.ActorPoolStrategy(min_size=1, max_size=n)},
            "cpu", max(1, int(per)))


def build_entry(plan: CachePlan, cfg: Config, source: dict[str, Any] | None = None
                ) -> dict[str, Any]:
    """Run the frozen encoders over every split of ``plan.data_dir`` into ``plan.entry``.
    ``source``: the shard manifest the caller verified (None: verify it here)."""
    import ray.data

    from mmdist.data.pipeline import audio_dir
    from mmdist.data.shard_source import ShardDatasource

    t0 = time.time()
    source = source or verify_manifest(plan.data_dir)
    spec = PreprocessSpec.from_config(cfg.data, augment=False, audio_features=audio_dir(cfg))
    res, device, threads = _resources()
    plan.entry.mkdir(parents=True, exist_ok=True)
    files: list[dict[str, Any]] = []
    shapes: dict[str, list[int]] = {}
    for split in ("train", "val"):
        shards = [s for s in source["shards"] if s["split"] == split]
        if not shards:
            continue
        paths = [str(Path(plan.data_dir) / s["path"]) for s in shards]
        rows_per_file = [s["rows"] for s in shards]
        ds = ray.data.read_datasource(ShardDatasource(paths), override_num_blocks=len(paths),
                                      num_cpus=cfg.data.cpus_per_task)
        ds = ds.map_batches(
            FeatureEncoder, batch_size=ENCODE_BATCH, batch_format="pyarrow",
            fn_constructor_kwargs={"cfg": cfg.to_dict(), "modalities": list(plan.modalities),
                                   "spec": spec.to_dict(), "device": device,
                                   "threads": threads,
                                   "tokenizer_dir": str(Path(plan.data_dir) / source.get(
                                       "tokenizer", "tokenizer"))}, **res)
        ds.context.enable_progress_bars = False
        ds.context.execution_options.preserve_order = True
        files += _write_split(ds, plan, split, paths, rows_per_file, shapes)
    rows = sum(f["rows"] for f in files)
    manifest = {"format": FORMAT, "key": plan.key, "parts": plan.parts,
                "modalities": list(plan.modalities), "source": str(plan.data_dir),
                "shapes": shapes, "files": files, "rows": rows, "encoded_rows": rows,
                "device": device, "built_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
                "build_seconds": round(time.time() - t0, 2)}
    write_cache_manifest(plan.entry, manifest)
    with open(plan.entry.parent / BUILDS_LOG, "a") as fh:
        fh.write(json.dumps({"key": plan.key, "rows": rows, "at": manifest["built_at"]}) + "\n")
    return manifest


def _write_split(ds: Any, plan: CachePlan, split: str, paths: list[str],
                 rows_per_file: list[int], shapes: dict[str, list[int]]) -> list[dict[str, Any]]:
    """Write the encoded rows of ``split`` (in source order) as one feature shard per source
    shard: ``rows_per_file[i]`` rows under ``paths[i]``'s file name (empty shards have none)."""
    out_dir = plan.entry / split
    out_dir.mkdir(parents=True, exist_ok=True)
    todo = [(Path(p).name, r) for p, r in zip(paths, rows_per_file, strict=True) if r > 0]
    files: list[dict[str, Any]] = []
    held: list[pa.Table] = []
    n = 0
    for batch in ds.iter_batches(batch_size=None, batch_format="pyarrow", prefetch_batches=0):
        held.append(batch)
        n += batch.num_rows
        while len(files) < len(todo) and n >= todo[len(files)][1]:
            name, want = todo[len(files)]
            table = pa.concat_tables(held)
            rest = table.slice(want)
            held, n = ([rest] if rest.num_rows else []), rest.num_rows
            table = table.slice(0, want)
            for m in plan.modalities:
                shapes[m] = [int(x) for x in table.column(f"{m}_shape")[0].as_py().split(",")]
            path = out_dir / name
            pq.write_table(table.drop_columns([f"{m}_shape" for m in plan.modalities]), path)
            files.append({"path": f"{split}/{name}", "split": split, "rows": want,
                          "sha256": sha256_file(path)})
    if n or len(files) != len(todo):
        raise RuntimeError(f"feature cache {plan.key}: the encoders returned "
                           f"{sum(f['rows'] for f in files) + n} {split} rows for the "
                           f"{sum(rows_per_file)} rows of {len(paths)} source shards")
    return files


def ensure_cache(plan: CachePlan, cfg: Config, log=print,
                 source: dict[str, Any] | None = None) -> dict[str, Any]:
    """The verified manifest of the plan's entry, built first when there is none (from the
    shards of ``source``, the shard manifest the caller verified; None: verified here).

    Raises:
        ManifestError: the entry exists but a shard changed (see ``verify_cache``).
    """
    with entry_lock(plan.entry):
        if read_cache_manifest(plan.entry) is None:
            shutil.rmtree(plan.entry, ignore_errors=True)  # an unfinished build's files
            t0 = time.perf_counter()
            manifest = build_entry(plan, cfg, source)
            log(f"[mmdist] feature cache {plan.key}: built {manifest['rows']} rows of "
                f"{', '.join(plan.modalities)} in {time.perf_counter() - t0:.1f} s "
                f"({plan.entry})", flush=True)
        else:
            manifest = verify_cache(plan.entry, plan.parts)
            log(f"[mmdist] feature cache {plan.key}: reusing {manifest['rows']} rows of "
                f"{', '.join(plan.modalities)} ({plan.entry})", flush=True)
    return {**manifest, "entry": str(plan.entry)}


def feature_cache_for(cfg: Config, data_dir: str | Path, log=print,
                      verified_entry: str | None = None,
                      source: dict[str, Any] | None = None) -> dict[str, Any] | None:
    """What a run reads instead of raw media: None (``data.feature_cache=off``, or nothing
    frozen to cache), else the entry's verified manifest (built on first use) with its
    ``entry`` directory. ``verified_entry``: the entry the sweep's driver verified moments
    before; when it is this config's entry its manifest is read, not every shard hashed again
    (each trial would). ``source``: the shard manifest the caller verified (a build reads
    its shards without hashing them again). Raises what ``cache_plan`` and
    :func:`ensure_cache` raise."""
    plan = cache_plan(cfg, data_dir, log=lambda s: log(s, flush=True))
    if plan is None:
        return None
    if verified_entry == str(plan.entry):
        manifest = read_cache_manifest(plan.entry)
        if manifest is not None:
            return {**manifest, "entry": str(plan.entry)}
    return ensure_cache(plan, cfg, log, source)
