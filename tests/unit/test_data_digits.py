"""The real-data source: real handwritten digits, synthesized spoken digits, captions."""

import io
import json

import numpy as np
import soundfile as sf
from PIL import Image

from mmdist.config import load_config
from mmdist.data.digits import WORDS, DigitsSource, generate_row, spoken
from mmdist.data.prepare import convert
from mmdist.train.startable import with_data_defaults


def test_rows_are_deterministic_and_pair_half_the_digits():
    a = [generate_row(i, 0, 32, 0.5, "both", "same") for i in range(60)]
    b = generate_row(7, 0, 32, 0.5, "both", "same")
    assert (a[7].text, a[7].image, a[7].audio) == (b.text, b.image, b.audio)
    same = [r.label for r in a]
    assert all(r.label == int(r.written == r.spoken) for r in a)
    assert 0.3 < np.mean(same) < 0.7
    r = a[0]
    assert WORDS[r.written] in r.text and WORDS[r.spoken] in r.text
    img = np.asarray(Image.open(io.BytesIO(r.image)))
    assert img.shape == (32, 32, 3) and img.min() < 100 < img.max()  # ink on paper
    wav, rate = sf.read(io.BytesIO(r.audio))
    assert rate == 22050 and len(wav) == 11025 and np.abs(wav).max() > 0.1  # a spoken word
    written = generate_row(3, 0, 32, 0.5, "written", "written")
    assert WORDS[written.written] in written.text and written.label == written.written


def test_speech_does_not_depend_on_what_the_process_said_before():
    """espeak-ng keeps state between words (flutter phase, breath noise): every voice, including
    the breathy ones, must give the same waveform whatever was synthesized earlier."""
    first = [generate_row(i, 5, 16, 0.5, "both", "same").audio for i in range(30)]
    spoken.cache_clear()
    for voice in range(14):  # a different history: every voice once, in another order
        spoken(3, 13 - voice, 150, 40)
    again = [generate_row(i, 5, 16, 0.5, "both", "same").audio for i in reversed(range(30))]
    assert first == again[::-1]


def test_prepare_records_per_modality_labels_and_training_uses_them(tmp_path):
    cfg = load_config("tiny", ["data.image_size=32"])
    source = DigitsSource(num_samples=120, seed=1, image_size=32, audio_seconds=0.5,
                          caption="written", label="same")
    convert(source, tmp_path / "d", cfg.data, seed=1, parallel="local")
    manifest = json.loads((tmp_path / "d" / "manifest.json").read_text())
    assert manifest["labels"]["max"] == 1
    assert manifest["modality_labels"]["image"]["max"] == 9
    assert manifest["modality_labels"]["audio"]["max"] == 9
    cfg = load_config("tiny", ["model.task=classify", "model.num_classes=2",
                               "model.modalities=[image, audio]"])
    assert with_data_defaults(cfg, manifest).model.aux_classes == {"image": 10, "audio": 10}
    off = cfg.override(["model.aux_weight=0"])
    assert with_data_defaults(off, manifest).model.aux_classes == {}
    text_image = cfg.override(["model.modalities=[text, image]", "model.task=itm"])
    assert with_data_defaults(text_image, manifest).model.aux_classes == {"image": 10}
