"""The video part of `mmdist prepare`: its flags and sources.

    mmdist prepare --source video --videos msrvtt/videos --captions msrvtt/captions.csv --out DIR
    mmdist prepare --source synthetic_video --out DIR --num-samples 512 --video-captions target
    mmdist prepare --source jsonl --manifest clips.jsonl --out DIR   # lines with a "video" key

``data.video_frames`` / ``data.video_fps`` choose the frames, ``data.image_size`` their size
(``mmdist.data.video``). `mmdist train` without ``data.path`` prepares the synthetic video
source when ``model.modalities`` lists video (``mmdist.data.generated``).
"""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import TYPE_CHECKING, Any

import pyarrow.parquet as pq

from mmdist.data.preprocess import PreprocessSpec
from mmdist.data.rows import RowLimits, SourceError
from mmdist.data.sources import JsonlSource
from mmdist.data.video import VideoSpec
from mmdist.data.video_sources import CAPTION_ROLES, VideoCsvSource

if TYPE_CHECKING:
    from mmdist.config import DataConfig


def add_video_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--videos", metavar="DIR",
                        help="video: directory of the video files (MP4, WebM, AVI, MKV, MOV)")
    parser.add_argument("--video-captions", choices=CAPTION_ROLES, default="text",
                        help="video, synthetic_video: the caption is the row's text (text, "
                             "the default: retrieval, matching, classification) or its target, "
                             "with the subtitles as text (target: summarisation)")


def build_video_source(args: argparse.Namespace, data: DataConfig) -> Any | None:
    """The source of ``--source video``, and of ``jsonl`` (whose lines may name videos); None
    for other sources (``synthetic_video`` is built by ``mmdist.data.generated``)."""
    spec = VideoSpec.from_config(data)
    outside = bool(getattr(args, "allow_outside_root", False))
    if args.source == "jsonl" and args.manifest:
        return JsonlSource(manifest=args.manifest, limits=RowLimits.from_config(data),
                           allow_outside_root=outside, video_spec=spec)
    if args.source != "video":
        return None
    missing = [f"--{n}" for n in ("videos", "captions") if not getattr(args, n, None)]
    if missing:
        raise SourceError(f"--source video needs {' and '.join(missing)}")
    return VideoCsvSource(captions=args.captions, videos=args.videos, video_spec=spec,
                          limits=RowLimits.from_config(data), allow_outside_root=outside,
                          caption_as=args.video_captions)


def preprocess_entry(data: DataConfig, out: Path, shards: list[dict[str, Any]]) -> dict:
    """The manifest's ``preprocess`` entry: ``data``'s spec, reading ``data.video_frames``
    frames per row when any shard row holds a video (the DataLoader path reads it)."""
    video = False
    for s in shards:
        if "video" in pq.read_schema(out / s["path"]).names:
            col = pq.read_table(out / s["path"], columns=["video"]).column("video")
            video = video or col.null_count < len(col)
    return PreprocessSpec.from_config(data, video=video).to_dict()

