"""Multimodal translation: image + text beats text alone on the ambiguous-word synthetic source.

Two tiny prompted models (``tests/unit/mmt_gap.py``), trained in this process on CPU for the same
steps from the same shards: with the image, and with ``model.modalities=[text]``. Text alone
can only guess the sense of an ambiguous noun (a coin flip: at best about 1/2 of those nouns and
0.7 of whole sentences); the image tells it.

Margins from measurement (2026-12-03, ``python -m tests.unit.mmt_gap 300 SEED``, seeds 0, 1, 2):
image + text reached val BLEU 1.000, exact match 1.000 and ambiguous-noun accuracy 1.000 every
time; text alone 0.811, 0.733 and 0.533. The asserts leave room on both sides: the image model
must get at least 0.9 of the ambiguous nouns right and the text model at most 0.7 (chance is 0.5
on 137 rows), and BLEU and exact match must rise by at least half the measured gap.
"""

from __future__ import annotations

import pytest

from tests.unit.mmt_gap import measure

pytestmark = pytest.mark.slow

STEPS = 300


def test_image_and_text_beat_text_alone_on_ambiguous_words(tmp_path):
    out = measure(tmp_path, STEPS)
    both, text = out["image_text"], out["text_only"]
    print(f"image+text {both}\ntext only  {text}")
    assert both["ambiguous_rows"] == text["ambiguous_rows"] > 100  # the same val rows
    assert both["noun_accuracy"] >= 0.9, both
    assert text["noun_accuracy"] <= 0.7, text
    assert both["val_bleu"] - text["val_bleu"] >= 0.1, (both, text)
    assert both["val_accuracy"] - text["val_accuracy"] >= 0.13, (both, text)
