"""Image preprocessing as pure functions: encoded bytes -> uint8 ``(3, S, S)`` RGB.

PIL decode (JPEG decoded at a reduced scale when it is much larger than needed), RGB, shorter
side resized to ``S`` and centre-cropped (random crop + flip when ``augment``). Normalisation
to float happens inside the model so batches cross the object store as uint8.
"""

from __future__ import annotations

import io

import numpy as np
from PIL import Image


def decode_image(data: bytes, size: int, augment: bool = False,
                 rng: np.random.Generator | None = None) -> np.ndarray:
    """Encoded image bytes -> uint8 ``(3, size, size)`` RGB.

    The shorter side is resized to ``size`` and the centre cropped; with ``augment`` a random
    crop of 80-100% of the shorter side and a random horizontal flip are taken instead.

    Raises:
        Exception: whatever PIL raises on bytes it cannot decode (callers decide what to do).
    """
    img = Image.open(io.BytesIO(data))
    # JPEG: decode directly at 1/2, 1/4 or 1/8 scale when that still covers `size` (big win
    # for 224 -> 64); no effect on other formats.
    img.draft("RGB", (size, size))
    if img.mode != "RGB":
        img = to_rgb(img)
    w, h = img.size
    side = min(w, h)
    if augment:
        rng = rng or np.random.default_rng()
        side = max(1, int(side * rng.uniform(0.8, 1.0)))
        left = int(rng.integers(0, w - side + 1))
        top = int(rng.integers(0, h - side + 1))
    else:
        left, top = (w - side) // 2, (h - side) // 2
    box = (left, top, left + side, top + side)
    if side != size or (w, h) != (size, size):
        img = img.resize((size, size), Image.BILINEAR, box=box, reducing_gap=2.0)
    arr = np.asarray(img, dtype=np.uint8)
    if augment and rng.random() < 0.5:
        arr = arr[:, ::-1]
    return np.ascontiguousarray(arr.transpose(2, 0, 1))


def to_rgb(img: Image.Image) -> Image.Image:
    """Any PIL mode -> 8-bit RGB. PIL's own convert clips 16/32-bit and float pixels to 255
    (a 16-bit scan comes out nearly white), so those are rescaled to 0..255 first; palette and
    alpha images are converted as PIL does (alpha dropped), CMYK/1-bit/LA likewise."""
    if img.mode.startswith("I;16") or img.mode in ("I", "F"):
        a = np.asarray(img, dtype=np.float64)
        if img.mode.startswith("I;16"):
            hi = 65535.0
        elif img.mode == "F":
            hi = 1.0 if a.size and a.max() <= 1.0 else 255.0
        else:
            hi = 65535.0 if not a.size or a.max() <= 65535 else float(a.max())
        img = Image.fromarray(np.clip(a * (255.0 / hi), 0, 255).round().astype(np.uint8), "L")
    return img.convert("RGB")
