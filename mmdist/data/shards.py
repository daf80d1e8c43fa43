"""Parquet shards, the manifest that checks them, and the quarantine file.

A shard directory written by `mmdist prepare`:

    OUT/
      train/part-00000.parquet ...   rows of schema.SHARD_SCHEMA, ~shard_rows each
      val/part-00000.parquet ...
      tokenizer/tokenizer.json       the dataset's tokenizer
      quarantine.jsonl               one {"sample_id", "origin", "reason"} per bad row
      manifest.json                  shards (path, split, rows, sha256), counts, parameters

``verify_manifest(OUT)`` recomputes every checksum and raises :class:`ManifestError` naming
the first shard that is missing or does not match; the pipeline refuses to read otherwise.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq

from mmdist.data.schema import MODALITY_LABELS, SHARD_SCHEMA
from mmdist.data.tokenizer import TextTokenizer

MANIFEST = "manifest.json"
QUARANTINE = "quarantine.jsonl"
TOKENIZER_DIR = "tokenizer"
SPLITS = ("train", "val")
FORMAT_VERSION = 1


class ManifestError(RuntimeError):
    """A shard directory whose files do not match its manifest (names the file)."""


def sha256_file(path: str | Path, chunk: int = 1 << 20) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()


def split_of_groups(groups: Iterable[str], val_fraction: float, seed: int) -> dict[str, str]:
    """Assign each group to "train" or "val", deterministically for a seed.

    Groups are ranked by a hash of ``(seed, group)`` and the first ``round(n * val_fraction)``
    go to val (at least one when ``val_fraction > 0`` and there are two or more groups), so all
    rows of a group (e.g. the five captions of one image) share a split and the val size is
    exact rather than approximate.
    """
    uniq = sorted(set(groups))
    n_val = round(len(uniq) * val_fraction)
    if val_fraction > 0 and len(uniq) >= 2:
        n_val = min(max(n_val, 1), len(uniq) - 1)
    ranked = sorted(uniq, key=lambda g: hashlib.sha256(f"{seed}:{g}".encode()).hexdigest())
    val = set(ranked[:n_val])
    return {g: ("val" if g in val else "train") for g in uniq}


class ShardWriter:
    """Buffers rows of one split and writes ``OUT/<split>/part-NNNNN.parquet`` every
    ``shard_rows`` rows.

    Args:
        out_dir: the shard directory.
        split: "train" or "val".
        shard_rows: target rows per shard (the last one may be smaller).
    """

    def __init__(self, out_dir: str | Path, split: str, shard_rows: int):
        if split not in SPLITS:
            raise ValueError(f"split {split!r}: choose from {list(SPLITS)}")
        if shard_rows < 1:
            raise ValueError(f"shard_rows={shard_rows}: must be >= 1")
        self.out_dir, self.split, self.shard_rows = Path(out_dir), split, shard_rows
        self.shards: list[dict[str, Any]] = []
        self._rows: list[dict[str, Any]] = []
        self.rows_written = 0

    def add(self, row: dict[str, Any]) -> None:
        self._rows.append(row)
        if len(self._rows) >= self.shard_rows:
            self.flush()

    def flush(self) -> None:
        if not self._rows:
            return
        rel = f"{self.split}/part-{len(self.shards):05d}.parquet"
        path = self.out_dir / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        table = pa.Table.from_pylist(self._rows, schema=SHARD_SCHEMA)
        # Images/audio are already compressed; a row group per shard keeps reads simple.
        pq.write_table(table, path, compression="none", row_group_size=len(self._rows),
                       write_statistics=False)
        self.shards.append({"path": rel, "split": self.split, "rows": len(self._rows),
                            "sha256": sha256_file(path)})
        self.rows_written += len(self._rows)
        self._rows = []


def manifest_hash(manifest: dict[str, Any]) -> str:
    """sha256 of the manifest's content (canonical JSON, without the hash field itself)."""
    body = {k: v for k, v in manifest.items() if k != "manifest_sha256"}
    return hashlib.sha256(json.dumps(body, sort_keys=True).encode()).hexdigest()


def write_manifest(out_dir: str | Path, manifest: dict[str, Any]) -> dict[str, Any]:
    """Add ``format`` and ``manifest_sha256`` and write ``OUT/manifest.json``."""
    manifest = {"format": FORMAT_VERSION, **manifest}
    manifest["manifest_sha256"] = manifest_hash(manifest)
    (Path(out_dir) / MANIFEST).write_text(json.dumps(manifest, indent=1, sort_keys=True) + "\n")
    return manifest


def read_manifest(data_dir: str | Path) -> dict[str, Any]:
    """``OUT/manifest.json`` as a dict.

    Raises:
        ManifestError: missing, not JSON, or edited by hand (hash mismatch).
    """
    path = Path(data_dir) / MANIFEST
    if not path.is_file():
        raise ManifestError(f"{path}: no manifest; is {data_dir} a directory written by "
                            "`mmdist prepare`?")
    try:
        manifest = json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise ManifestError(f"{path}: not valid JSON: {e}") from None
    if manifest.get("manifest_sha256") != manifest_hash(manifest):
        raise ManifestError(f"{path}: manifest_sha256 does not match its content (edited?)")
    return manifest


def verify_manifest(data_dir: str | Path) -> dict[str, Any]:
    """Recompute every shard's (and the tokenizer's) sha256 and row count against the manifest.

    Returns:
        The manifest.

    Raises:
        ManifestError: naming the first missing or mismatching file.
    """
    data_dir = Path(data_dir)
    manifest = read_manifest(data_dir)
    for shard in manifest["shards"]:
        path = data_dir / shard["path"]
        if not path.is_file():
            raise ManifestError(f"shard {shard['path']} listed in {data_dir / MANIFEST} is missing")
        digest = sha256_file(path)
        if digest != shard["sha256"]:
            raise ManifestError(f"shard {shard['path']}: sha256 {digest[:12]}... does not match "
                                f"the manifest's {shard['sha256'][:12]}...; the file changed "
                                f"after `mmdist prepare` (re-run prepare into a fresh --out)")
        rows = pq.ParquetFile(path).metadata.num_rows
        if rows != shard["rows"]:
            raise ManifestError(f"shard {shard['path']}: {rows} rows, manifest says {shard['rows']}")
    for rel, digest in (manifest.get("tokenizer_files") or {}).items():
        path = data_dir / rel
        if not path.is_file() or sha256_file(path) != digest:
            raise ManifestError(f"tokenizer file {rel} is missing or does not match the manifest")
    return manifest


def shard_paths(data_dir: str | Path, manifest: dict[str, Any], split: str) -> list[str]:
    """Absolute paths of the shards of one split, in manifest order."""
    return [str(Path(data_dir) / s["path"]) for s in manifest["shards"] if s["split"] == split]


SHARD_COLUMNS = ("sample_id", "text", "target", "label", "image", "audio")


def shard_columns(paths: list[str]) -> list[str]:
    """The columns to read: :data:`SHARD_COLUMNS` and the per-modality labels and ``video``
    where the shards have them (shards written before they existed do not)."""
    have = set(pq.read_schema(paths[0]).names) if paths else set()
    return [*SHARD_COLUMNS, *(c for c in (*MODALITY_LABELS, "video") if c in have)]


def load_tokenizer(data_dir: str | Path) -> TextTokenizer:
    """The tokenizer saved beside the shards (``manifest["tokenizer"]``)."""
    manifest = read_manifest(data_dir)
    return TextTokenizer.load(Path(data_dir) / manifest.get("tokenizer", TOKENIZER_DIR))


def example_texts(data_dir: str | Path, n: int = 2) -> list[str]:
    """The first ``n`` non-empty texts of the val split (else train): a model's input example
    from the data it was trained on."""
    for split in ("val", "train"):
        for f in sorted((Path(data_dir) / split).glob("*.parquet")):
            texts = [t for t in pq.read_table(f, columns=["text"]).column("text").to_pylist()
                     if t]
            if texts:
                return texts[:n]
    return []


def canonical_batches(data_dir: str | Path, split: str, batch_size: int) -> list:
    """The split as Arrow tables of ``batch_size`` consecutive rows (files in name order): the
    same batches as evaluation during training, so metrics match exactly."""
    files = sorted((Path(data_dir) / split).glob("*.parquet"))
    if not files:
        raise FileNotFoundError(f"{data_dir}/{split}: no Parquet shards")
    table = pa.concat_tables([pq.read_table(f) for f in files])
    return [table.slice(i, batch_size) for i in range(0, table.num_rows, batch_size)]


def label_summary(labels: Iterable[int]) -> dict[str, Any]:
    """``{"rows", "max", "counts"}`` of the class labels present (``-1``, no label, is left out):
    what the manifest records so a run can check ``model.num_classes`` before it starts."""
    counts: dict[int, int] = {}
    for label in labels:
        if label >= 0:
            counts[int(label)] = counts.get(int(label), 0) + 1
    return {"rows": sum(counts.values()), "max": max(counts) if counts else None,
            "counts": {str(k): counts[k] for k in sorted(counts)}}


def shard_labels(data_dir: str | Path, manifest: dict[str, Any]) -> dict[str, Any]:
    """The manifest's label summary; for shard sets written before it was recorded, computed
    from the shards' ``label`` column (a cheap column read)."""
    if manifest.get("labels") is not None:
        return manifest["labels"]
    labels: list[int] = []
    for shard in manifest["shards"]:
        col = pq.read_table(Path(data_dir) / shard["path"], columns=["label"]).column("label")
        labels.extend(col.to_pylist())
    return label_summary(labels)


def reason_kind(reason: str) -> str:
    """The kind of a quarantine reason, for the summary's counts: its text before the first
    colon ("missing image file: a/b.png" -> "missing image file"); every reason puts the
    row's own values (paths, ids, what was found) after it."""
    return reason.split(":", 1)[0].strip()


class QuarantineWriter:
    """Appends one JSON line per bad row to ``OUT/quarantine.jsonl``."""

    def __init__(self, out_dir: str | Path):
        self.path = Path(out_dir) / QUARANTINE
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._f = self.path.open("w", encoding="utf-8")
        self.count = 0
        self.reasons: dict[str, int] = {}

    def add(self, sample_id: int, origin: str, reason: str) -> None:
        self._f.write(json.dumps({"sample_id": sample_id, "origin": origin, "reason": reason}) + "\n")
        self.count += 1
        kind = reason_kind(reason)
        self.reasons[kind] = self.reasons.get(kind, 0) + 1

    def close(self) -> None:
        self._f.close()
