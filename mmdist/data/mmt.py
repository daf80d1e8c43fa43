"""A synthetic multimodal machine translation (MMT) source where only the image resolves some
words, as in Multi30k's motivation: source sentence + image -> target sentence.

The source language is a small slice of English; the target language is a toy one with its own
words and order (determiner, noun, adjective, verb). Each row is one sentence about one object,

    "the big bat sleeps"  + a picture of the object  ->  "lo mazza grosso dorme"   (a club)
                                                      ->  "lo vespa grosso dorme"   (the animal)

drawn as a glyph of its own (a triangle for the animal bat, a bar for the club, ...) in a random
colour, size and place on a noisy background. Three of the five source nouns are ambiguous: each
has two senses with different target words, equally likely, and only the image tells which.
The determiner, adjective and verb are in the text only; the image shows the object alone.

What each input allows (nouns uniform over 5, senses of an ambiguous one uniform over 2):

* text only: the ambiguous noun is a coin flip, so at best 1/2 of those nouns and
  2/5 + 3/5 * 1/2 = 0.7 of whole sentences are right (exact match).
* image only: the noun, but not the determiner, adjective or verb.
* image + text: every word, exact match 1.0.

Every row is a pure function of ``(seed, index)``; nothing is downloaded.
"""

from __future__ import annotations

import io
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import numpy as np
from PIL import Image, ImageDraw

from mmdist.data.sources import SourceError

# source word -> target word
DETERMINERS = {"a": "un", "the": "lo"}
ADJECTIVES = {"big": "grosso", "small": "piccino", "tired": "stanco", "happy": "felice"}
VERBS = {"sleeps": "dorme", "waits": "aspetta", "falls": "cade", "turns": "gira"}
# source noun -> its senses as (sense, target word, glyph drawn in the image)
NOUNS: dict[str, tuple[tuple[str, str, str], ...]] = {
    "bat": (("bat (animal)", "vespa", "triangle"), ("bat (club)", "mazza", "bar")),
    "mouse": (("mouse (animal)", "topo", "disc"), ("mouse (device)", "clicco", "box")),
    "crane": (("crane (bird)", "airone", "plus"), ("crane (machine)", "argano", "ring")),
    "cat": (("cat", "gatto", "diamond"),),
    "car": (("car", "auto", "cross"),),
}
AMBIGUOUS = tuple(n for n, senses in NOUNS.items() if len(senses) > 1)
# every sense in a fixed order: its index is the row's label (what the image alone shows)
SENSES = tuple(s for senses in NOUNS.values() for s in senses)
PALETTE = ((200, 40, 40), (40, 70, 200), (30, 150, 60), (200, 150, 20), (140, 50, 170),
           (20, 150, 160), (90, 90, 90))


@dataclass(frozen=True)
class MMTRow:
    """One generated row: the shard fields plus the words behind them."""

    index: int
    determiner: str
    adjective: str | None
    noun: str
    sense: int  # index into SENSES
    verb: str
    text: str  # the source sentence
    target: str  # its translation
    image: bytes  # PNG

    @property
    def ambiguous(self) -> bool:
        return self.noun in AMBIGUOUS

    @property
    def target_noun(self) -> str:
        return SENSES[self.sense][1]


def translate(determiner: str, adjective: str | None, noun: str, sense: int, verb: str) -> str:
    """The target sentence: determiner, noun (of the sense), adjective, verb."""
    words = [DETERMINERS[determiner], SENSES[sense][1]]
    if adjective:
        words.append(ADJECTIVES[adjective])
    return " ".join([*words, VERBS[verb]])


def _glyph(draw: ImageDraw.ImageDraw, glyph: str, box: list[float], rgb: tuple[int, ...],
           width: int) -> None:
    x0, y0, x1, y1 = box
    cx, cy = (x0 + x1) / 2, (y0 + y1) / 2
    if glyph == "triangle":
        draw.polygon([(x0, y0), (x1, y0), (cx, y1)], fill=rgb)
    elif glyph == "bar":
        h = (y1 - y0) / 6
        draw.rectangle([x0, cy - h, x1, cy + h], fill=rgb)
    elif glyph == "disc":
        draw.ellipse(box, fill=rgb)
    elif glyph == "box":
        draw.rectangle(box, fill=rgb)
    elif glyph == "plus":
        draw.rectangle([cx - width, y0, cx + width, y1], fill=rgb)
        draw.rectangle([x0, cy - width, x1, cy + width], fill=rgb)
    elif glyph == "ring":
        draw.ellipse(box, outline=rgb, width=max(1, int(width)))
    elif glyph == "diamond":
        draw.polygon([(cx, y0), (x1, cy), (cx, y1), (x0, cy)], fill=rgb)
    elif glyph == "cross":
        draw.line([(x0, y0), (x1, y1)], fill=rgb, width=max(1, int(2 * width)))
        draw.line([(x0, y1), (x1, y0)], fill=rgb, width=max(1, int(2 * width)))
    else:
        raise ValueError(f"unknown glyph {glyph!r}")


def draw_sense(rng: np.random.Generator, sense: int, size: int) -> bytes:
    """A PNG of ``size`` px showing the glyph of ``SENSES[sense]``: random colour, size and
    place, background shade and pixel noise."""
    bg = int(rng.integers(180, 250))
    img = Image.new("RGB", (size, size), (bg, bg, bg))
    draw = ImageDraw.Draw(img)
    side = rng.uniform(0.5, 0.8) * size
    cx, cy = rng.uniform(side / 2, size - side / 2, size=2)
    box = [cx - side / 2, cy - side / 2, cx + side / 2, cy + side / 2]
    base = PALETTE[rng.integers(len(PALETTE))]
    rgb = tuple(int(np.clip(c + rng.integers(-20, 21), 0, 255)) for c in base)
    _glyph(draw, SENSES[sense][2], box, rgb, width=max(1.0, side / 10))
    noisy = np.asarray(img, dtype=np.int16) + rng.integers(-10, 11, size=(size, size, 3))
    buf = io.BytesIO()
    Image.fromarray(np.clip(noisy, 0, 255).astype(np.uint8)).save(buf, format="PNG")
    return buf.getvalue()


def generate_row(index: int, seed: int = 0, image_size: int = 64) -> MMTRow:
    """Row ``index`` of the dataset of ``seed`` (a pure function of its arguments)."""
    rng = np.random.default_rng([int(seed), int(index), 24])  # 24: not the synthetic set's draws
    determiner = list(DETERMINERS)[rng.integers(len(DETERMINERS))]
    adjective = list(ADJECTIVES)[rng.integers(len(ADJECTIVES))] if rng.random() < 0.75 else None
    noun = list(NOUNS)[rng.integers(len(NOUNS))]
    sense = SENSES.index(NOUNS[noun][rng.integers(len(NOUNS[noun]))])
    verb = list(VERBS)[rng.integers(len(VERBS))]
    text = " ".join(w for w in (determiner, adjective, noun, verb) if w)
    return MMTRow(index=int(index), determiner=determiner, adjective=adjective, noun=noun,
                  sense=sense, verb=verb, text=text,
                  target=translate(determiner, adjective, noun, sense, verb),
                  image=draw_sense(rng, sense, image_size))


def noun_correct(hypothesis: str, row: MMTRow) -> bool:
    """Whether a translation of ``row`` names its noun's right sense (and no other sense of
    the same source noun)."""
    words = set(hypothesis.split())
    others = {t for _, t, _ in NOUNS[row.noun]} - {row.target_noun}
    return row.target_noun in words and not words & others


@dataclass(frozen=True)
class MMTSource:
    """``mmdist prepare --source mmt``: :func:`generate_row` rows. ``text`` is the source
    sentence, ``target`` the translation, ``label`` and ``label_image`` the sense the image
    shows (an auxiliary image head can learn it); no audio."""

    num_samples: int
    seed: int = 0
    image_size: int = 64
    name: str = "mmt"

    def records(self) -> Iterator[dict[str, Any]]:
        if self.num_samples < 1:
            raise SourceError(f"--num-samples={self.num_samples}: must be >= 1")
        for i in range(self.num_samples):
            yield {"sample_id": i, "origin": f"mmt seed={self.seed} index={i}", "group": str(i)}

    def load(self, record: dict[str, Any]) -> dict[str, Any]:
        r = generate_row(record["sample_id"], self.seed, self.image_size)
        # generated rows are valid by construction (as the synthetic source's)
        return {"sample_id": r.index, "text": r.text, "target": r.target, "label": r.sense,
                "image": r.image, "audio": None, "label_image": r.sense, "label_audio": -1}
