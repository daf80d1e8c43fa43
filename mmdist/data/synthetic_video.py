"""A synthetic video dataset where the answer is in the motion: no single frame can tell it.

Each clip (``SOURCE_FRAMES`` frames at ``SOURCE_FPS``) shows one shape of a colour moving in
one of four directions across a background, with a soundtrack: a tone of one of two pitches.

    colour     in COLOURS      red, blue           every frame shows it
    shape      in SHAPES       circle, square      every frame shows it
    direction  in DIRECTIONS   right, left, down, up   only the motion shows it
    pitch      in PITCHES      low, high           heard in the audio

The shape moves on a torus (it leaves one side and comes back on the other) from a uniform
random start, so at every frame its position is uniform over the picture whatever the
direction: one frame tells nothing about the direction (chance 1/4), the average of the
frames tells only the axis (a horizontal or vertical streak: 1/2), and the order of the frames
tells all of it (1.0). The class ``label`` is the direction.

Rows: ``video`` (the frames, sampled to ``data.video_frames`` as real videos are), ``audio``
(the tone, WAV), ``label`` (direction), ``label_audio`` (pitch). With ``captions="text"`` the
text is a caption naming all four attributes (retrieval, matching: the motion must be seen);
with ``captions="target"`` the text is the subtitles ("here is a red circle": colour and shape
only) and the target the summary ("a red circle moves left with a low tone"), which needs the
frames (direction), the audio (pitch) and nothing else beside the subtitles. Every clip is a
pure function of ``(seed, index)``.
"""

from __future__ import annotations

import io
from dataclasses import dataclass
from typing import Any

import numpy as np
import soundfile as sf
from PIL import Image, ImageDraw

from mmdist.data.rows import SourceError
from mmdist.data.video import VideoSpec, frames_to_strip, uniform_indices

COLOURS = ("red", "blue")
COLOUR_RGB = {"red": (210, 40, 40), "blue": (40, 60, 210)}
SHAPES = ("circle", "square")
DIRECTIONS = ("right", "left", "down", "up")
STEP = {"right": (1, 0), "left": (-1, 0), "down": (0, 1), "up": (0, -1)}  # (dx, dy)
PITCHES = ("low", "high")
PITCH_HZ = {"low": 400.0, "high": 1600.0}
SOURCE_FRAMES = 16
SOURCE_FPS = 8
CAPTION_ROLES = ("text", "target")
_CAPTIONS = ("a {colour} {shape} moves {direction} while a {pitch} tone plays",
             "a {pitch} tone plays as the {colour} {shape} slides {direction}",
             "the {colour} {shape} is moving {direction} , the tone is {pitch}")
_SUBTITLES = ("here is a {colour} {shape}", "look at the {colour} {shape}",
              "watch this {colour} {shape}")


def summary_of(colour: str, shape: str, direction: str, pitch: str) -> str:
    """The canonical summary a model learns to write from subtitles + frames + audio."""
    return f"a {colour} {shape} moves {direction} with a {pitch} tone"


@dataclass(frozen=True)
class VideoClip:
    """One generated clip: frames ``(SOURCE_FRAMES, S, S, 3)`` uint8, audio, attributes."""

    index: int
    colour: str
    shape: str
    direction: str
    pitch: str
    frames: np.ndarray
    audio: np.ndarray  # mono float32
    caption: str
    subtitles: str


def generate_clip(index: int, seed: int = 0, size: int = 32,
                  sample_rate: int = 16000) -> VideoClip:
    """Clip ``index`` of the dataset of ``seed`` (a pure function of both)."""
    rng = np.random.default_rng([int(seed), int(index), 7])
    colour = COLOURS[rng.integers(len(COLOURS))]
    shape = SHAPES[rng.integers(len(SHAPES))]
    direction = DIRECTIONS[rng.integers(len(DIRECTIONS))]
    pitch = PITCHES[rng.integers(len(PITCHES))]
    side = rng.uniform(0.22, 0.32) * size
    speed = rng.uniform(0.8, 1.0) * size / SOURCE_FRAMES  # pixels per frame
    x0, y0 = rng.uniform(0, size, 2)
    dx, dy = STEP[direction]
    bg = int(rng.integers(150, 240))
    rgb = tuple(int(np.clip(c + rng.integers(-25, 26), 0, 255)) for c in COLOUR_RGB[colour])
    frames = np.empty((SOURCE_FRAMES, size, size, 3), dtype=np.uint8)
    for t in range(SOURCE_FRAMES):
        img = Image.new("RGB", (size, size), (bg, bg, bg))
        draw = ImageDraw.Draw(img)
        cx, cy = (x0 + dx * speed * t) % size, (y0 + dy * speed * t) % size
        for ox in (-size, 0, size):  # drawn wrapped around every edge
            for oy in (-size, 0, size):
                box = [cx + ox - side / 2, cy + oy - side / 2, cx + ox + side / 2,
                       cy + oy + side / 2]
                (draw.ellipse if shape == "circle" else draw.rectangle)(box, fill=rgb)
        noisy = np.asarray(img, dtype=np.int16) + rng.integers(-8, 9, size=(size, size, 3))
        frames[t] = np.clip(noisy, 0, 255).astype(np.uint8)
    n = int(round(sample_rate * SOURCE_FRAMES / SOURCE_FPS))
    tt = np.arange(n) / sample_rate
    f0 = PITCH_HZ[pitch] * rng.uniform(0.97, 1.03)
    audio = (rng.uniform(0.2, 0.5) * np.sin(2 * np.pi * f0 * tt + rng.uniform(0, 2 * np.pi))
             + rng.normal(0, 0.01, n)).astype(np.float32)
    words = {"colour": colour, "shape": shape, "direction": direction, "pitch": pitch}
    caption = _CAPTIONS[rng.integers(len(_CAPTIONS))].format(**words)
    subtitles = _SUBTITLES[rng.integers(len(_SUBTITLES))].format(**words)
    return VideoClip(int(index), colour, shape, direction, pitch, frames, audio, caption,
                     subtitles)


def sample_frames(num_frames: int, spec: VideoSpec) -> list[int]:
    """The source frames a clip of ``num_frames`` at ``SOURCE_FPS`` keeps under ``spec``: as
    :func:`mmdist.data.video.decode_video` samples a real file."""
    if spec.fps:
        step = SOURCE_FPS / spec.fps
        return [int(round(i * step)) for i in range(spec.frames)
                if int(round(i * step)) < num_frames]
    return uniform_indices(num_frames, spec.frames)


@dataclass(frozen=True)
class SyntheticVideoSource:
    """The moving-shapes videos as shard rows (see the module docstring)."""

    num_samples: int
    seed: int = 0
    video_spec: VideoSpec = VideoSpec()
    captions: str = "text"  # text: caption as text; target: subtitles as text, summary as target
    name: str = "synthetic_video"

    def records(self):
        if self.num_samples < 1:
            raise SourceError(f"--num-samples={self.num_samples}: must be >= 1")
        if self.captions not in CAPTION_ROLES:
            raise SourceError(f"--video-captions {self.captions}: choose from "
                             f"{list(CAPTION_ROLES)}")
        for i in range(self.num_samples):
            yield {"sample_id": i, "origin": f"synthetic_video seed={self.seed} index={i}",
                   "group": str(i)}

    def load(self, record: dict[str, Any]) -> dict[str, Any]:
        spec = self.video_spec
        c = generate_clip(record["sample_id"], self.seed, spec.size, spec.sample_rate)
        keep = sample_frames(len(c.frames), spec)
        buf = io.BytesIO()
        sf.write(buf, np.clip(c.audio, -1, 1), spec.sample_rate, format="WAV", subtype="PCM_16")
        if self.captions == "text":
            text, target = c.caption, None
        else:
            text, target = c.subtitles, summary_of(c.colour, c.shape, c.direction, c.pitch)
        return {"sample_id": c.index, "text": text, "target": target,
                "label": DIRECTIONS.index(c.direction), "image": None, "audio": buf.getvalue(),
                "label_image": -1, "label_audio": PITCHES.index(c.pitch),
                "video": frames_to_strip(c.frames[keep])}
