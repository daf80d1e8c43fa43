import io

import numpy as np
import soundfile as sf
from PIL import Image

from mmdist.data.synthetic import (
    COLOURS,
    NUM_CLASSES,
    PITCH_HZ,
    caption_attributes,
    generate_sample,
    label_of,
)

N = 48


def _samples(seed=0, n=N):
    return [generate_sample(i, seed, image_size=48, sample_rate=8000, audio_seconds=0.5)
            for i in range(n)]


def test_deterministic_for_a_seed():
    a, b, c = _samples(0, 6), _samples(0, 6), _samples(1, 6)
    assert a == b
    assert [s.image for s in a] != [s.image for s in c]


def test_attributes_recoverable_from_image_audio_and_text():
    for s in _samples():
        # image: the pixels far from the background grey are the shape; red vs blue channel
        img = np.asarray(Image.open(io.BytesIO(s.image)).convert("RGB"), dtype=np.int32)
        sat = img.max(axis=2) - img.min(axis=2)
        shape_px = img[sat > 80]
        assert len(shape_px) > 20
        colour = "red" if shape_px[:, 0].mean() > shape_px[:, 2].mean() else "blue"
        assert colour == s.colour
        # audio: the dominant frequency is the pitch (+-3% detuning)
        wav, sr = sf.read(io.BytesIO(s.audio))
        f = np.argmax(np.abs(np.fft.rfft(wav))) * sr / len(wav)
        assert abs(f - PITCH_HZ[s.pitch]) / PITCH_HZ[s.pitch] < 0.05, (s.pitch, f)
        # text: the caption names all three
        assert caption_attributes(s.text) == {"colour": s.colour, "shape": s.shape,
                                              "pitch": s.pitch}
        assert s.label == label_of(s.colour, s.shape, s.pitch) and 0 <= s.label < NUM_CLASSES
        assert s.colour in s.target and s.shape in s.target and s.pitch in s.target


def test_nuisance_factors_vary():
    ss = _samples()
    assert len({s.text for s in ss}) > N // 2  # phrasing templates and synonyms
    assert len({s.label for s in ss}) == NUM_CLASSES
    assert {s.colour for s in ss} == set(COLOURS)


def test_itm_ceilings_match_the_docstring_arithmetic():
    """Best ITM accuracy per modality set when negatives pair caption i with sample i-1."""
    ss = [generate_sample(i, 3, image_size=8, sample_rate=8000, audio_seconds=0.05)
          for i in range(1500)]
    a = np.array([(s.colour, s.shape, s.pitch) for s in ss])
    rolled = np.roll(a, 1, axis=0)
    same_image = (a[:, :2] == rolled[:, :2]).all(axis=1)
    same_all = (a == rolled).all(axis=1)
    # positives always look matching; a negative is caught unless it looks identical
    image_text = 0.5 + 0.5 * (1 - same_image.mean())
    all_three = 0.5 + 0.5 * (1 - same_all.mean())
    assert abs(image_text - 0.875) < 0.03
    assert abs(all_three - 0.969) < 0.02
    assert all_three > image_text > 0.5  # text only: identical caption in both pairs -> 0.5


def test_synthetic_rows_carry_what_each_modality_shows_alone():
    from mmdist.data.sources import SyntheticSource
    from mmdist.data.synthetic import COLOURS, PITCHES, SHAPES

    source = SyntheticSource(num_samples=40, image_size=32, audio_seconds=0.25)
    for rec in source.records():
        row, s = source.load(rec), generate_sample(rec["sample_id"], 0, 32, 16000, 0.25)
        assert row["label_image"] == COLOURS.index(s.colour) * 2 + SHAPES.index(s.shape)
        assert row["label_audio"] == PITCHES.index(s.pitch)
