import io

import numpy as np
import pytest
import soundfile as sf
from PIL import Image

from mmdist.config import DataConfig
from mmdist.data.audio import decode_audio, log_mel, mel_filterbank
from mmdist.data.image import decode_image
from mmdist.data.preprocess import BatchPreprocessor, PreprocessSpec, preprocess_batch
from mmdist.data.schema import BATCH_KEYS, audio_frames
from mmdist.data.tokenizer import TextTokenizer

SPEC = PreprocessSpec(image_size=32, sample_rate=8000, audio_seconds=0.5, n_mels=16,
                      hop_length=80, max_text_len=12)


def _image(w=48, h=40, rgb=(200, 30, 30), fmt="PNG") -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", (w, h), rgb).save(buf, format=fmt)
    return buf.getvalue()


def _wav(freq=440.0, sr=16000, seconds=0.7, channels=1, fmt="WAV") -> bytes:
    t = np.arange(int(sr * seconds)) / sr
    x = 0.5 * np.sin(2 * np.pi * freq * t)
    data = np.stack([x] * channels, axis=1) if channels > 1 else x
    buf = io.BytesIO()
    sf.write(buf, data.astype(np.float32), sr, format=fmt)
    return buf.getvalue()


@pytest.fixture(scope="module")
def tok():
    return TextTokenizer.train(["a red circle", "a low tone"], 50)


def _batch(n=4):
    obj = lambda xs: np.array(xs, dtype=object)  # noqa: E731
    return {
        "sample_id": np.arange(n, dtype=np.int64),
        "text": obj(["a red circle", None, "a low tone", "a red circle"][:n]),
        "target": obj([None, "a low tone", None, None][:n]),
        "label": np.array([3, -1, 0, 7][:n]),
        "image": obj([_image(), None, b"not an image", _image(fmt="JPEG")][:n]),
        "audio": obj([_wav(), _wav(300.0, channels=2), None, b"RIFF garbage"][:n]),
    }


def test_spec_from_config_and_frames():
    spec = PreprocessSpec.from_config(DataConfig(image_size=48, augment=True), augment=False)
    assert spec.image_size == 48 and spec.augment is False
    assert spec.frames == audio_frames(16000, 1.0, 160) == 101


def test_batch_contract_keys_dtypes_shapes_and_missing_modalities(tok):
    out = preprocess_batch(_batch(), SPEC, tok)
    assert tuple(out) == BATCH_KEYS
    B, L, S, M, F = 4, 12, 32, 16, SPEC.frames
    expect = {"sample_id": (np.int64, (B,)), "input_ids": (np.int64, (B, L)),
              "attention_mask": (np.int64, (B, L)), "target_ids": (np.int64, (B, L)),
              "target_mask": (np.int64, (B, L)), "label": (np.int64, (B,)),
              "image": (np.uint8, (B, 3, S, S)), "audio": (np.float32, (B, M, F)),
              "has_text": (np.bool_, (B,)), "has_image": (np.bool_, (B,)),
              "has_audio": (np.bool_, (B,))}
    for k, (dtype, shape) in expect.items():
        assert out[k].dtype == dtype and out[k].shape == shape, k
    assert out["has_text"].tolist() == [True, False, True, True]
    assert out["has_image"].tolist() == [True, False, False, True]  # None and garbage -> missing
    assert out["has_audio"].tolist() == [True, True, False, False]
    assert not out["image"][1].any() and not out["image"][2].any()
    assert not out["audio"][2].any() and not out["audio"][3].any()
    assert not out["input_ids"][1].any() and not out["attention_mask"][1].any()
    # target falls back to text; a missing text with a target still gets target ids
    assert np.array_equal(out["target_ids"][0], out["input_ids"][0])
    assert out["target_mask"][1].any()
    assert out["label"].tolist() == [3, -1, 0, 7]
    assert out["image"][0, 0].mean() > 150 and out["image"][0, 2].mean() < 60  # red


def test_batch_without_optional_columns(tok):
    out = preprocess_batch({"sample_id": np.arange(2), "text": np.array(["a", "b"], dtype=object)},
                           SPEC, tok)
    assert not out["has_image"].any() and not out["has_audio"].any()
    assert (out["label"] == -1).all()


def test_batch_preprocessor_chunks_whole_blocks(tok):
    chunks = list(BatchPreprocessor(SPEC, tok, chunk_rows=3)(_batch(4)))
    assert [len(c["sample_id"]) for c in chunks] == [3, 1]
    whole = preprocess_batch(_batch(4), SPEC, tok)
    assert np.array_equal(np.concatenate([c["audio"] for c in chunks]), whole["audio"])


def test_batch_preprocessor_yields_blocks_of_block_bytes_after_an_early_first_chunk(tok):
    """With block_bytes (what Ray Data's tasks hand over as blocks): the first chunk at once
    (a task of the first wave; outside Ray every call counts as task 0), then whole chunks
    grouped until a group reaches block_bytes, then the rest; with no first wave no early
    chunk. The rows and their order are those of the plain chunks."""
    four = _batch(4)  # every kind of row, good and bad, repeated to 10 rows
    rows = {k: np.concatenate([v, v, v])[:10] for k, v in four.items()}
    rows["sample_id"] = np.arange(10)
    chunk_bytes = sum(v.nbytes for v in preprocess_batch(_batch(2), SPEC, tok).values())
    blocks = list(BatchPreprocessor(SPEC, tok, chunk_rows=2, block_bytes=2 * chunk_bytes)(rows))
    assert [len(b["sample_id"]) for b in blocks] == [2, 4, 4]
    whole = list(BatchPreprocessor(SPEC, tok, chunk_rows=2, block_bytes=1 << 40)(rows))
    assert [len(b["sample_id"]) for b in whole] == [2, 8]
    later = list(BatchPreprocessor(SPEC, tok, chunk_rows=2, block_bytes=2 * chunk_bytes,
                                   first_wave=0)(rows))
    assert [len(b["sample_id"]) for b in later] == [4, 4, 2]
    # first_rows: what a training worker needs before its first batch comes first, on its own
    first = list(BatchPreprocessor(SPEC, tok, chunk_rows=2, block_bytes=1 << 40,
                                   first_rows=5)(rows))
    assert [len(b["sample_id"]) for b in first] == [6, 4]  # whole chunks: 5 rows -> 3 chunks
    all_first = list(BatchPreprocessor(SPEC, tok, chunk_rows=2, block_bytes=1 << 40,
                                       first_rows=100)(rows))
    assert [len(b["sample_id"]) for b in all_first] == [10]
    chunks = list(BatchPreprocessor(SPEC, tok, chunk_rows=2)(rows))
    assert [len(c["sample_id"]) for c in chunks] == [2] * 5
    for key in BATCH_KEYS:
        expected = np.concatenate([c[key] for c in chunks])
        for got in (blocks, whole, later, first, all_first):
            assert np.array_equal(np.concatenate([b[key] for b in got]), expected), key
    assert list(BatchPreprocessor(SPEC, tok, chunk_rows=2, block_bytes=10)(
        {k: v[:0] for k, v in rows.items()})) == []


def test_decode_image_resizes_crops_and_augments():
    img = decode_image(_image(80, 40, fmt="JPEG"), 32)
    assert img.shape == (3, 32, 32) and img.dtype == np.uint8
    aug = decode_image(_image(80, 40), 32, augment=True, rng=np.random.default_rng(0))
    assert aug.shape == (3, 32, 32)
    gray = io.BytesIO()
    Image.new("L", (20, 20), 128).save(gray, format="PNG")
    assert decode_image(gray.getvalue(), 16).shape == (3, 16, 16)


@pytest.mark.parametrize("fmt", ["WAV", "FLAC"])
def test_decode_audio_mono_resample_and_length(fmt):
    wave = decode_audio(_wav(1000.0, sr=16000, seconds=0.3, channels=2, fmt=fmt), 8000, 4000)
    assert wave.shape == (4000,) and wave.dtype == np.float32
    assert not wave[2500:].any()  # 0.3 s of 0.5 s, zero padded
    spectrum = np.abs(np.fft.rfft(wave[:2400]))
    assert abs(np.argmax(spectrum) * 8000 / 2400 - 1000) < 10  # the tone survives resampling


def test_log_mel_peaks_at_the_tone():
    sr, n = 8000, 4000
    t = np.arange(n) / sr
    waves = np.stack([np.sin(2 * np.pi * f * t) for f in (300.0, 2000.0)]).astype(np.float32)
    mel = log_mel(waves, sr, 16, 80, 256)
    assert mel.shape == (2, 16, 1 + n // 80) and mel.dtype == np.float32
    peaks = mel.mean(axis=2).argmax(axis=1)
    assert peaks[0] < peaks[1]
    fb = mel_filterbank(sr, 256, 16)
    centre = (fb.argmax(axis=1) * sr / 256)
    assert abs(centre[peaks[1]] - 2000) < 400
    assert np.isfinite(log_mel(np.zeros((1, n), np.float32), sr, 16, 80, 256)).all()


def test_log_mel_of_a_large_batch_is_each_clip_on_its_own():
    """log_mel works through a batch LOG_MEL_ROWS clips at a time (to stay in cache): a batch
    that is not a multiple of it gives each clip what it gives alone, in order."""
    from mmdist.data.audio import LOG_MEL_ROWS

    n = 2 * LOG_MEL_ROWS + 3
    waves = np.random.default_rng(0).standard_normal((n, 4000)).astype(np.float32)
    waves *= np.linspace(0.1, 2.0, n, dtype=np.float32)[:, None]  # every clip different
    batch = log_mel(waves, 8000, 16, 80, 256)
    alone = np.concatenate([log_mel(w[None], 8000, 16, 80, 256) for w in waves])
    assert batch.shape == (n, 16, 1 + 4000 // 80) and batch.dtype == np.float32
    np.testing.assert_allclose(batch, alone, rtol=0, atol=1e-5)
    assert not np.allclose(batch[0], batch[-1])


def test_batch_preprocessor_on_an_arrow_block_matches_the_numpy_path(tok):
    """Ray Data hands the training pipeline's UDF Arrow blocks (each chunk converted on its own);
    the output must be what the same rows give as numpy, nulls and undecodable bytes included,
    with a null label (Arrow: NaN after conversion) still -1."""
    import pyarrow as pa

    rows = _batch(4)
    rows["label"] = [3, None, 0, 7]
    table = pa.table({"sample_id": pa.array(rows["sample_id"]),
                      "text": pa.array(list(rows["text"]), pa.string()),
                      "target": pa.array(list(rows["target"]), pa.string()),
                      "label": pa.array(rows["label"], pa.int64()),
                      "image": pa.array(list(rows["image"]), pa.binary()),
                      "audio": pa.array(list(rows["audio"]), pa.binary())})
    chunks = list(BatchPreprocessor(SPEC, tok, chunk_rows=3)(table))
    assert [len(c["sample_id"]) for c in chunks] == [3, 1]
    expected = preprocess_batch({**rows, "label": np.array([3, -1, 0, 7])}, SPEC, tok)
    for key in BATCH_KEYS:
        assert np.array_equal(np.concatenate([c[key] for c in chunks]), expected[key]), key
