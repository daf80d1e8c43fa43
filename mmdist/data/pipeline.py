"""From a shard directory to model batches: Ray Data for training, a DataLoader for the rest.

Training (driver, then each Ray Train worker):

    datasets = build_datasets(data_dir, cfg)        # {"train": Dataset, "val": Dataset}
    shards = worker_shards(datasets, world_size, deterministic)  # in build_trainer
    # inside each worker (mmdist.train.entry):
    shard = open_worker_shards(shards[rank])["train"]
    for batch in iter_train_batches(shard, batch_size=32, seed=cfg.train.seed, epoch=epoch):
        ...  # dict of torch tensors, exactly the batch contract of schema.py

Both datasets verify the manifest first (a shard whose sha256 changed is refused), read the
Parquet shards and run :func:`preprocess_batch` in ``map_batches``; images cross the object
store as uint8. The same function drives :class:`~mmdist.data.shard_batches.ShardBatches`
(a torch ``IterableDataset``, no Ray) for the DataLoader baseline, evaluation and inference.

Why the Ray Data settings below (measured with ``mmdist bench ingest``; figures in
``docs/performance.md``):
read and preprocess fuse into one task per shard file when both are plain tasks with the same
resources; ``preprocess_batch`` is vectorised per batch, so the batch size is large enough to
amortise per-call overhead but stays far below a block so memory per task stays small; each
task hands its shard over as one block (up to ``BLOCK_MAX_BYTES``), and the tasks that start an
epoch hand their first rows over on their own first (``BatchPreprocessor``, ``ray_scheduling``).
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any

import ray
import ray.data

from mmdist.data import ray_scheduling
from mmdist.data.preprocess import BatchPreprocessor, PreprocessSpec
from mmdist.data.shard_source import ShardDatasource
from mmdist.data.shards import load_tokenizer, shard_columns, shard_paths, verify_manifest
from mmdist.data.tokenizer import TextTokenizer
from mmdist.data.torch_batches import iter_torch

if TYPE_CHECKING:
    import torch

    from mmdist.config import Config

MAP_BATCH_SIZE = 64  # rows per preprocess_batch call inside Ray Data
# Most bytes per block after each task's first (see BatchPreprocessor): Ray's own default target
# is 128 MiB; half of it bounds what a task holds before handing it over.
BLOCK_MAX_BYTES = 64 * 1024 * 1024


def audio_dir(cfg: Config) -> str | None:
    """The pretrained audio encoder's directory whose feature extractor makes the audio
    features, or None (mmdist's log-mel)."""
    m = cfg.model
    if m.audio_pretrained and "audio" in m.modalities and m.fusion_stage != "early":
        return m.audio_pretrained
    return None


def shuffle_buffer_rows(batch_size: int) -> int:
    """Rows in a training worker's local shuffle buffer (:func:`iter_train_batches`)."""
    return max(8 * batch_size, 256)


def first_batch_rows(batch_size: int) -> int:
    """Rows a training worker receives before its first batch of an epoch: Ray Data's local
    shuffle yields nothing until it holds 1.5 buffers and a batch (Ray 2.60's
    ``ShufflingBatcher``); two buffers cover that."""
    return 2 * shuffle_buffer_rows(batch_size)


def build_dataset(paths: list[str], spec: PreprocessSpec, tokenizer: TextTokenizer,
                  map_batch_size: int = MAP_BATCH_SIZE,
                  cpus_per_task: float = 1.0,
                  cached: dict[str, list[int]] | None = None,
                  first_rows: int | None = None) -> ray.data.Dataset:
    """``read(paths) -> map_batches(preprocess_batch)``, lazily (:mod:`shard_source` reads).

    Args:
        paths: shard files.
        spec: preprocessing sizes and options.
        tokenizer: the dataset's tokenizer.
        map_batch_size: rows per ``preprocess_batch`` call.
        cpus_per_task: CPUs each read+preprocess task reserves (``data.cpus_per_task``). Train
            workers hold whole or half CPUs; a data task asking for a full CPU can then never be
            scheduled and training waits forever (seen with 2 sweep trials on 2 CPUs).
        cached: feature shards of the feature cache: modality -> feature shape
            (``mmdist.data.feature_read.CachedBatchPreprocessor``).
        first_rows: rows the consumer needs before its first batch: the tasks that start an
            execution hand those over first, on their own (default: one map batch).
    """
    # One read task and one block per shard file, without read_parquet's sampling tasks
    # (mmdist.data.shard_source), so the map streams and runs in parallel.
    ds = ray.data.read_datasource(ShardDatasource(paths, None if cached else shard_columns(paths)),
                                  override_num_blocks=len(paths),
                                  num_cpus=cpus_per_task)
    # batch_size=None hands the UDF whole blocks: only then does Ray fuse the read and the map
    # into one task (a map with a batch size waits for bundles of that many rows and is not
    # fused with a read); the UDF itself works in chunks of `map_batch_size` rows, and takes
    # the block as Arrow so each chunk is converted to numpy on its own (see BatchPreprocessor).
    # Early first rows from each task of the first wave: as many tasks as fit at once.
    first_wave = max(1, int(ray.cluster_resources().get("CPU", 1) / max(cpus_per_task, 1e-4)))
    kwargs = {"chunk_rows": map_batch_size, "block_bytes": BLOCK_MAX_BYTES,
              "first_wave": first_wave, "first_rows": first_rows}
    if cached:
        from mmdist.data.feature_read import CachedBatchPreprocessor

        fn = CachedBatchPreprocessor(spec, tokenizer, cached, **kwargs)
    else:
        fn = BatchPreprocessor(spec, tokenizer, **kwargs)
    ds = ds.map_batches(fn, batch_size=None, batch_format="pyarrow", zero_copy_batch=True,
                        udf_modifying_row_count=False, num_cpus=cpus_per_task)
    # Every CPU busy from the first task on, no idle worker between tasks, and the blocks are
    # what `fn` yields: a shard per block, the first wave's first rows on their own.
    return ray_scheduling.add_to(ds, udf=fn)


def build_datasets(data_dir: str | Path, cfg: Config,
                   cache: dict[str, Any] | None = None, manifest: dict[str, Any] | None = None
                   ) -> dict[str, ray.data.Dataset]:
    """The Ray Datasets ``{"train", "val"}`` that :func:`worker_shards` hands the workers.

    Args:
        data_dir: a shard directory written by `mmdist prepare`.
        cfg: ``cfg.data`` gives the preprocessing sizes; ``data.augment`` applies to train only.
        cache: a feature-cache entry's manifest (``mmdist.models.feature_build``): its feature
            shards are read instead of the raw ones, with the same sample ids.
        manifest: the shard manifest as the caller verified it (``verify_manifest``) moments
            before; None verifies it here (every shard's checksum is read again).

    Raises:
        ManifestError: a shard or tokenizer file is missing or changed (the message names it).
    """
    manifest = manifest or verify_manifest(data_dir)
    tokenizer = load_tokenizer(data_dir)
    out = {}
    for split in ("train", "val"):
        paths = (shard_paths(data_dir, manifest, split) if cache is None else
                 [str(Path(cache["entry"]) / f["path"]) for f in cache["files"]
                  if f["split"] == split])
        if not paths:
            raise ValueError(f"{data_dir}: no {split} shards in the manifest "
                             f"(prepare with --val-fraction > 0 for a val split)")
        spec = PreprocessSpec.from_config(cfg.data, augment=cfg.data.augment and split == "train",
                                          audio_features=audio_dir(cfg),
                                          video="video" in cfg.model.modalities)
        # a training worker's first batch waits for its shuffle buffer; evaluation's does not
        first = first_batch_rows(cfg.train.micro_batch_size) if split == "train" else None
        out[split] = build_dataset(paths, spec, tokenizer, cpus_per_task=cfg.data.cpus_per_task,
                                   cached=cache and cache["shapes"], first_rows=first)
        # Ray Data's bars, drawn in every worker for every eval pass and forwarded line by line
        # to the driver, would be most of what `make demo` prints; rank 0's step lines already
        # show progress. The setting travels with the dataset, not the global context.
        out[split].context.enable_progress_bars = False
    return out


def worker_shards(datasets: dict[str, ray.data.Dataset], world_size: int,
                  deterministic: bool = False) -> list[ray.ObjectRef]:
    """Each training worker's data, by rank: ``train`` split into ``world_size`` streams of
    equal rows (Ray Data's ``streaming_split(equal=True)``), ``val`` whole for every worker,
    each rank's pair put in the object store (:func:`open_worker_shards` opens it).

    What Ray Train does with ``datasets=`` (its public ``DataConfig.configure`` makes the
    split), but here in the driver: Ray Train would create a dataset-manager actor once the
    workers have started, and that actor the split's coordinator when rank 0 first asks for
    its shard, two fresh processes one after the other (~1.6 and ~1.9 CPU-s each) before the
    first read task could start. Made here, the coordinator starts while Ray Train starts its
    controller, and the read tasks as soon as the workers first ask for batches. The split has
    no locality hints (the workers' nodes are not known yet), and ``deterministic`` delivers
    blocks in dataset order, so a seed fixes each rank's samples (Ray's split ignores hints
    then anyway). The coordinator lives as long as these references (one trainer's run).
    """
    import copy

    from ray.train import DataConfig  # heavy: not for --help

    # the driver's Ray Data options, as Ray Train's default ingest options carry them over
    # (copied: building new ones warns of a deprecated field on every run)
    opts = {name: copy.deepcopy(ray.data.DataContext.get_current().execution_options)
            for name in datasets}
    for name, o in opts.items():
        # val in dataset order always, so evaluation batches are canonical (loop._evaluate)
        o.preserve_order = o.preserve_order or name == "val" or deterministic
    per_rank = DataConfig(datasets_to_split=["train"], execution_options=opts).configure(
        datasets, world_size=world_size, worker_handles=None, worker_node_ids=None)
    return [ray.put(shards) for shards in per_rank]


def open_worker_shards(ref: ray.ObjectRef) -> dict[str, Any]:
    """A worker's ``{"train": DataIterator, "val": DataIterator}`` from :func:`worker_shards`."""
    return ray.get(ref)


def iter_train_batches(shard: Any, batch_size: int, seed: int, epoch: int,
                       shuffle_buffer: int | None = None) -> Iterator[dict[str, torch.Tensor]]:
    """One epoch of training batches from a worker's dataset shard.

    :func:`mmdist.data.torch_batches.iter_torch` with a local shuffle buffer seeded by
    ``(seed, epoch)`` (a different order every epoch, the same order for the same seed and epoch
    as far as Ray delivers blocks in the same order) and ``drop_last=True`` so every step has a
    full batch.

    Args:
        shard: a worker's train split (:func:`open_worker_shards`, a DataIterator) or a Dataset.
        batch_size: rows per batch (``train.micro_batch_size``).
        seed: ``train.seed``.
        epoch: the epoch number, 0-based.
        shuffle_buffer: rows in the local shuffle buffer (default :func:`shuffle_buffer_rows`).

    Yields:
        Dicts of CPU torch tensors with the keys, dtypes and shapes of ``schema.BATCH_KEYS``.
    """
    buffer = shuffle_buffer or shuffle_buffer_rows(batch_size)
    return iter(iter_torch(
        shard, batch_size=batch_size, local_shuffle_buffer_size=buffer,
        local_shuffle_seed=int(seed) * 100_003 + int(epoch), drop_last=True))
