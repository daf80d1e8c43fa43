"""Real-data source: handwritten digits you can see, spoken digits you can hear, captions.

Images are real handwriting: the 1797 scans of scikit-learn's bundled copy of the UCI
handwritten digits (8x8, 17 grey levels, 43 writers), scaled up with a little jitter of
position and stroke contrast. Speech is synthesized by espeak-ng (the ``espeakng-loader`` wheel
ships the library and its voices) in one of many voices, speeds and pitches, with a random
onset, gain and background noise. Both install from the package index; nothing is downloaded
at run time.

Each row pairs one written digit ``w`` with one spoken digit ``s``: ``s == w`` for half the
rows, another digit for the other half, so the pair's relation is learnable only from both
modalities. What the caption says and which digit is the label are chosen per dataset:

    caption=written   "the number three written by hand"          (image-text matching)
    caption=both      "a handwritten three and a spoken seven"     (image+audio+text matching)
    label=written     w (0..9), label=spoken s (0..9), label=same  int(w == s)

Rows from the same scan share a ``group`` so a scan never lands in both splits.
"""

from __future__ import annotations

import ctypes
import functools
import io
import threading
from dataclasses import dataclass
from typing import Any

import numpy as np
import soundfile as sf
from PIL import Image

WORDS = ("zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine")
CAPTIONS = ("written", "both")
LABELS = ("written", "spoken", "same")
# espeak-ng voices and variants: accents x voice qualities
VOICES = ("en", "en-us", "en-gb-scotland", "en-gb-x-rp", "en-029", "en+f2", "en+f4", "en+m3",
          "en+m7", "en-us+f3", "en-us+m5", "en+croak", "en+whisper", "en-gb-x-gbclan+f1")
SPEECH_RATE = 22050  # espeak-ng's output rate
_WRITTEN = ("the number {w} written by hand", "a handwritten {w}", "the digit {w}, handwritten",
            "someone wrote the number {w}", "a {w} written with a pen")
_BOTH = ("a handwritten {w} and a spoken {s}", "the written digit {w}; the spoken word {s}",
         "someone wrote {w} and said {s}", "written {w}, heard {s}")


@functools.cache
def _scans() -> tuple[np.ndarray, np.ndarray]:
    from sklearn.datasets import load_digits  # heavy (scipy): only this source needs it

    d = load_digits()
    return d.images.astype(np.float32) / 16.0, d.target.astype(np.int64)


def num_scans() -> int:
    return len(_scans()[1])


def scans_of(digit: int) -> np.ndarray:
    """Indices of the scans of ``digit``."""
    return np.flatnonzero(_scans()[1] == digit)


def image_png(scan: int, size: int, rng: np.random.Generator) -> bytes:
    """One scan as an RGB PNG of ``size`` px: ink dark on light paper, shifted by up to 1/8."""
    img = 1.0 - _scans()[0][scan]  # 8x8, paper 1, ink 0
    big = Image.fromarray((img * 255).astype(np.uint8)).resize(
        (size * 3 // 4, size * 3 // 4), Image.BILINEAR)
    canvas = Image.new("L", (size, size), 255)
    room = size - big.size[0]
    canvas.paste(big, (int(rng.integers(0, room + 1)), int(rng.integers(0, room + 1))))
    arr = np.asarray(canvas, dtype=np.float32) * rng.uniform(0.85, 1.0)
    arr += rng.normal(0, 6, arr.shape)
    rgb = np.repeat(np.clip(arr, 0, 255).astype(np.uint8)[..., None], 3, axis=2)
    buf = io.BytesIO()
    Image.fromarray(rgb).save(buf, format="PNG")
    return buf.getvalue()


_SYNTH_LOCK = threading.Lock()
_CALLBACK = ctypes.CFUNCTYPE(ctypes.c_int, ctypes.POINTER(ctypes.c_short), ctypes.c_int,
                             ctypes.c_void_p)
_LIBC = ctypes.CDLL(None)


def _say(text: str, voice: str, words_per_minute: int, pitch: int) -> np.ndarray:
    """espeak-ng through ctypes: one synchronous synthesis into memory, from a fresh library.

    espeak-ng keeps state between utterances in file-level variables (the pitch flutter phase)
    that ``espeak_Terminate`` does not reset, and its breath-noise voices draw from its own seed
    and the C library's ``rand``, so the same call gave a different waveform depending on what
    the process said before. Loading the library afresh for every word (about 3 ms) and seeding
    both generators makes each waveform a function of its arguments alone, whatever process or
    order generates the rows.
    """
    import _ctypes

    import espeakng_loader  # the library and voice data, from its wheel

    chunks: list[np.ndarray] = []

    def collect(wav, n, _events):
        if n > 0:
            chunks.append(np.ctypeslib.as_array(wav, shape=(n,)).copy())
        return 0

    callback = _CALLBACK(collect)
    with _SYNTH_LOCK:
        lib = ctypes.CDLL(espeakng_loader.get_library_path())
        try:
            rate = lib.espeak_Initialize(2, 0, espeakng_loader.get_data_path().encode(), 0)
            if rate != SPEECH_RATE:
                raise RuntimeError(f"espeak-ng did not start (returned {rate})")
            lib.espeak_SetSynthCallback(callback)
            _LIBC.srand(0)  # the breath-noise voices draw from the C library's rand()
            lib.espeak_ng_SetRandSeed(0)
            if lib.espeak_SetVoiceByName(voice.encode()) != 0:
                raise ValueError(f"espeak-ng has no voice {voice!r}")
            lib.espeak_SetParameter(1, words_per_minute, 0)  # espeakRATE
            lib.espeak_SetParameter(3, pitch, 0)  # espeakPITCH (0..100)
            data = text.encode()
            lib.espeak_Synth(data, len(data) + 1, 0, 0, 0, 0, None, None)
            lib.espeak_Terminate()
        finally:
            _ctypes.dlclose(lib._handle)  # the next word starts from the library's initial state
    wav = np.concatenate(chunks) if chunks else np.zeros(0, np.int16)
    return wav.astype(np.float32) / 32768.0


@functools.lru_cache(maxsize=2048)
def spoken(digit: int, voice: int, words_per_minute: int, pitch: int) -> np.ndarray:
    """The word for ``digit`` in one voice (float32 at :data:`SPEECH_RATE`), trimmed."""
    wav = _say(WORDS[digit], VOICES[voice], words_per_minute, pitch)
    loud = np.flatnonzero(np.abs(wav) > 0.01)
    return wav[loud[0]:loud[-1] + 1] if len(loud) else wav


def audio_wav(digit: int, seconds: float, rng: np.random.Generator) -> bytes:
    """A clip of ``seconds`` with the spoken digit at a random onset, gain and noise floor."""
    word = spoken(digit, int(rng.integers(len(VOICES))), int(rng.integers(120, 260)),
                  int(rng.integers(20, 80)))
    n = int(seconds * SPEECH_RATE)
    word = word[:n]
    clip = rng.normal(0, rng.uniform(0.001, 0.01), n).astype(np.float32)
    start = int(rng.integers(0, n - len(word) + 1))
    clip[start:start + len(word)] += word * rng.uniform(0.3, 1.0)
    buf = io.BytesIO()
    sf.write(buf, np.clip(clip, -1, 1), SPEECH_RATE, format="WAV", subtype="PCM_16")
    return buf.getvalue()


@dataclass(frozen=True)
class DigitRow:
    index: int
    scan: int
    written: int
    spoken: int
    text: str
    target: str
    label: int
    image: bytes
    audio: bytes


def scan_of(index: int, seed: int) -> int:
    """The scan row ``index`` of dataset ``seed`` shows (the first draw of its generator)."""
    return int(np.random.default_rng([seed, index]).integers(num_scans()))


def generate_row(index: int, seed: int, image_size: int, audio_seconds: float,
                 caption: str = "both", label: str = "written") -> DigitRow:
    """Row ``index`` of the dataset ``seed``: a pure function of its arguments."""
    if caption not in CAPTIONS:
        raise ValueError(f"caption={caption!r}: choose from {list(CAPTIONS)}")
    if label not in LABELS:
        raise ValueError(f"label={label!r}: choose from {list(LABELS)}")
    rng = np.random.default_rng([seed, index])
    scan = int(rng.integers(num_scans()))
    w = int(_scans()[1][scan])
    s = w if rng.random() < 0.5 else int((w + rng.integers(1, 10)) % 10)
    template = rng.choice(_WRITTEN if caption == "written" else _BOTH)
    text = str(template).format(w=WORDS[w], s=WORDS[s])
    target = f"{WORDS[w]} {WORDS[s]}" if caption == "both" else WORDS[w]
    y = {"written": w, "spoken": s, "same": int(w == s)}[label]
    return DigitRow(index, scan, w, s, text, target, y, image_png(scan, image_size, rng),
                    audio_wav(s, audio_seconds, rng))


@dataclass(frozen=True)
class DigitsSource:
    """``mmdist prepare --source digits``: :func:`generate_row` rows."""

    num_samples: int
    seed: int = 0
    image_size: int = 64
    audio_seconds: float = 1.0
    caption: str = "both"
    label: str = "written"
    name: str = "digits"

    def records(self) -> Any:
        for i in range(self.num_samples):
            yield {"sample_id": i, "origin": f"digits seed={self.seed} index={i}",
                   "group": f"scan{scan_of(i, self.seed)}"}

    def load(self, record: dict[str, Any]) -> dict[str, Any]:
        r = generate_row(record["sample_id"], self.seed, self.image_size, self.audio_seconds,
                         self.caption, self.label)
        return {"sample_id": r.index, "text": r.text, "target": r.target, "label": r.label,
                "image": r.image, "audio": r.audio, "label_image": r.written,
                "label_audio": r.spoken}
