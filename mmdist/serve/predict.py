"""`mmdist predict`: run a model on one example with any subset of its modalities.

    mmdist predict --model models:/mmdist-demo@champion --image cat.png --text "a red circle"
    mmdist predict --model ./my-model --audio tone.wav --text "a low tone" --json
    mmdist predict --model models:/ref-video-summary@champion --video clip.mp4 --text "look"
"""

from __future__ import annotations

import argparse
import tempfile
from pathlib import Path
from typing import Any

from mmdist.errors import CommandError
from mmdist.serve.pull import pull


def configure_parser(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--model", required=True, metavar="URI_OR_DIR",
                        help="a model directory (from `mmdist pull`) or models:/NAME@ALIAS, "
                             "models:/NAME/VERSION, runs:/RUN_ID/model")
    parser.add_argument("--image", default=None, metavar="PATH", help="image file (PNG, JPEG, ...)")
    parser.add_argument("--audio", default=None, metavar="PATH", help="audio file (WAV or FLAC)")
    parser.add_argument("--video", default=None, metavar="PATH",
                        help="video file (MP4, WebM, AVI, MKV, MOV), decoded as `mmdist "
                             "prepare` does: its sound track is the audio and the subtitles "
                             "beside it (clip.srt/.vtt) the text unless --audio/--text are given")
    parser.add_argument("--text", default=None, help="text input (caption, question, ...)")
    parser.add_argument("--tracking-uri", default=None,
                        help="MLflow tracking URI for models:/ and runs:/ (default: "
                             "$MLFLOW_TRACKING_URI, else ./mlflow.db)")
    parser.add_argument("--cache", default=".cache/models",
                        help="where pulled models are kept (default: .cache/models)")


def resolve_model_dir(model: str, tracking_uri: str | None, cache: str | Path) -> Path:
    """A local model directory for a directory path or a models:/ / runs:/ URI (pulled into ``cache``)."""
    if not (model.startswith("models:/") or model.startswith("runs:/")):
        p = Path(model)
        if not (p / "config.json").exists():
            raise CommandError(f"--model {model}: not a model directory (no config.json) "
                               "and not a models:/ or runs:/ URI")
        return p

    cache = Path(cache)
    cache.mkdir(parents=True, exist_ok=True)
    dst = Path(tempfile.mkdtemp(prefix="pull-", dir=cache))  # aliases move: pull each time
    pull(model, dst, tracking_uri)
    return dst


def run(args: argparse.Namespace) -> dict[str, Any]:
    from mmdist.serve.predictor import Predictor  # loads torch: not for --help

    if not (args.image or args.audio or args.text or args.video):
        raise CommandError("give at least one of --image, --audio, --video, --text")
    try:
        predictor = Predictor.from_dir(resolve_model_dir(args.model, args.tracking_uri,
                                                         args.cache))
    except ValueError as e:  # e.g. pickled weights: refused, never loaded
        raise CommandError(str(e)) from None
    row = {"text": args.text, "image": args.image, "audio": args.audio, "video": args.video}
    try:
        answer = predictor.predict_rows([row])[0]
    except (ValueError, TypeError) as e:
        raise CommandError(str(e)) from None
    if not args.json:
        given = ", ".join(k for k, v in row.items() if v)
        print(f"task {answer['task']} on {given}:")
        if "score" in answer:
            print(f"  match score {answer['score']:.4f}")
        if "label" in answer:
            print(f"  class {answer['label']} with probability {answer['probability']:.4f}")
        if "text" in answer:
            print(f"  generated: {answer['text']}")
    return {"ok": True, **answer}
