"""A learnable synthetic image + audio + text dataset where fusion visibly matters.

Each sample draws three independent, uniform attributes:

    colour  in COLOURS  (2: red, blue)          seen in the image
    shape   in SHAPES   (2: circle, square)     seen in the image
    pitch   in PITCHES  (4: 300..2400 Hz)       heard in the audio (a tone of that frequency)

and gets an image of that shape in that colour (PNG bytes), a clip of a tone at that pitch
(WAV bytes), a caption that names all three attributes in one of several phrasings, a
canonical ``target`` description (what an lm task learns to say from image + audio) and a class
``label = colour * 4 + shape * 2 + (pitch is high)`` in 0..7.

Why fusion matters for image-text matching (ITM). The model's ITM head makes negatives by pairing
each caption with the image/audio of ANOTHER sample of the batch, one whose per-modality labels
(``label_image`` = colour and shape, ``label_audio`` = pitch) differ from it in at least one;
positives and negatives come in equal numbers. Attributes are independent across samples, so:

* text only: the caption is the same in the positive and the negative pair -> 50% (chance).
* image + text: a negative is detectable only when its image differs in colour or shape; among
  donors that differ somewhere (15/16 of all), 3/16 differ in pitch alone, so 1/5 of negatives
  look like positives. Best accuracy = 1/2 * 1 + 1/2 * 4/5 = 0.9.
* image + audio + text: every negative differs in something seen or heard. Best accuracy 1.0.
  (With the batch rolled by one, before wave 2, 1/16 of negatives were true matches: 0.969.)

For classification the caption alone names every attribute; without text, image alone can
reach 4/8 classes' worth (50%), audio alone 2 of 8 (25% - it only tells high/low), both 100%.

Nuisance factors keep it from being trivial: shape position and size, background shade, pixel
noise, colour jitter; tone amplitude, onset, duration, +-3% detuning, a weak second harmonic,
background noise; caption templates and synonyms. Every sample is a pure function of
``(seed, index)``, so generation is deterministic and can run in parallel.
"""

from __future__ import annotations

import io
from dataclasses import dataclass

import numpy as np
import soundfile as sf
from PIL import Image, ImageDraw

COLOURS = ("red", "blue")
COLOUR_RGB = {"red": (210, 40, 40), "blue": (40, 60, 210)}
SHAPES = ("circle", "square")
PITCHES = ("low", "medium", "high", "very high")
PITCH_HZ = {"low": 300.0, "medium": 600.0, "high": 1200.0, "very high": 2400.0}
NUM_CLASSES = 8

_SHAPE_WORDS = {"circle": ("circle", "disc", "round shape"), "square": ("square", "box", "block")}
_PITCH_WORDS = {"low": ("low", "deep"), "medium": ("medium", "middle"),
                "high": ("high", "bright"), "very high": ("very high", "piercing")}
_SOUND_WORDS = ("tone", "beep", "hum", "note")
_TEMPLATES = (
    "a {colour} {shape} with a {pitch} {sound}",
    "a {pitch} {sound} plays while a {colour} {shape} is shown",
    "there is a {colour} {shape} and you can hear a {pitch} {sound}",
    "picture of a {colour} {shape} , sound of a {pitch} {sound}",
    "the {shape} is {colour} and the {sound} is {pitch}",
    "a {pitch} {sound} accompanies the {colour} {shape}",
)


@dataclass(frozen=True)
class SyntheticSample:
    """One generated sample: the shard row fields plus the attributes behind them."""

    index: int
    colour: str
    shape: str
    pitch: str
    text: str
    target: str
    label: int
    image: bytes  # PNG
    audio: bytes  # WAV, 16-bit PCM


def label_of(colour: str, shape: str, pitch: str) -> int:
    """Class 0..7 from the attributes (colour, shape from the image; high/low from audio)."""
    return COLOURS.index(colour) * 4 + SHAPES.index(shape) * 2 + int(PITCHES.index(pitch) >= 2)


def image_label(colour: str, shape: str) -> int:
    """What the image alone shows, 0..3: colour and shape."""
    return COLOURS.index(colour) * 2 + SHAPES.index(shape)


def audio_label(pitch: str) -> int:
    """What the audio alone says, 0..3: the pitch."""
    return PITCHES.index(pitch)


def target_of(colour: str, shape: str, pitch: str) -> str:
    """The canonical description an lm task learns to produce from image + audio."""
    return f"a {colour} {shape} and a {pitch} tone"


def _image(rng: np.random.Generator, colour: str, shape: str, size: int) -> bytes:
    bg = int(rng.integers(170, 250))
    arr = np.full((size, size, 3), bg, dtype=np.int16)
    img = Image.fromarray(arr.astype(np.uint8))
    draw = ImageDraw.Draw(img)
    side = rng.uniform(0.3, 0.6) * size
    cx, cy = rng.uniform(side / 2, size - side / 2, size=2)
    box = [cx - side / 2, cy - side / 2, cx + side / 2, cy + side / 2]
    rgb = tuple(int(np.clip(c + rng.integers(-25, 26), 0, 255)) for c in COLOUR_RGB[colour])
    if shape == "circle":
        draw.ellipse(box, fill=rgb)
    else:
        draw.rectangle(box, fill=rgb)
    noisy = np.asarray(img, dtype=np.int16) + rng.integers(-12, 13, size=(size, size, 3))
    buf = io.BytesIO()
    Image.fromarray(np.clip(noisy, 0, 255).astype(np.uint8)).save(buf, format="PNG")
    return buf.getvalue()


def _audio(rng: np.random.Generator, pitch: str, sample_rate: int, seconds: float) -> bytes:
    n = int(round(sample_rate * seconds))
    t = np.arange(n) / sample_rate
    f0 = PITCH_HZ[pitch] * rng.uniform(0.97, 1.03)
    phase = rng.uniform(0, 2 * np.pi)
    wave = np.sin(2 * np.pi * f0 * t + phase) + 0.2 * np.sin(4 * np.pi * f0 * t + phase)
    onset = int(rng.uniform(0.0, 0.2) * n)
    length = int(rng.uniform(0.6, 0.8) * n)
    env = np.zeros(n)
    env[onset:onset + length] = 1.0
    ramp = min(length // 2, max(1, sample_rate // 100))
    env[onset:onset + ramp] = np.linspace(0, 1, ramp)
    env[onset + length - ramp:onset + length] = np.linspace(1, 0, ramp)
    clip = rng.uniform(0.2, 0.6) * env * wave + rng.normal(0, 0.01, n)
    buf = io.BytesIO()
    sf.write(buf, np.clip(clip, -1, 1).astype(np.float32), sample_rate, format="WAV",
             subtype="PCM_16")
    return buf.getvalue()


def generate_sample(index: int, seed: int = 0, image_size: int = 64, sample_rate: int = 16000,
                    audio_seconds: float = 1.0) -> SyntheticSample:
    """Sample ``index`` of the dataset of ``seed`` (a pure function of both).

    Args:
        index: position in the dataset (also the sample id).
        seed: dataset seed.
        image_size: side of the generated square image, pixels.
        sample_rate: audio rate, Hz.
        audio_seconds: clip length.
    """
    rng = np.random.default_rng([int(seed), int(index)])
    colour = COLOURS[rng.integers(len(COLOURS))]
    shape = SHAPES[rng.integers(len(SHAPES))]
    pitch = PITCHES[rng.integers(len(PITCHES))]
    template = _TEMPLATES[rng.integers(len(_TEMPLATES))]
    text = template.format(colour=colour,
                           shape=_SHAPE_WORDS[shape][rng.integers(len(_SHAPE_WORDS[shape]))],
                           pitch=_PITCH_WORDS[pitch][rng.integers(len(_PITCH_WORDS[pitch]))],
                           sound=_SOUND_WORDS[rng.integers(len(_SOUND_WORDS))])
    return SyntheticSample(
        index=int(index), colour=colour, shape=shape, pitch=pitch, text=text,
        target=target_of(colour, shape, pitch), label=label_of(colour, shape, pitch),
        image=_image(rng, colour, shape, image_size),
        audio=_audio(rng, pitch, sample_rate, audio_seconds))


def caption_attributes(text: str) -> dict[str, str]:
    """Recover (colour, shape, pitch) from a caption; the inverse of the templates."""
    words = f" {text.lower()} "
    colour = next(c for c in COLOURS if f" {c} " in words)
    shape = next(s for s, names in _SHAPE_WORDS.items() if any(f" {n} " in words for n in names))
    # longest phrases first: "very high" before "high"
    pairs = sorted(((w, p) for p, ws in _PITCH_WORDS.items() for w in ws), key=lambda x: -len(x[0]))
    pitch = next(p for w, p in pairs if f" {w} " in words)
    return {"colour": colour, "shape": shape, "pitch": pitch}
