"""Video rows: one video file -> the ``video`` (sampled frames), ``audio`` (its sound track) and
``text`` (its subtitles) of a shard row, and the folder + captions CSV source of MSR-VTT / MSVD.

    src = VideoCsvSource(captions="msrvtt/captions.csv", videos="msrvtt/videos/")
    rows = [src.load(r) for r in src.records()]

JSONL manifests name videos with a ``video`` key (``mmdist.data.sources.JsonlSource``); both go
through :func:`load_video`, which quarantines undecodable, empty and too-long videos with the
reason (:class:`mmdist.data.rows.RowError`).
"""

from __future__ import annotations

import csv
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from mmdist.data.rows import RowError, RowLimits, SourceError, inside, make_row
from mmdist.data.video import (
    VIDEO_EXTENSIONS,
    VideoError,
    VideoSpec,
    subtitle_text,
    subtitles_beside,
    video_fields,
)

# file columns of MSR-VTT (video_id), MSVD (VideoID + Start + End, or a file name), and others
VIDEO_COLUMNS = ("video", "video_id", "videoid", "file_name", "filename", "file", "path")
CAPTION_COLUMNS = ("caption", "sentence", "description", "text")
CAPTION_ROLES = ("text", "target")


def load_video(path: str, spec: VideoSpec, limits: RowLimits) -> dict[str, Any]:
    """``video`` (PNG strip), ``audio`` (FLAC of the sound track, or None) and ``subtitles``
    (the text of ``clip.srt`` / ``clip.vtt`` beside it, or None) of one video file.

    Raises:
        RowError: missing, undecodable, empty or too long (the message is the reason).
    """
    p = Path(path)
    if not p.is_file():
        raise RowError(f"missing video file: {p}")
    try:
        fields = video_fields(p, spec)
    except VideoError as e:
        raise RowError(str(e)) from None
    sub = subtitles_beside(p)
    text = None
    if sub is not None:
        text = subtitle_text(sub.read_bytes()) or None
        if text and len(text) > limits.max_text_chars:
            raise RowError(f"subtitles too long: {len(text):,} characters in {sub.name}, over "
                           f"data.max_text_chars={limits.max_text_chars:,}")
    return {"video": fields["video"], "audio": fields["audio"], "subtitles": text}


@dataclass(frozen=True)
class VideoCsvSource:
    """A folder of videos + a captions CSV, one row per caption (MSR-VTT, MSVD style).

    The CSV needs a file column (one of :data:`VIDEO_COLUMNS`; names without an extension are
    looked up with each of ``VIDEO_EXTENSIONS``) and a caption column (``caption``,
    ``sentence``, ...). ``caption_as="text"``: the caption is the row's text (retrieval,
    matching); ``"target"``: the caption is what the model writes, and the subtitles beside the
    video, if any, are the text (summarisation). An optional ``label`` column is the class.
    """

    captions: str
    videos: str
    video_spec: VideoSpec = VideoSpec()
    limits: RowLimits = RowLimits()
    allow_outside_root: bool = False
    caption_as: str = "text"
    name: str = "video"

    def records(self) -> Iterator[dict[str, Any]]:
        path = Path(self.captions)
        if self.caption_as not in CAPTION_ROLES:
            raise SourceError(f"--video-captions {self.caption_as}: choose from "
                                   f"{list(CAPTION_ROLES)}")
        if not path.is_file():
            raise SourceError(f"--captions {path}: no such file")
        if not Path(self.videos).is_dir():
            raise SourceError(f"--videos {self.videos}: not a directory")
        try:
            with path.open(newline="", encoding="utf-8") as f:
                rows = list(csv.DictReader(f))
        except (OSError, UnicodeDecodeError, csv.Error) as e:
            raise SourceError(f"--captions {path}: cannot read CSV: {e}") from None
        header = [c.strip() for c in (rows[0] if rows else {})]
        lower = {c.lower(): c for c in header}
        file_col = next((lower[c] for c in VIDEO_COLUMNS if c in lower), None)
        cap_col = next((lower[c] for c in CAPTION_COLUMNS if c in lower), None)
        if file_col is None or cap_col is None:
            raise SourceError(f"--captions {path}: needs a video column (one of "
                                   f"{list(VIDEO_COLUMNS)}) and a caption column (one of "
                                   f"{list(CAPTION_COLUMNS)}); found columns {header}")
        for i, row in enumerate(rows):
            name = (row.get(file_col) or "").strip()
            rec: dict[str, Any] = {"sample_id": i, "origin": f"{path}:{i + 2}", "group": name,
                                   "caption": row.get(cap_col), "label": row.get("label")}
            if not name:
                rec["error"] = f"empty {file_col}"
            else:
                try:
                    rec["video_path"] = inside(self.videos, self._resolve(name), "video",
                                               self.allow_outside_root)
                except RowError as e:
                    rec["error"] = str(e)
            yield rec
        if not rows:
            raise SourceError(f"--captions {path}: no rows (a header and no captions)")

    def _resolve(self, name: str) -> str:
        p = Path(self.videos) / name
        if p.suffix.lower() in VIDEO_EXTENSIONS or p.exists():
            return name
        for ext in VIDEO_EXTENSIONS:
            if p.with_name(p.name + ext).exists():
                return name + ext
        return name + ".mp4"

    def load(self, record: dict[str, Any]) -> dict[str, Any]:
        if "error" in record:
            raise RowError(record["error"])
        v = load_video(record["video_path"], self.video_spec, self.limits)
        label = record.get("label")
        if isinstance(label, str) and label.strip():
            try:
                label = int(label)
            except ValueError:
                raise RowError(f"label must be an integer: got {label!r:.60}") from None
        else:
            label = None
        caption = record.get("caption")
        if self.caption_as == "text":
            text, target = caption, None
        else:
            text, target = v["subtitles"], caption
        return make_row(record["sample_id"], text=text, target=target, label=label,
                        audio=v["audio"], video=v["video"], limits=self.limits)
