"""Preprocessed batches straight from shard files, without Ray: a torch ``IterableDataset``.

The plain torch path: evaluation, inference, the DataLoader baseline of ``mmdist bench
ingest`` and the real-data pass of ``mmdist bench mfu`` (which runs on hosts without Ray). It
calls the same :func:`~mmdist.data.preprocess.preprocess_batch` as the Ray Data pipeline
(:mod:`mmdist.data.pipeline`), so both paths make the same batches.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import pyarrow.parquet as pq
from threadpoolctl import threadpool_limits
from torch.utils.data import DataLoader, IterableDataset, get_worker_info

from mmdist.data.preprocess import (
    PreprocessSpec,
    arrow_to_numpy,
    preprocess_batch,
    reuse_freed_memory,
)
from mmdist.data.schema import as_tensors
from mmdist.data.shards import (
    load_tokenizer,
    read_manifest,
    shard_columns,
    shard_paths,
    verify_manifest,
)

if TYPE_CHECKING:
    import torch

def shard_tables(paths: list[str], batch_size: int) -> Iterator[dict[str, Any]]:
    """Raw shard columns of ``paths``, ``batch_size`` rows at a time, in file order."""
    for path in paths:
        pf = pq.ParquetFile(path)
        for rb in pf.iter_batches(batch_size=batch_size, columns=shard_columns([path])):
            yield arrow_to_numpy(rb)


class ShardBatches(IterableDataset):
    """Preprocessed batches straight from shard files: a torch ``IterableDataset``.

    Use with ``DataLoader(ds, batch_size=None, num_workers=N)``: each DataLoader worker reads a
    disjoint subset of the shard files and yields whole batches made by ``preprocess_batch``.

    Args:
        data_dir: a shard directory (the manifest is verified).
        split: "train" or "val".
        spec: preprocessing sizes (default: from the manifest's ``preprocess`` entry).
        batch_size: rows per batch; the last batch of each file may be smaller.
        shuffle_seed: shuffle the file order and the rows within each file (None: keep order).
        verify: recompute checksums first.
    """

    def __init__(self, data_dir: str | Path, split: str = "val",
                 spec: PreprocessSpec | None = None, batch_size: int = 32,
                 shuffle_seed: int | None = None, verify: bool = True):
        manifest = verify_manifest(data_dir) if verify else read_manifest(data_dir)
        self.paths = shard_paths(data_dir, manifest, split)
        self.spec = spec or PreprocessSpec(**manifest["preprocess"])
        self.tokenizer = load_tokenizer(data_dir)
        self.batch_size, self.shuffle_seed = batch_size, shuffle_seed

    def __iter__(self) -> Iterator[dict[str, torch.Tensor]]:
        info = get_worker_info()
        paths = list(self.paths)
        if self.shuffle_seed is not None:
            np.random.default_rng(self.shuffle_seed).shuffle(paths)
        if info is not None:
            paths = paths[info.id::info.num_workers]
        reuse_freed_memory()
        for raw in shard_tables(paths, self.batch_size):
            if self.shuffle_seed is not None:
                order = np.random.default_rng([self.shuffle_seed, int(raw["sample_id"][0])]
                                              ).permutation(len(raw["sample_id"]))
                raw = {k: v[order] for k, v in raw.items()}
            yield as_tensors(preprocess_batch(raw, self.spec, self.tokenizer))


def one_blas_thread(worker_id: int = 0) -> None:
    """DataLoader ``worker_init_fn``: one BLAS thread per worker process.

    Ray already starts its workers with ``OMP_NUM_THREADS=1``; forked DataLoader workers
    inherit the parent's multi-threaded OpenBLAS instead, and N workers x M BLAS threads on N
    cores spin against each other (measured: the log-mel projection 2-3x slower).
    """
    threadpool_limits(1)


def shard_dataloader(data_dir: str | Path, split: str = "val", batch_size: int = 32,
                     num_workers: int = 2, spec: PreprocessSpec | None = None,
                     shuffle_seed: int | None = None, verify: bool = True):
    """A ``torch.utils.data.DataLoader`` over :class:`ShardBatches` (the non-Ray path)."""
    ds = ShardBatches(data_dir, split, spec, batch_size, shuffle_seed, verify)
    return DataLoader(ds, batch_size=None, num_workers=num_workers,
                      worker_init_fn=one_blas_thread if num_workers else None,
                      persistent_workers=False, prefetch_factor=4 if num_workers else None)
