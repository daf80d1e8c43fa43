"""Reading feature-cache entries (``mmdist.data.feature_cache``): the training pipeline's UDF
for feature shards, :class:`CachedBatchPreprocessor`. The shard columns left go through
``preprocess_batch`` as for raw shards (text, labels), and each cached modality becomes
``<m>_features`` ``(B, T, W)`` float32 and ``<m>_feature_mask`` ``(B, T)`` bool with its
``has_<m>``; its raw ``image``/``audio`` key is a 1-element placeholder the model does not read
(``FusedModel.encode`` takes the features instead)."""

from __future__ import annotations

from collections.abc import Iterator
from typing import TYPE_CHECKING, Any

import numpy as np
import pyarrow as pa

from mmdist.data.preprocess import BatchPreprocessor, PreprocessSpec, preprocess_batch

if TYPE_CHECKING:
    from mmdist.data.tokenizer import TextTokenizer

# the raw key of a cached modality: a placeholder of this shape per row, never read
PLACEHOLDER = {"image": ((3, 1, 1), np.uint8), "audio": ((1, 1), np.float32)}

def fixed_rows(col: Any, dtype: Any, shape: list[int]) -> np.ndarray:
    """A binary column of equal-length rows -> one ``(B, *shape)`` array (one copy)."""
    arr = col.combine_chunks() if hasattr(col, "combine_chunks") else col
    offsets = np.frombuffer(arr.buffers()[1], dtype=np.int32)[arr.offset:arr.offset + len(arr) + 1]
    data = np.frombuffer(arr.buffers()[2], dtype=np.uint8)[offsets[0]:offsets[-1]].copy()
    return data.view(dtype).reshape(len(arr), *shape)


def cached_batch(table: pa.Table, spec: PreprocessSpec, tokenizer: TextTokenizer,
                 shapes: dict[str, list[int]]) -> dict[str, np.ndarray]:
    """Feature-shard rows -> the model batch with ``<m>_features``/``<m>_feature_mask``."""
    from mmdist.data.preprocess import arrow_to_numpy

    cached = set(shapes)
    skip = {c for m in cached for c in (f"{m}_features", f"{m}_feature_mask", f"has_{m}")}
    raw = arrow_to_numpy(table.select([c for c in table.column_names if c not in skip]))
    if "audio" in cached:
        spec = spec.replace(audio_features=None)  # no extractor for the placeholder
    out = preprocess_batch(raw, spec, tokenizer)
    n = table.num_rows
    for m, shape in shapes.items():
        out[f"{m}_features"] = fixed_rows(table.column(f"{m}_features"), np.float32, shape)
        out[f"{m}_feature_mask"] = fixed_rows(table.column(f"{m}_feature_mask"), np.bool_,
                                              shape[:1])
        if m in PLACEHOLDER:
            out[f"has_{m}"] = table.column(f"has_{m}").to_numpy(zero_copy_only=False).astype(bool)
            dims, dtype = PLACEHOLDER[m]
            out[m] = np.zeros((n, *dims), dtype=dtype)
    return out


class CachedBatchPreprocessor(BatchPreprocessor):
    """:class:`BatchPreprocessor` for feature shards (:func:`cached_batch` per chunk)."""

    def __init__(self, spec: PreprocessSpec, tokenizer: TextTokenizer,
                 shapes: dict[str, list[int]], **kwargs: Any):
        super().__init__(spec, tokenizer, **kwargs)
        self.shapes = {m: list(s) for m, s in shapes.items()}

    def _chunks(self, batch: Any) -> Iterator[dict[str, np.ndarray]]:
        if not hasattr(batch, "column_names"):
            batch = pa.table(batch)
        for start in range(0, batch.num_rows, self.chunk_rows):
            yield cached_batch(batch.slice(start, self.chunk_rows), self.spec, self.tokenizer,
                               self.shapes)
