"""What one source row may be: the checks every source applies before a row becomes a shard row
(types, decodable image and audio, the :class:`RowLimits`, paths inside the dataset folder).
A failed check raises :class:`RowError`, whose message is the row's quarantine reason: its kind
before the first colon, the row's own values after it (``shards.reason_kind``).
"""

from __future__ import annotations

import io
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import soundfile as sf
from PIL import Image

from mmdist.data.image import decode_image


class RowError(ValueError):
    """One row is bad; the message is the quarantine reason."""


class SourceError(RuntimeError):
    """The source cannot be read at all (names the file and what is wrong)."""


@dataclass(frozen=True)
class RowLimits:
    """The most a row may hold (``data.max_image_pixels``, ``max_audio_seconds``,
    ``max_text_chars``): past them a row is quarantined, before it is decoded where the header
    tells."""

    max_image_pixels: int = 40_000_000
    max_audio_seconds: float = 600.0
    max_text_chars: int = 20_000

    @classmethod
    def from_config(cls, data: Any) -> RowLimits:
        return cls(data.max_image_pixels, data.max_audio_seconds, data.max_text_chars)


def inside(root: str | Path, rel: str, what: str, allow_outside: bool = False) -> str:
    """``root / rel``, refused (RowError) when it leads out of ``root``: an absolute path,
    ``..``, or a symlink to elsewhere, unless ``allow_outside``."""
    p = Path(root) / rel
    if allow_outside:
        return str(p)
    top, real = Path(root).resolve(), p.resolve()
    if real != top and top not in real.parents:
        raise RowError(f"{what} path outside the dataset folder (pass --allow-outside-root to "
                       f"read it): {rel!r} leads to {real}, outside {root}")
    return str(p)


def check_image(data: bytes, max_pixels: int = RowLimits.max_image_pixels) -> None:
    """Decode image bytes the way training will (any mode -> 8-bit RGB, see
    ``image.decode_image``); raise RowError when that fails, so a row that passes here
    never turns into a missing image at training time. The size in the header is checked
    against ``max_pixels`` before the pixels are decoded (a decompression bomb)."""
    mode = None
    try:
        with Image.open(io.BytesIO(data)) as img:
            if img.size[0] < 1 or img.size[1] < 1:
                raise RowError(f"empty image: size {img.size}")
            w, h = img.size
            if w * h > max_pixels:
                raise RowError(f"image too large: {w} x {h} = {w * h:,} pixels, over "
                               f"data.max_image_pixels={max_pixels:,}")
            mode = img.mode
        decode_image(data, 8)  # parses the whole bitstream and converts the mode
    except RowError:
        raise
    except Exception as e:
        # PIL names the in-memory buffer (<_io.BytesIO object at 0x...>); the row's origin
        # names the file
        msg = re.sub(r"\s*<_io\.BytesIO object at 0x[0-9a-f]+>", "", str(e))
        raise RowError(f"undecodable image: {f'mode {mode}, ' if mode else ''}"
                       f"{type(e).__name__}: {msg}") from None


def check_audio(data: bytes, max_seconds: float = RowLimits.max_audio_seconds) -> None:
    """Fully decode WAV/FLAC bytes; raise RowError when soundfile cannot, it is empty, or it
    lasts longer than ``max_seconds`` (by its header, then by what decodes)."""
    if not data:
        raise RowError("undecodable audio: empty file (0 bytes)")
    try:
        info = sf.info(io.BytesIO(data))
        if info.samplerate > 0 and info.frames / info.samplerate > max_seconds:
            raise RowError(f"audio too long: {info.frames / info.samplerate:,.1f} s, over "
                           f"data.max_audio_seconds={max_seconds:g}")
        wav, rate = sf.read(io.BytesIO(data), dtype="float32", always_2d=True)
    except RowError:
        raise
    except Exception as e:
        # soundfile names the in-memory buffer (<_io.BytesIO object at 0x...>); drop that
        msg = re.sub(r"Error opening <_io\.BytesIO object at 0x[0-9a-f]+>: ", "", str(e))
        raise RowError(f"undecodable audio: {type(e).__name__}: {msg}") from None
    if wav.shape[0] == 0 or wav.shape[1] == 0:
        raise RowError(f"empty audio: 0 samples ({wav.shape[1]} channel(s) at {rate} Hz)")
    if not np.isfinite(wav).all():
        raise RowError("bad audio: samples are NaN or infinite")
    if wav.shape[0] / rate > max_seconds:  # a header that under-stated the length
        raise RowError(f"audio too long: {wav.shape[0] / rate:,.1f} s, over "
                       f"data.max_audio_seconds={max_seconds:g}")


def read_file(path: str | Path, what: str) -> bytes:
    p = Path(path)
    if not p.is_file():
        raise RowError(f"missing {what} file: {p}")
    return p.read_bytes()


def _check_label(value: Any, name: str) -> int:
    if value is None:
        return -1
    if isinstance(value, bool) or not isinstance(value, int):
        if isinstance(value, float) and value.is_integer():
            value = int(value)
        else:
            raise RowError(f"{name} must be an integer: got {type(value).__name__} "
                           f"{value!r:.60}")
    if value < -1:
        raise RowError(f"{name} must be >= 0 (or -1 / absent): got {value}")
    return value


def make_row(sample_id: int, text: Any = None, target: Any = None, label: Any = None,
             image: bytes | None = None, audio: bytes | None = None,
             text_required: bool = False, label_image: Any = None,
             label_audio: Any = None, limits: RowLimits = RowLimits(),
             video: bytes | None = None) -> dict[str, Any]:
    """Validate the fields of one row and return it in the shard schema.

    ``video`` is a frame strip made by ``data.video`` (already decoded and checked).

    Raises:
        RowError: wrong types, empty text, no modality at all, undecodable image/audio, past
            ``limits``.
    """
    if text is not None and not isinstance(text, str):
        raise RowError(f"text must be a string: got {type(text).__name__} {text!r:.60}")
    for name, value in (("text", text), ("target", target)):
        if isinstance(value, str) and len(value) > limits.max_text_chars:
            raise RowError(f"{name} too long: {len(value):,} characters, over "
                           f"data.max_text_chars={limits.max_text_chars:,}")
    if text is not None and not text.strip():
        raise RowError("empty text")
    if text is None and text_required:
        raise RowError("no text")
    if target is not None and not isinstance(target, str):
        raise RowError(f"target must be a string: got {type(target).__name__} {target!r:.60}")
    if target is not None and not target.strip():
        target = None
    label = _check_label(label, "label")
    label_image = _check_label(label_image, "label_image")
    label_audio = _check_label(label_audio, "label_audio")
    if text is None and image is None and audio is None and video is None:
        raise RowError("no text, image or audio")
    if image is not None:
        check_image(image, limits.max_image_pixels)
    if audio is not None:
        check_audio(audio, limits.max_audio_seconds)
    return {"sample_id": int(sample_id), "text": text, "target": target, "label": label,
            "image": image, "audio": audio, "label_image": label_image,
            "label_audio": label_audio, "video": video}
