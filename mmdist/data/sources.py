"""Readers that turn a data source into validated shard rows.

A source works in two steps so that the expensive part can run in parallel (Ray Data):

    src = JsonlSource("data/manifest.jsonl")
    records = list(src.records())      # cheap: one small dict per row (paths, text, ids)
    row = src.load(records[0])         # reads + decodes files; raises RowError(reason)

``records()`` raises ``SourceError`` when the source cannot be read at all (missing captions
file, not JSON, no usable columns). ``load()`` returns a row of ``schema.SHARD_SCHEMA``
(``sample_id, text, target, label, image, audio``) or raises :class:`RowError` naming what is
wrong (missing file, undecodable image/audio, empty text, wrong types, past the
:class:`RowLimits`, a path leading out of the dataset folder, a duplicate id, a line that is not
UTF-8); such rows go to quarantine and the rest of the source is kept. Every record has a stable ``sample_id`` (its position in the source), an
``origin`` (file and line/annotation, for people) and a ``group`` (rows of one group, e.g. the
captions of one image, always land in the same split).
"""

from __future__ import annotations

import csv
import json
import posixpath
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from mmdist.data.rows import RowError, RowLimits, SourceError, inside, make_row, read_file
from mmdist.data.synthetic import audio_label, generate_sample, image_label
from mmdist.data.video import VideoSpec
from mmdist.data.video_sources import load_video

SOURCES = ("synthetic", "digits", "mmt", "coco", "jsonl", "audiocaps", "video",
           "synthetic_video")
AUDIO_EXTENSIONS = (".wav", ".flac")


# ---- sources ------------------------------------------------------------------------------


@dataclass(frozen=True)
class SyntheticSource:
    """The learnable synthetic dataset of :mod:`mmdist.data.synthetic`."""

    num_samples: int
    seed: int = 0
    image_size: int = 64
    sample_rate: int = 16000
    audio_seconds: float = 1.0
    modality_labels: bool = True  # rows carry label_image / label_audio
    name: str = "synthetic"

    def records(self) -> Iterator[dict[str, Any]]:
        if self.num_samples < 1:
            raise SourceError(f"--num-samples={self.num_samples}: must be >= 1")
        for i in range(self.num_samples):
            yield {"sample_id": i, "origin": f"synthetic seed={self.seed} index={i}",
                   "group": str(i)}

    def load(self, record: dict[str, Any]) -> dict[str, Any]:
        s = generate_sample(record["sample_id"], self.seed, self.image_size, self.sample_rate,
                            self.audio_seconds)
        # Generated rows are valid by construction; skip the decode check (it is the hot path).
        row = {"sample_id": s.index, "text": s.text, "target": s.target, "label": s.label,
               "image": s.image, "audio": s.audio, "label_image": -1, "label_audio": -1}
        if self.modality_labels:
            row.update(label_image=image_label(s.colour, s.shape), label_audio=audio_label(s.pitch))
        return row


@dataclass(frozen=True)
class CocoSource:
    """MS-COCO captions JSON (``images`` with ``id``/``file_name``; ``annotations`` with
    ``image_id``/``caption``) plus the image directory. One row per caption."""

    captions: str
    images: str
    limits: RowLimits = RowLimits()
    allow_outside_root: bool = False  # image paths may lead out of --images
    name: str = "coco"

    def records(self) -> Iterator[dict[str, Any]]:
        data = _load_json(self.captions)
        if not isinstance(data, dict) or not isinstance(data.get("annotations"), list):
            raise SourceError(f"{self.captions}: not COCO captions format (needs a list "
                              "'annotations' of {image_id, caption} and a list 'images')")
        if not Path(self.images).is_dir():
            raise SourceError(f"--images {self.images}: not a directory")
        files = {}
        for img in data.get("images") or []:
            if isinstance(img, dict) and "id" in img and "file_name" in img:
                files[img["id"]] = img["file_name"]
        if not data["annotations"]:
            raise SourceError(f"--captions {self.captions}: no rows ('annotations' is empty)")
        ids: dict[str, int] = {}
        for i, ann in enumerate(data["annotations"]):
            rec = {"sample_id": i, "origin": f"{self.captions}: annotations[{i}]",
                   "group": f"annotation {i}"}
            if not isinstance(ann, dict):
                rec["error"] = f"annotation is not an object: {ann!r:.60}"
            elif ann.get("image_id") not in files:
                rec["error"] = f"image_id not listed in 'images': {ann.get('image_id')!r}"
            elif "id" in ann and (first := _first_of(ids, ann["id"], i)) is not None:
                rec["error"] = f"duplicate id: {ann['id']!r}, first at annotations[{first}]"
            else:
                rec.update(group=f"image {ann['image_id']}", text=ann.get("caption"))
                try:
                    rec["image_path"] = inside(self.images, str(files[ann["image_id"]]),
                                               "image", self.allow_outside_root)
                except RowError as e:
                    rec["error"] = str(e)
            yield rec

    def load(self, record: dict[str, Any]) -> dict[str, Any]:
        if "error" in record:
            raise RowError(record["error"])
        image = read_file(record["image_path"], "image")
        return make_row(record["sample_id"], text=record["text"], image=image, text_required=True,
                        limits=self.limits)


@dataclass(frozen=True)
class JsonlSource:
    """One JSON object per line with any of ``image``, ``audio``, ``video`` (paths relative to
    the manifest), ``text``, ``target``, ``label``, ``label_image``, ``label_audio``. A video's
    sound track is the row's audio unless ``audio`` is given; its subtitles (``clip.srt`` /
    ``clip.vtt`` beside it) the text unless ``text`` is."""

    manifest: str
    limits: RowLimits = RowLimits()
    allow_outside_root: bool = False  # media paths may lead out of the manifest's folder
    video_spec: VideoSpec = VideoSpec()  # how videos become frames (data.video_*)
    name: str = "jsonl"

    def records(self) -> Iterator[dict[str, Any]]:
        path = Path(self.manifest)
        if not path.is_file():
            raise SourceError(f"--manifest {path}: no such file")
        try:
            lines = path.read_bytes().splitlines()
        except OSError as e:
            raise SourceError(f"--manifest {path}: cannot read: {e}") from None
        base = path.parent
        i = 0
        ids: dict[str, int] = {}
        for lineno, raw in enumerate(lines, 1):
            try:  # one line that is not UTF-8 is one bad row, not a lost manifest
                line = raw.decode("utf-8-sig" if lineno == 1 else "utf-8")
            except UnicodeDecodeError as e:
                line = None
                bad = f"line is not UTF-8 text: byte 0x{raw[e.start]:02x} at column {e.start + 1}"
            if line is not None and not line.strip():
                continue
            rec: dict[str, Any] = {"sample_id": i, "origin": f"{path}:{lineno}", "group": f"{i}"}
            i += 1
            if line is None:
                rec["error"] = bad
                yield rec
                continue
            try:
                obj = json.loads(line)
            except json.JSONDecodeError as e:
                rec["error"] = f"not valid JSON: {e}"
                yield rec
                continue
            if not isinstance(obj, dict):
                rec["error"] = f"line is not a JSON object: {line:.60}"
                yield rec
                continue
            unknown = sorted(set(obj) - {"image", "audio", "video", "text", "target", "label",
                                         "id", "label_image", "label_audio"})
            if unknown:
                rec["error"] = ("unknown keys (expected image, audio, video, text, target, "
                                f"label, label_image, label_audio, id): {unknown}")
                yield rec
                continue
            if "id" in obj and (first := _first_of(ids, obj["id"], lineno)) is not None:
                rec["error"] = f"duplicate id: {obj['id']!r}, first on line {first}"
                yield rec
                continue
            for key in ("image", "audio", "video"):
                v = obj.get(key)
                if v is None:
                    continue
                if not isinstance(v, str):
                    rec["error"] = f"{key} must be a path string: got {type(v).__name__}"
                    break
                try:
                    rec[f"{key}_path"] = inside(base, v, key, self.allow_outside_root)
                except RowError as e:
                    rec["error"] = str(e)
                    break
            media = next((k for k in ("image", "video", "audio") if f"{k}_path" in rec), None)
            if media:
                # rows sharing a media file share a split; its path as the manifest writes it,
                # not where the dataset lies today, so a moved dataset splits the same way
                rec["group"] = posixpath.normpath(obj[media])
            rec.update(text=obj.get("text"), target=obj.get("target"), label=obj.get("label"),
                       label_image=obj.get("label_image"), label_audio=obj.get("label_audio"))
            yield rec
        if i == 0:
            raise SourceError(f"--manifest {path}: no rows (the file is empty or blank); "
                              "expected one JSON object per line")

    def load(self, record: dict[str, Any]) -> dict[str, Any]:
        if "error" in record:
            raise RowError(record["error"])
        image = read_file(record["image_path"], "image") if "image_path" in record else None
        audio = read_file(record["audio_path"], "audio") if "audio_path" in record else None
        text, video = record.get("text"), None
        if "video_path" in record:
            v = load_video(record["video_path"], self.video_spec, self.limits)
            video, audio = v["video"], audio if audio is not None else v["audio"]
            text = text if text is not None else v["subtitles"]
        return make_row(record["sample_id"], text=text, target=record.get("target"),
                        label=record.get("label"), image=image, audio=audio,
                        label_image=record.get("label_image"),
                        label_audio=record.get("label_audio"), limits=self.limits, video=video)


_FILE_COLUMNS = ("file_name", "filename", "file", "path", "audio", "youtube_id", "audiocap_id")


def _not_utf8(text: str) -> bool:
    """Whether ``text`` holds bytes that were not UTF-8 (decoded with ``surrogateescape``)."""
    return any("\udc80" <= ch <= "\udcff" for ch in text)


def _first_bad_byte(text: str) -> int:
    return next(ord(ch) - 0xDC00 for ch in text if "\udc80" <= ch <= "\udcff")


@dataclass(frozen=True)
class AudioCapsSource:
    """Audio-caption CSV as in Clotho (``file_name, caption_1..caption_5``) or AudioCaps
    (``audiocap_id, youtube_id, start_time, caption``); one row per caption. File names without
    an extension are looked up as ``.wav`` then ``.flac`` in the audio directory."""

    captions: str
    audio: str
    limits: RowLimits = RowLimits()
    allow_outside_root: bool = False  # file names may lead out of --audio
    name: str = "audiocaps"

    def records(self) -> Iterator[dict[str, Any]]:
        path = Path(self.captions)
        if not path.is_file():
            raise SourceError(f"--captions {path}: no such file")
        if not Path(self.audio).is_dir():
            raise SourceError(f"--audio {self.audio}: not a directory")
        try:  # bytes that are not UTF-8 stay as surrogates: one bad row, not a lost file
            with path.open(newline="", encoding="utf-8", errors="surrogateescape") as f:
                rows = list(csv.DictReader(f))
                header = rows and list(rows[0]) or []
        except (OSError, csv.Error) as e:
            raise SourceError(f"--captions {path}: cannot read CSV: {e}") from None
        if _not_utf8(" ".join(header)):
            raise SourceError(f"--captions {path}: its header line is not UTF-8 text")
        file_col = next((c for c in _FILE_COLUMNS if c in header), None)
        cap_cols = [c for c in header if c == "caption" or c.startswith("caption_")]
        if file_col is None or not cap_cols:
            raise SourceError(f"--captions {path}: needs a file column (one of "
                              f"{list(_FILE_COLUMNS)}) and caption column(s) ('caption' or "
                              f"'caption_1'...); found columns {header}")
        i = 0
        for lineno, row in enumerate(rows, 2):
            name = (row.get(file_col) or "").strip()
            bad = [c for c, v in row.items() if isinstance(v, str) and _not_utf8(v)]
            for col in cap_cols:
                rec = {"sample_id": i, "origin": f"{path}:{lineno} {col}", "group": name,
                       "text": row.get(col)}
                i += 1
                if bad:
                    rec.update(error=f"line is not UTF-8 text (column {bad[0]}: byte "
                               f"0x{_first_bad_byte(row[bad[0]]):02x})", text=None, group="")
                elif not name:
                    rec["error"] = f"empty {file_col}"
                else:
                    try:
                        rec["audio_path"] = inside(self.audio, self._resolve(name), "audio",
                                                   self.allow_outside_root)
                    except RowError as e:
                        rec["error"] = str(e)
                yield rec
        if i == 0:
            raise SourceError(f"--captions {path}: no rows (a header and no captions)")

    def _resolve(self, name: str) -> str:
        """``name`` relative to ``--audio``, with ``.wav`` or ``.flac`` added when it has none."""
        p = Path(self.audio) / name
        if p.suffix.lower() in AUDIO_EXTENSIONS or p.exists():
            return name
        for ext in AUDIO_EXTENSIONS:
            if p.with_name(p.name + ext).exists():
                return name + ext
        return name + ".wav"

    def load(self, record: dict[str, Any]) -> dict[str, Any]:
        if "error" in record:
            raise RowError(record["error"])
        audio = read_file(record["audio_path"], "audio")
        return make_row(record["sample_id"], text=record["text"], audio=audio, text_required=True,
                        limits=self.limits)


def _first_of(seen: dict[str, int], value: Any, where: int) -> int | None:
    """Where ``value`` was first seen (None the first time; then it is recorded at ``where``)."""
    key = json.dumps(value, sort_keys=True, default=str)
    if key in seen:
        return seen[key]
    seen[key] = where
    return None


def _load_json(path: str) -> Any:
    p = Path(path)
    if not p.is_file():
        raise SourceError(f"--captions {p}: no such file")
    try:
        return json.loads(p.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise SourceError(f"--captions {p}: not valid JSON: {e}") from None


def load_record(source: Any, record: dict[str, Any]) -> tuple[dict[str, Any] | None, str | None]:
    """``(row, None)`` for a good record, ``(None, reason)`` for a bad one; never raises for
    a bad row (unexpected errors become a reason too, so one odd file cannot stop a run)."""
    try:
        return source.load(record), None
    except RowError as e:
        return None, str(e)
    except Exception as e:
        return None, f"{type(e).__name__}: {e}"
