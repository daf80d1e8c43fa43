"""The synthetic translation source (``mmdist prepare --source mmt``): deterministic rows, some
source words ambiguous so that the text alone cannot translate them, the image telling which."""

from __future__ import annotations

import io
from collections import defaultdict

import numpy as np
import pandas as pd
import pytest
from PIL import Image

from mmdist.cli import main
from mmdist.data.mmt import AMBIGUOUS, NOUNS, SENSES, MMTSource, generate_row, noun_correct
from mmdist.data.shards import read_manifest


def test_rows_are_a_pure_function_of_seed_and_index():
    a, b = generate_row(7, seed=3, image_size=32), generate_row(7, seed=3, image_size=32)
    assert a == b
    assert generate_row(7, seed=4, image_size=32) != a
    img = Image.open(io.BytesIO(a.image))
    assert img.size == (32, 32) and img.mode == "RGB"
    # the order of generation does not matter
    rows = [generate_row(i, 3, 32) for i in (9, 8, 7)]
    assert rows[2] == a


def test_the_translation_reorders_and_the_noun_follows_the_sense():
    row = next(r for r in (generate_row(i) for i in range(200))
               if r.noun == "bat" and r.adjective)
    det, noun, adj, verb = row.target.split()
    assert row.text.split() == [row.determiner, row.adjective, "bat", row.verb]
    assert noun == SENSES[row.sense][1] and noun in ("vespa", "mazza")
    assert (det, adj, verb) != (row.determiner, row.adjective, row.verb)  # translated
    assert noun_correct(row.target, row)
    other = {t for _, t, _ in NOUNS["bat"]} - {noun}
    assert not noun_correct(row.target.replace(noun, other.pop()), row)


def test_the_same_source_sentence_has_two_translations_and_the_image_tells_which():
    """Text alone cannot translate an ambiguous noun: the same sentence appears with both of
    its senses, about equally often; each sense is drawn as a glyph of its own."""
    rows = [generate_row(i, 0, 32) for i in range(1000)]
    by_text: dict[str, set[str]] = defaultdict(set)
    for r in rows:
        by_text[r.text].add(r.target)
    ambiguous = {t for t, targets in by_text.items() if len(targets) > 1}
    assert ambiguous and all(any(f" {n} " in f" {t} " for n in AMBIGUOUS) for t in ambiguous)
    assert all(len(targets) == 1 for t, targets in by_text.items()
               if not any(f" {n} " in f" {t} " for n in AMBIGUOUS))
    for noun in AMBIGUOUS:
        senses = [r.sense for r in rows if r.noun == noun]
        share = np.mean([s == senses[0] for s in senses])
        assert 0.4 < share < 0.6, (noun, share)
    share_ambiguous = np.mean([r.ambiguous for r in rows])
    assert 0.55 < share_ambiguous < 0.65  # 3 of 5 nouns
    assert len({g for _, _, g in SENSES}) == len(SENSES)  # one glyph per sense
    # the glyph is what the image shows: the mean image of two senses of one noun differ
    bat = [r for r in rows if r.noun == "bat"][:200]
    mean = {s: np.mean([np.asarray(Image.open(io.BytesIO(r.image)), dtype=float)
                        for r in bat if r.sense == s], axis=0) for s in {r.sense for r in bat}}
    a, b = mean.values()
    assert np.abs(a - b).mean() > 5


def test_prepare_writes_shards_of_the_source(tmp_path, capsys):
    out = tmp_path / "mmt"
    code = main(["prepare", "--source", "mmt", "--out", str(out), "--num-samples", "60",
                 "--config", "tiny", "--seed", "5", "--json"])
    assert code == 0, capsys.readouterr().err
    manifest = read_manifest(out)
    assert manifest["source"] == "mmt" and manifest["counts"]["rows_written"] == 60
    assert manifest["params"]["seed"] == 5 and manifest["params"]["image_size"] == 32
    df = pd.concat([pd.read_parquet(p) for p in sorted(out.glob("*/*.parquet"))])
    assert len(df) == 60 and df["audio"].isna().all()
    for r in df.itertuples():
        row = generate_row(r.sample_id, 5, 32)
        assert (r.text, r.target, r.image, r.label, r.label_image) == (
            row.text, row.target, row.image, row.sense, row.sense)
    assert manifest["modality_labels"]["image"]["max"] <= len(SENSES) - 1


def test_an_empty_source_is_refused_by_name():
    from mmdist.data.sources import SourceError

    with pytest.raises(SourceError, match="--num-samples=0"):
        list(MMTSource(0).records())
