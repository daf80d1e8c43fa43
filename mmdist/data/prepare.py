"""`mmdist prepare`: convert a data source into validated Parquet shards + manifest.

    mmdist prepare --source synthetic --out data/synth --num-samples 2000 --seed 0
    mmdist prepare --source mmt --config ref_mmt --out data/mmt --num-samples 4000
    mmdist prepare --source coco --images val2017/ --captions captions_val2017.json --out data/coco
    mmdist prepare --source jsonl --manifest pairs.jsonl --out data/pairs
    mmdist prepare --source audiocaps --audio clotho/ --captions clotho_captions.csv --out data/clotho

Bad rows go to ``OUT/quarantine.jsonl`` with a reason; the command fails only when every row is
bad or the source cannot be read at all. Small inputs are converted in this process; large ones
(``--parallel auto``: at least ``RAY_THRESHOLD`` rows) in parallel with Ray Data. The train
command calls :func:`prepare_synthetic` when ``data.path`` is not set.
"""

from __future__ import annotations

import argparse
import dataclasses
import errno
import json
import os
import shutil
import sys
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any

import pyarrow as pa

from mmdist.arguments import add_config_arguments
from mmdist.config import SYNTHETIC_SOURCES, load_config
from mmdist.console import Console
from mmdist.data import video_prepare
from mmdist.data.digits import CAPTIONS, LABELS
from mmdist.data.generated import generated_source, synthetic_source_for
from mmdist.data.prepare_summary import print_summary
from mmdist.data.schema import MODALITY_LABELS, SHARD_SCHEMA
from mmdist.data.shards import (
    MANIFEST,
    TOKENIZER_DIR,
    ManifestError,
    QuarantineWriter,
    ShardWriter,
    label_summary,
    sha256_file,
    split_of_groups,
    verify_manifest,
    write_manifest,
)
from mmdist.data.sources import (
    SOURCES,
    AudioCapsSource,
    CocoSource,
    JsonlSource,
    RowLimits,
    SourceError,
    load_record,
)
from mmdist.data.tokenizer import TextTokenizer
from mmdist.errors import CommandError
from mmdist.ray_env import local_init_kwargs

if TYPE_CHECKING:
    from mmdist.config import Config, DataConfig

RAY_THRESHOLD = 5000  # rows; below this the conversion runs in-process (no Ray start-up)
VIDEO_RAY_THRESHOLD = 200  # rows that decode a video file: each takes far longer than an image


def configure_parser(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--source", choices=SOURCES, default="synthetic",
                        help="input format (default: synthetic)")
    parser.add_argument("--out", required=True, metavar="DIR",
                        help="output shard directory (replaced if it holds an earlier prepare)")
    parser.add_argument("--num-samples", type=int, default=None, metavar="N",
                        help="synthetic, digits, mmt: rows to generate (default: "
                             "data.synthetic_samples)")
    parser.add_argument("--digits-caption", choices=CAPTIONS, default="both",
                        help="digits: the caption names the written digit (written) or the "
                             "written and the spoken one (both) (default: both)")
    parser.add_argument("--digits-label", choices=LABELS, default="written",
                        help="digits: the label is the written digit, the spoken one, or "
                             "whether they are the same (default: written)")
    parser.add_argument("--seed", type=int, default=0,
                        help="seed of the synthetic data and of the train/val split (default: 0)")
    parser.add_argument("--images", metavar="DIR", help="coco: directory of the image files")
    parser.add_argument("--captions", metavar="FILE",
                        help="coco: captions JSON; audiocaps, video: captions CSV")
    parser.add_argument("--manifest", metavar="FILE",
                        help="jsonl: one JSON object per line (image, audio, text, target, label)")
    parser.add_argument("--audio", metavar="DIR", help="audiocaps: directory of the audio files")
    parser.add_argument("--allow-outside-root", action="store_true",
                        help="coco, jsonl, audiocaps: read media paths that lead outside the "
                             "dataset folder (absolute, '..', symlinks out); by default such rows "
                             "are quarantined")
    parser.add_argument("--val-fraction", type=float, default=None, metavar="F",
                        help="fraction of rows (grouped by image/audio file) held out for "
                             "validation (default: data.val_fraction)")
    parser.add_argument("--shard-rows", type=int, default=None, metavar="N",
                        help="target rows per Parquet shard (default: data.shard_rows)")
    parser.add_argument("--tokenizer", metavar="PATH", default=None,
                        help="local pretrained tokenizer directory (tokenizer.json) to copy "
                             "beside the shards instead of training one (default: data.tokenizer)")
    parser.add_argument("--vocab-size", type=int, default=None, metavar="N",
                        help="vocabulary of the tokenizer trained on the training text "
                             "(default: data.vocab_size)")
    parser.add_argument("--parallel", choices=("auto", "ray", "local"), default="auto",
                        help=f"convert with Ray Data (ray), in this process (local) or ray from "
                             f"{RAY_THRESHOLD} rows on, {VIDEO_RAY_THRESHOLD} with video files "
                             "(auto, the default)")
    video_prepare.add_video_arguments(parser)
    add_config_arguments(parser)
    parser.add_argument("--verbose", action="store_true",
                        help="show Ray's and the libraries' output (default: in <out>.prepare.log)")


# a full disk, a quota, a file-size limit, a read-only filesystem: the write failed, not the data
WRITE_ERRNOS = (errno.ENOSPC, errno.EDQUOT, errno.EFBIG, errno.EROFS, errno.EACCES, errno.EPERM)


def run(args: argparse.Namespace) -> dict[str, Any]:
    flags = {"data.val_fraction": args.val_fraction, "data.shard_rows": args.shard_rows,
             "data.vocab_size": args.vocab_size, "data.synthetic_samples": args.num_samples,
             "data.tokenizer": args.tokenizer}
    cfg = load_config(args.config, list(args.overrides or []))
    flags = {k: v for k, v in flags.items() if v is not None}
    if flags:  # flags win over the config file; validated like any override
        cfg = cfg.override(flags)
    log_file = Path(args.out).parent / f"{Path(args.out).name}.prepare.log"
    try:
        with Console(log_file, verbose=getattr(args, "verbose", False)):
            source = (video_prepare.build_video_source(args, cfg.data)
                      or build_source(args, cfg.data))
            data = prepared_data(cfg)
            summary = convert(source, args.out, data, seed=args.seed,
                              params=source_params(source, data, args.seed),
                              parallel=args.parallel)
    except SourceError as e:
        raise CommandError(str(e)) from None
    except OSError as e:
        if e.errno not in WRITE_ERRNOS:
            raise
        raise CommandError(
            f"--out {args.out}: cannot write the shards ({e.strerror}"
            + (f": {e.filename}" if e.filename else "") + ")"
            f"; nothing was kept (the half-written folder is removed, and {args.out} is as it "
            "was before). Free space or choose another --out") from None
    summary["log_file"] = str(log_file)
    print_summary(summary)
    if summary["rows_written"] == 0:
        raise CommandError(f"every row of the source was bad ({summary['rows_in']} rows "
                           f"quarantined); see {Path(args.out) / 'quarantine.jsonl'}")
    return summary


def build_source(args: argparse.Namespace, data: DataConfig):
    """The source object for ``--source`` and its flags; every missing flag named at once."""
    need = {"coco": ("images", "captions"), "jsonl": ("manifest",),
            "audiocaps": ("audio", "captions")}.get(args.source, ())
    missing = [f"--{n}" for n in need if not getattr(args, n, None)]
    if missing:
        raise SourceError(f"--source {args.source} needs {' and '.join(missing)}")
    if args.source in SYNTHETIC_SOURCES:
        return generated_source(args.source, data, args.seed, video_captions=args.video_captions,
                                digits_caption=args.digits_caption, digits_label=args.digits_label)
    limits, outside = RowLimits.from_config(data), bool(getattr(args, "allow_outside_root", False))
    if args.source == "coco":
        return CocoSource(captions=args.captions, images=args.images, limits=limits,
                          allow_outside_root=outside)
    if args.source == "jsonl":
        return JsonlSource(manifest=args.manifest, limits=limits, allow_outside_root=outside)
    return AudioCapsSource(captions=args.captions, audio=args.audio, limits=limits,
                           allow_outside_root=outside)


def prepared_data(cfg: Config) -> DataConfig:
    """``cfg.data`` with the tokenizer shards are prepared with (``Config.tokenizer_path``)."""
    return cfg.data.model_copy(update={"tokenizer": cfg.tokenizer_path})


def source_params(source: Any, data: DataConfig, seed: int) -> dict[str, Any]:
    """Everything that determines the shards' content (compared to reuse a synthetic set)."""
    return {"source": source.name, **{k: v for k, v in dataclasses.asdict(source).items()
                                      if k != "name"},
            "seed": seed, "val_fraction": data.val_fraction, "shard_rows": data.shard_rows,
            "vocab_size": data.vocab_size, "tokenizer": data.tokenizer}


# ---- conversion ---------------------------------------------------------------------------------


def convert(source: Any, out: str | Path, data: DataConfig, seed: int = 0,
            params: dict[str, Any] | None = None, parallel: str = "auto") -> dict[str, Any]:
    """Read every record of ``source``, validate, split, write shards, tokenizer, manifest.

    The result is written to a temporary sibling directory and renamed into place, so a
    half-written ``out`` never carries a manifest.

    Returns:
        The summary (``rows_in, rows_written, rows_quarantined, shards, out`` and details).

    Raises:
        SourceError: the source cannot be read, or has no rows.
        FileExistsError: ``out`` exists, is not empty and is not a shard directory.
    """
    t0 = time.perf_counter()
    out = Path(out)
    if out.exists() and any(out.iterdir()) and not (out / MANIFEST).exists():
        raise FileExistsError(f"--out {out}: exists, is not empty and holds no {MANIFEST}; "
                              "refusing to overwrite it")
    records = list(source.records())
    if not records:
        raise SourceError(f"source {source.name}: no rows")
    splits = split_of_groups((r["group"] for r in records), data.val_fraction, seed)
    videos = sum("video_path" in r for r in records)
    use_ray = parallel == "ray" or (parallel == "auto" and (
        len(records) >= RAY_THRESHOLD or videos >= VIDEO_RAY_THRESHOLD))

    tmp = out.parent / f".{out.name}.tmp-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    try:
        writers = {s: ShardWriter(tmp, s, data.shard_rows) for s in ("train", "val")}
        quarantine = QuarantineWriter(tmp)
        train_text: list[str] = []
        labels: list[int] = []
        modality_labels: dict[str, list[int]] = {m: [] for m in MODALITY_LABELS.values()}
        results = _rows_bar(_load_with_ray(source, records) if use_ray
                            else _load_local(source, records), len(records), source.name)
        for rec, row, reason in results:
            if row is None:
                quarantine.add(rec["sample_id"], rec["origin"], reason)
                continue
            split = splits[rec["group"]]
            writers[split].add(row)
            labels.append(row["label"])
            for col, m in MODALITY_LABELS.items():
                modality_labels[m].append(row.get(col, -1))
            if split == "train":
                train_text.extend(t for t in (row["text"], row["target"]) if t)
        for w in writers.values():
            w.flush()
        quarantine.close()

        tok_dir = tmp / TOKENIZER_DIR
        if data.tokenizer:
            tokenizer = TextTokenizer.load(data.tokenizer)
        else:
            tokenizer = TextTokenizer.train(train_text, data.vocab_size)
        tokenizer.save(tok_dir)

        shards = writers["train"].shards + writers["val"].shards
        written = sum(w.rows_written for w in writers.values())
        counts = {"rows_in": len(records), "rows_written": written,
                  "rows_quarantined": quarantine.count,
                  "train_rows": writers["train"].rows_written,
                  "val_rows": writers["val"].rows_written}
        assert counts["rows_in"] == written + quarantine.count, counts
        manifest = write_manifest(tmp, {
            "created_by": "mmdist prepare",
            "source": source.name,
            "params": params or {},
            "preprocess": video_prepare.preprocess_entry(data, tmp, shards),
            "tokenizer": TOKENIZER_DIR,
            "tokenizer_vocab_size": tokenizer.vocab_size,
            "tokenizer_files": {f"{TOKENIZER_DIR}/{p.name}": sha256_file(p)
                                for p in sorted(tok_dir.iterdir())},
            "quarantine": "quarantine.jsonl",
            "quarantine_reasons": quarantine.reasons,
            "counts": counts,
            "labels": label_summary(labels),
            "modality_labels": {m: label_summary(v) for m, v in modality_labels.items()},
            "splits": {s: {"rows": w.rows_written, "shards": len(w.shards)}
                       for s, w in writers.items()},
            "shards": shards,
        })
        if out.exists():
            shutil.rmtree(out)
        tmp.rename(out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    warnings = []
    if data.val_fraction > 0 and counts["val_rows"] == 0:
        n_val = sum(1 for v in splits.values() if v == "val")
        why = (f"its {n_val} group(s) of rows were all quarantined (fix those rows)" if n_val
               else f"none of the {len(splits)} group(s) of rows went to it at --val-fraction "
                    f"{data.val_fraction} (add rows or raise --val-fraction)")
        warnings.append(f"the val split is empty: {why}; training needs val rows")
    return {**counts, "shards": len(shards), "out": str(out), "warnings": warnings,
            "train_shards": len(writers["train"].shards), "val_shards": len(writers["val"].shards),
            "quarantine_reasons": quarantine.reasons, "tokenizer": str(out / TOKENIZER_DIR),
            "vocab_size": tokenizer.vocab_size, "manifest_sha256": manifest["manifest_sha256"],
            "parallel": "ray" if use_ray else "local",
            "seconds": round(time.perf_counter() - t0, 2)}


def _rows_bar(results, n: int, name: str):
    """A bar of the rows converted, on the terminal (its stderr, whatever the console routes)."""
    from tqdm import tqdm  # heavy: not loaded for --help

    screen = sys.__stderr__ or sys.stderr
    return tqdm(results, total=n, desc=f"prepare {name}", unit="row", file=screen,
                disable=not (n >= 500 and screen.isatty()))


def _load_local(source: Any, records: list[dict[str, Any]]):
    for rec in records:
        row, reason = load_record(source, rec)
        yield rec, row, reason


class _LoadRecords:
    """Ray Data UDF: JSON-encoded records -> shard rows + a reason column (null when good)."""

    def __init__(self, source: Any):
        self.source = source

    def __call__(self, batch: dict[str, Any]):
        cols: dict[str, list] = {f.name: [] for f in SHARD_SCHEMA} | {"idx": [], "reason": []}
        for idx, rec_json in zip(batch["idx"], batch["record"]):
            rec = json.loads(rec_json)
            row, reason = load_record(self.source, rec)
            row = row or {"sample_id": rec["sample_id"]}
            for f in SHARD_SCHEMA:
                cols[f.name].append(row.get(f.name, -1 if f.name.startswith("label") else None))
            cols["idx"].append(int(idx))
            cols["reason"].append(reason)
        schema = SHARD_SCHEMA.append(pa.field("idx", pa.int64())).append(pa.field("reason", pa.string()))
        return pa.Table.from_pydict(cols, schema=schema)


def _load_with_ray(source: Any, records: list[dict[str, Any]]):
    """Decode/validate records in parallel with Ray Data, yielding results in source order."""
    import ray  # heavy: not loaded for --help

    started = False
    if not ray.is_initialized():
        if os.environ.get("RAY_ADDRESS"):
            ray.init(log_to_driver=False)
        else:  # a local Ray bound to 127.0.0.1, like every other command's
            ray.init(**local_init_kwargs(), log_to_driver=False)
        started = True
    try:
        ctx = ray.data.DataContext.get_current()
        ctx.execution_options.preserve_order = True
        items = [{"idx": i, "record": json.dumps(r)} for i, r in enumerate(records)]
        per_block = 16 if any("video_path" in r for r in records) else 250  # videos: slow rows
        blocks = max(2, min(len(items) // per_block, 400))
        ds = ray.data.from_items(items, override_num_blocks=blocks).map_batches(
            _LoadRecords(source), batch_size=min(64, per_block), batch_format="numpy",
            zero_copy_batch=True)
        for table in ds.iter_batches(batch_size=256, batch_format="pyarrow"):
            for r in table.to_pylist():
                rec = records[r["idx"]]
                reason = r["reason"]
                row = None if reason else {f.name: r[f.name] for f in SHARD_SCHEMA}
                yield rec, row, reason
    finally:
        if started:
            ray.shutdown()


# ---- the synthetic default of `mmdist train` ----------------------------------------------------


def prepare_synthetic(out_dir: str | Path, cfg: Config, seed: int = 0) -> dict[str, Any]:
    """Synthetic shards for ``cfg`` in ``out_dir``; reused when already there with the same
    parameters and intact checksums (so a second `mmdist train` does not regenerate them).

    Args:
        out_dir: shard directory.
        cfg: the config; ``data.synthetic_source`` (``mmdist.data.generated``),
            ``data.synthetic_samples``, sizes, split and tokenizer settings apply.
        seed: dataset seed.

    Returns:
        The summary dict (``reused: True`` when nothing was written).
    """
    d = prepared_data(cfg)
    source = synthetic_source_for(cfg, d, seed)
    params = source_params(source, d, seed)
    out_dir = Path(out_dir)
    if (out_dir / MANIFEST).exists():
        try:
            manifest = verify_manifest(out_dir)
        except ManifestError:
            manifest = None
        if manifest is not None and manifest.get("params") == json.loads(json.dumps(params)):
            c = manifest["counts"]
            n_train = sum(1 for s in manifest["shards"] if s["split"] == "train")
            return {**c, "shards": len(manifest["shards"]), "out": str(out_dir),
                    "train_shards": n_train, "val_shards": len(manifest["shards"]) - n_train,
                    "quarantine_reasons": manifest.get("quarantine_reasons", {}),
                    "tokenizer": str(out_dir / manifest["tokenizer"]),
                    "vocab_size": manifest["tokenizer_vocab_size"],
                    "manifest_sha256": manifest["manifest_sha256"], "reused": True}
    return {**convert(source, out_dir, d, seed=seed, params=params), "reused": False}
