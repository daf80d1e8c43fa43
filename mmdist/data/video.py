"""Video as pure functions: a video file -> K sampled frames (a PNG strip) + its audio track,
and the strip -> uint8 ``(K, 3, S, S)`` at training time.

Decoding uses PyAV (its wheels bundle FFmpeg: MP4, WebM, AVI, MKV, MOV; nothing from the
system). ``mmdist prepare`` samples at most ``data.video_frames`` frames

* uniformly (default): frame ``i`` of K is the centre of the i-th of K equal segments of the
  clip's N frames, ``floor((i + 0.5) * N / K)`` (:func:`uniform_indices`; N < K repeats frames);
* at ``data.video_fps``: the frames nearest to ``0, 1/fps, 2/fps, ...`` seconds, at most K of
  them (a short clip gives fewer),

resizes each (shorter side to ``data.image_size``, centre crop) and stores them in the shard's
``video`` column as one PNG image K frames tall (:func:`frames_to_strip`; lossless, viewable).
The audio track, when there is one, becomes the row's ``audio`` (mono FLAC at
``data.sample_rate``). Training reads the strip back (:func:`strip_to_frames`) and resamples it
uniformly to the K of its own config, so shards prepared with more frames still serve.
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

VIDEO_EXTENSIONS = (".mp4", ".webm", ".avi", ".mkv", ".mov", ".m4v")
SUBTITLE_EXTENSIONS = (".srt", ".vtt")


class VideoError(ValueError):
    """A video that cannot become a row: the message is the quarantine reason."""


@dataclass(frozen=True)
class VideoSpec:
    """How a video becomes frames and audio (from ``DataConfig``).

    Args:
        frames: K, the most frames sampled.
        fps: sample at this rate instead of uniformly (None: uniform).
        size: side S of the stored square frames.
        sample_rate: Hz of the extracted audio track.
        max_seconds: longer videos are refused (``data.max_video_seconds``).
        max_audio_seconds: the sound track is cut here (``data.max_audio_seconds``).
    """

    frames: int = 8
    fps: float | None = None
    size: int = 64
    sample_rate: int = 16000
    max_seconds: float = 3600.0
    max_audio_seconds: float = 600.0

    @classmethod
    def from_config(cls, data: Any) -> VideoSpec:
        return cls(frames=data.video_frames, fps=data.video_fps, size=data.image_size,
                   sample_rate=data.sample_rate, max_seconds=data.max_video_seconds,
                   max_audio_seconds=data.max_audio_seconds)


@dataclass(frozen=True)
class DecodedVideo:
    """What :func:`decode_video` read: frames ``(n, S, S, 3)`` uint8, the source indices of
    those frames (decode order), the frames counted (all of them when sampled uniformly), the
    duration (s), and the mono audio track (or None)."""

    frames: np.ndarray
    indices: list[int]
    num_frames: int
    seconds: float
    audio: np.ndarray | None


def uniform_indices(n: int, k: int) -> list[int]:
    """K frame indices of N, uniformly: the centre of each of K equal segments."""
    if n < 1 or k < 1:
        raise ValueError(f"uniform_indices(n={n}, k={k}): both must be >= 1")
    return [min(n - 1, int((i + 0.5) * n / k)) for i in range(k)]


def subtitle_text(data: bytes) -> str:
    """The cue texts of an SRT or WebVTT file, in order, joined by spaces (numbers, times,
    headers, styling tags and notes left out)."""
    text = data.decode("utf-8-sig", errors="replace").replace("\r\n", "\n")
    cues = []
    for block in re.split(r"\n\s*\n", text):
        lines = [x.strip() for x in block.strip().split("\n") if x.strip()]
        if not lines or lines[0].startswith(("WEBVTT", "NOTE", "STYLE", "REGION")):
            continue
        timing = next((i for i, x in enumerate(lines) if "-->" in x), None)
        if timing is not None:  # the lines after the timing line (an id may come before it)
            cues.extend(re.sub(r"<[^>]*>|\{[^}]*\}", "", x) for x in lines[timing + 1:])
    return " ".join(c.strip() for c in cues if c.strip())


def subtitles_beside(video: str | Path) -> Path | None:
    """``clip.srt`` or ``clip.vtt`` next to ``clip.mp4``, if there is one."""
    p = Path(video)
    for ext in SUBTITLE_EXTENSIONS:
        if p.with_suffix(ext).is_file():
            return p.with_suffix(ext)
    return None


def _square(rgb: np.ndarray, size: int) -> np.ndarray:
    img = Image.fromarray(rgb)
    w, h = img.size
    side = min(w, h)
    left, top = (w - side) // 2, (h - side) // 2
    if (w, h) != (size, size):
        img = img.resize((size, size), Image.BILINEAR, box=(left, top, left + side, top + side),
                         reducing_gap=2.0)
    return np.asarray(img.convert("RGB"), dtype=np.uint8)


def _open(source: str | Path | bytes):
    import av  # PyAV: FFmpeg's libraries, loaded on first use

    f = io.BytesIO(source) if isinstance(source, bytes) else str(source)
    return av.open(f, mode="r")


def decode_video(source: str | Path | bytes, spec: VideoSpec) -> DecodedVideo:
    """Sample, resize and return the frames of a video file (path or bytes) and its audio.

    Raises:
        VideoError: not a video FFmpeg can read, no video stream, no decodable frame, or
            longer than ``spec.max_seconds``; the message says which.
    """
    import av

    if isinstance(source, bytes) and not source:
        raise VideoError("empty video: empty file (0 bytes)")
    if not isinstance(source, bytes) and Path(source).is_file() and not Path(source).stat().st_size:
        raise VideoError("empty video: empty file (0 bytes)")
    try:
        container = _open(source)
    except (av.FFmpegError, OSError, ValueError) as e:
        msg = re.sub(r":\s*'<none>'$", "", str(e))
        raise VideoError(f"undecodable video: {type(e).__name__}: {msg}") from None
    with container:
        if not container.streams.video:
            raise VideoError("empty video: no video stream")
        stream = container.streams.video[0]
        seconds = _duration(container, stream)
        if seconds > spec.max_seconds:
            raise VideoError(f"video too long: {seconds:,.1f} s, over "
                             f"data.max_video_seconds={spec.max_seconds:g}")
        if spec.fps:
            frames, idx, n, last = _decode_at_fps(container, stream, spec)
        else:
            n = _count_packets(container, stream)
            frames, idx, n, last = _decode_uniform(source, spec, n)
    audio = decode_audio_track(source, spec.sample_rate, spec.max_audio_seconds)
    return DecodedVideo(np.stack(frames), idx, n, float(seconds or last), audio)


def _frames(container: Any, stream: Any):
    """Decoded frames of ``stream`` as ``(position, frame)``; a damaged tail ends them (the
    frames before it are kept), a first frame that cannot decode is an error."""
    import av

    i = 0
    try:
        for frame in container.decode(stream):
            yield i, frame
            i += 1
    except av.FFmpegError as e:
        if i == 0:
            raise VideoError(f"undecodable video: {type(e).__name__}: {e}") from None


def _count_packets(container: Any, stream: Any) -> int:
    """Frames in ``stream`` by its packets (demuxed, not decoded: cheap), then rewound."""
    import av

    n = 0
    try:
        for packet in container.demux(stream):
            if packet.size:
                n += 1
    except av.FFmpegError:
        pass
    return n


def _decode_uniform(source: Any, spec: VideoSpec, n: int):
    """Keep only the frames at :func:`uniform_indices`; when fewer than ``n`` decode (a damaged
    tail, packets that are not frames) sample again over those that did."""
    for _ in range(2):
        want = uniform_indices(max(n, 1), spec.frames)
        keep: dict[int, np.ndarray] = {}
        count, last = 0, 0.0
        with _open(source) as container:
            stream = container.streams.video[0]
            for i, frame in _frames(container, stream):
                count = i + 1
                last = float(frame.time or 0.0)
                if i in want:
                    keep[i] = _square(frame.to_ndarray(format="rgb24"), spec.size)
                if i >= want[-1] and count >= n:
                    break
        if count == 0:
            raise VideoError("empty video: 0 frames decoded")
        if all(i in keep for i in want):
            return [keep[i] for i in want], want, max(n, count), last
        n = count
    raise VideoError(f"undecodable video: frames {sorted(set(want) - set(keep))} of {n} "
                     "did not decode")


def _decode_at_fps(container: Any, stream: Any, spec: VideoSpec):
    """The first frame at or past each of ``0, 1/fps, ...`` s (within half a frame), at most K."""
    rate = float(stream.average_rate or stream.guessed_rate or 25)
    frames, idx, t0, last, count = [], [], None, 0.0, 0
    for i, frame in _frames(container, stream):
        count = i + 1
        t = float(frame.time if frame.time is not None else i / rate)
        t0 = t if t0 is None else t0
        last = t - t0
        if last >= len(idx) / spec.fps - 0.5 / rate:
            frames.append(_square(frame.to_ndarray(format="rgb24"), spec.size))
            idx.append(i)
            if len(idx) == spec.frames:
                break
    if not frames:
        raise VideoError("empty video: 0 frames decoded")
    return frames, idx, count, last


def _duration(container: Any, stream: Any) -> float:
    if stream.duration is not None and stream.time_base is not None:
        return float(stream.duration * stream.time_base)
    if container.duration is not None:
        return container.duration / 1_000_000  # AV_TIME_BASE
    return 0.0


def decode_audio_track(source: str | Path | bytes, sample_rate: int,
                       max_seconds: float) -> np.ndarray | None:
    """The first audio stream as mono float32 at ``sample_rate`` (None: no audio stream, or
    one with no decodable samples)."""
    import av

    with _open(source) as container:
        if not container.streams.audio:
            return None
        resampler = av.AudioResampler(format="flt", layout="mono", rate=sample_rate)
        parts, total, cap = [], 0, int(max_seconds * sample_rate)
        try:
            for frame in container.decode(container.streams.audio[0]):
                for out in resampler.resample(frame):
                    parts.append(out.to_ndarray().reshape(-1))
                    total += parts[-1].size
                if total >= cap:
                    break
            for out in resampler.resample(None):
                parts.append(out.to_ndarray().reshape(-1))
        except av.FFmpegError:
            pass  # a damaged tail: keep what decoded
    if not parts:
        return None
    wave = np.concatenate(parts).astype(np.float32)[:cap]
    return wave if wave.size else None


def frames_to_strip(frames: np.ndarray) -> bytes:
    """``(K, S, S, 3)`` uint8 -> PNG bytes of one image ``S`` wide and ``K * S`` tall."""
    k, h, w, _ = frames.shape
    buf = io.BytesIO()
    Image.fromarray(np.ascontiguousarray(frames.reshape(k * h, w, 3))).save(
        buf, format="PNG", compress_level=1)
    return buf.getvalue()


def strip_to_frames(data: bytes, k: int, size: int) -> np.ndarray:
    """A stored PNG strip -> uint8 ``(k, 3, size, size)``: its frames resampled uniformly to
    ``k`` (:func:`uniform_indices`) and resized to ``size``.

    Raises:
        Exception: bytes PIL cannot decode, or not a strip of square frames.
    """
    img = Image.open(io.BytesIO(data))
    img = img.convert("RGB") if img.mode != "RGB" else img
    w, h = img.size
    if w < 1 or h % w:
        raise ValueError(f"not a strip of square frames: {w} x {h} pixels")
    arr = np.asarray(img, dtype=np.uint8).reshape(h // w, w, w, 3)
    arr = arr[uniform_indices(h // w, k)]
    if w != size:
        arr = np.stack([np.asarray(Image.fromarray(f).resize((size, size), Image.BILINEAR))
                        for f in arr])
    return np.ascontiguousarray(arr.transpose(0, 3, 1, 2))


def audio_flac(wave: np.ndarray, sample_rate: int) -> bytes:
    """Mono float32 -> FLAC bytes (16-bit)."""
    buf = io.BytesIO()
    sf.write(buf, np.clip(wave, -1, 1), sample_rate, format="FLAC", subtype="PCM_16")
    return buf.getvalue()


def video_fields(source: str | Path | bytes, spec: VideoSpec) -> dict[str, Any]:
    """The shard fields of one video: ``video`` (PNG strip), ``audio`` (FLAC or None) and
    ``frame_indices`` (which source frames were taken).

    Raises:
        VideoError: see :func:`decode_video`.
    """
    d = decode_video(source, spec)
    audio = audio_flac(d.audio, spec.sample_rate) if d.audio is not None else None
    return {"video": frames_to_strip(d.frames), "audio": audio, "frame_indices": d.indices}


def write_video(path: str | Path, frames: np.ndarray, fps: int = 8,
                audio: np.ndarray | None = None, sample_rate: int = 16000,
                codec: str | None = None) -> Path:
    """Write ``(N, H, W, 3)`` uint8 frames (and mono float32 audio) as a video file; the
    container from the suffix (.mp4: H.264 + AAC, .webm: VP9 + Opus, .avi: MPEG-4 + PCM).
    Tests, the benchmark and demos make real files with it."""
    import av

    path = Path(path)
    suffix = path.suffix.lower()
    vcodec, acodec = {".mp4": ("libx264", "aac"), ".webm": ("libvpx-vp9", "libopus"),
                      ".avi": ("mpeg4", "pcm_s16le"), ".mkv": ("libx264", "flac")}.get(
        suffix, ("libx264", "aac"))
    vcodec = codec or vcodec
    n, h, w, _ = frames.shape
    with av.open(str(path), mode="w") as out:
        vs = out.add_stream(vcodec, rate=fps)
        vs.width, vs.height, vs.pix_fmt = w, h, "yuv420p"
        if vcodec == "libx264":
            vs.options = {"crf": "12", "preset": "ultrafast", "bf": "0"}
        elif vcodec == "mpeg4":
            vs.options = {"qscale": "2"}
        as_ = None
        if audio is not None:
            rate = 48000 if acodec == "libopus" else sample_rate
            as_ = out.add_stream(acodec, rate=rate, layout="mono")
        for f in frames:
            for packet in vs.encode(av.VideoFrame.from_ndarray(np.ascontiguousarray(f),
                                                               format="rgb24")):
                out.mux(packet)
        for packet in vs.encode():
            out.mux(packet)
        if as_ is not None:
            _encode_audio(out, as_, audio, sample_rate)
    return path


def _encode_audio(out: Any, stream: Any, audio: np.ndarray, sample_rate: int) -> None:
    import av

    fmt = stream.codec_context.format.name if stream.codec_context.format else "fltp"
    resampler = av.AudioResampler(format=fmt, layout="mono", rate=stream.rate)
    step = stream.codec_context.frame_size or 1024
    if stream.rate != sample_rate:  # whole-clip resampling first keeps the frames simple
        src = av.AudioFrame.from_ndarray(audio.astype(np.float32)[None, :], format="flt",
                                         layout="mono")
        src.sample_rate = sample_rate
        pieces = [f.to_ndarray() for f in resampler.resample(src)]
        pieces += [f.to_ndarray() for f in resampler.resample(None)]
        samples = np.concatenate(pieces, axis=-1)
    else:
        samples = audio.astype(np.float32)[None, :]
        src_fmt = "flt"
        frame = av.AudioFrame.from_ndarray(samples, format=src_fmt, layout="mono")
        frame.sample_rate = sample_rate
        samples = np.concatenate([f.to_ndarray() for f in resampler.resample(frame)]
                                 + [f.to_ndarray() for f in resampler.resample(None)], axis=-1)
    pts = 0
    for start in range(0, samples.shape[-1], step):
        chunk = np.ascontiguousarray(samples[..., start:start + step])
        frame = av.AudioFrame.from_ndarray(chunk, format=fmt, layout="mono")
        frame.sample_rate, frame.pts = stream.rate, pts
        pts += chunk.shape[-1]
        for packet in stream.encode(frame):
            out.mux(packet)
    for packet in stream.encode():
        out.mux(packet)
