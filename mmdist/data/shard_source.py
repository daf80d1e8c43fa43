"""mmdist's shard files as a Ray Data datasource: one read task, and one block, per file.

``ray.data.read_parquet`` samples its files before it returns (Ray 2.60 reads the first row
group of up to two files in Ray tasks, to estimate the in-memory size), which costs every
training run two fresh Ray worker processes and 1.5-2 s in the driver before Ray Train even
starts (``startup_phases["datasets"]``). mmdist's shards need none of that: each file's row
count is in its Parquet footer (``verify_manifest`` has just compared it with the manifest),
and the shards are written uncompressed, so a file's size is its in-memory size to within the
Arrow buffers' padding. This datasource reads those footers in the driver and hands Ray Data
one read task per file that reads the file's columns as one Arrow table: the blocks Ray
Data's V1 Parquet reader made for these files (``build_dataset`` in ``pipeline`` asks for one
block per file), without the sampling.
"""

from __future__ import annotations

import os
from collections.abc import Iterable
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq
from ray.data.block import BlockMetadata
from ray.data.datasource import Datasource, ReadTask


class ShardDatasource(Datasource):
    """The Parquet files ``paths`` (``columns`` of each), one read task and one block per file,
    in the order given. Read tasks are named ``ReadShards``.

    Raises:
        FileNotFoundError, pyarrow.ArrowInvalid: a file is missing or not Parquet (the message
            names the file).
    """

    def __init__(self, paths: list[str], columns: list[str] | None = None):
        super().__init__()
        if not paths:
            raise ValueError("ShardDatasource: no shard files")
        self.paths, self.columns = list(paths), columns
        self._rows, self._bytes = [], []
        for path in self.paths:
            try:
                self._rows.append(pq.ParquetFile(path).metadata.num_rows)
            except (OSError, pa.ArrowInvalid) as e:
                raise type(e)(f"shard {path}: {e}") from e
            self._bytes.append(os.path.getsize(path))
        schema = pq.read_schema(self.paths[0])
        self._schema = pa.schema([schema.field(c) for c in columns]) if columns else schema

    def get_name(self) -> str:
        return "Shards"

    def estimate_inmemory_data_size(self) -> int:
        return sum(self._bytes)

    def get_read_tasks(self, parallelism: int, per_task_row_limit: int | None = None,
                       data_context: Any = None) -> list[ReadTask]:
        """One task per file, whatever ``parallelism`` asks (``build_dataset`` asks for that)."""
        return [ReadTask(_reader(path, self.columns),
                         BlockMetadata(num_rows=rows, size_bytes=size, input_files=[path],
                                       exec_stats=None),
                         schema=self._schema, per_task_row_limit=per_task_row_limit)
                for path, rows, size in zip(self.paths, self._rows, self._bytes)]


def _reader(path: str, columns: list[str] | None):
    def read() -> Iterable[pa.Table]:
        yield pq.read_table(path, columns=columns)
    return read
