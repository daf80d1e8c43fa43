"""The two data contracts every part of mmdist agrees on.

1. Shard rows (Parquet, written by `mmdist prepare`, one row per sample):

    sample_id  int64     stable id of the sample (unique across the whole dataset)
    text       string    caption / question / any text input; null when absent
    target     string    text the model should produce (lm/vqa answer); null -> `text`
    label      int64     class label; -1 when absent
    image      binary    encoded image file bytes (PNG/JPEG/...); null when absent
    audio      binary    encoded audio file bytes (WAV/FLAC); null when absent
    label_image int64    class of what the image alone shows; -1 when absent (auxiliary)
    label_audio int64    class of what the audio alone says; -1 when absent (auxiliary)
    video      binary    K sampled frames as one PNG strip K frames tall (``data/video.py``);
                         null when absent. A video's sound track is the row's ``audio``.

2. Model batches (what preprocessing returns and what `FusedModel.forward` takes; numpy in
   Ray Data, torch tensors on the worker, B = batch size):

    sample_id       int64   (B,)
    input_ids       int64   (B, L)   tokenised `text`, L = data.max_text_len, [BOS] ... [EOS] pad
    attention_mask  int64   (B, L)   1 for real tokens
    target_ids      int64   (B, L)   tokenised `target` (or `text` when target is null)
    target_mask     int64   (B, L)
    label           int64   (B,)     -1 when absent
    label_image     int64   (B,)     -1 when absent; per-modality labels train auxiliary heads
    label_audio     int64   (B,)     -1 when absent
    image           uint8   (B, 3, S, S)  S = data.image_size; zeros when absent.
                                     Normalisation to float happens inside the model, so
                                     batches cross the object store as uint8.
    audio           float32 (B, n_mels, F)  log-mel, F = audio_frames(...); zeros when absent
    video           uint8   (B, K, 3, S, S)  K = data.video_frames when the model reads video,
                                     else 0 (no bytes move for models without video)
    has_text        bool    (B,)
    has_image       bool    (B,)
    has_audio       bool    (B,)
    has_video       bool    (B,)

Every key is always present: a missing modality is a zero tensor plus has_<modality>=False,
so every rank runs every encoder every step (no ZeRO-3 hang on mixed modality subsets).
"""

from __future__ import annotations

import warnings
from typing import TYPE_CHECKING

import pyarrow as pa

if TYPE_CHECKING:
    import numpy as np
    import torch

SHARD_SCHEMA = pa.schema([
    ("sample_id", pa.int64()),
    ("text", pa.string()),
    ("target", pa.string()),
    ("label", pa.int64()),
    ("image", pa.binary()),
    ("audio", pa.binary()),
    ("label_image", pa.int64()),
    ("label_audio", pa.int64()),
    ("video", pa.binary()),
])

# Per-modality label columns (shard and batch), the modality they describe.
MODALITY_LABELS = {"label_image": "image", "label_audio": "audio"}

BATCH_KEYS = ("sample_id", "input_ids", "attention_mask", "target_ids", "target_mask", "label",
              "image", "audio", "has_text", "has_image", "has_audio", "label_image",
              "label_audio", "video", "has_video")

# Special tokens of tokenizers trained by mmdist (ids fixed in this order).
SPECIAL_TOKENS = ("[PAD]", "[UNK]", "[BOS]", "[EOS]", "[SEP]", "[MASK]")
PAD_ID, UNK_ID, BOS_ID, EOS_ID = 0, 1, 2, 3


def audio_frames(sample_rate: int, audio_seconds: float, hop_length: int) -> int:
    """Number of log-mel frames for a clip (centred STFT): 1 + samples // hop."""
    return 1 + int(round(sample_rate * audio_seconds)) // hop_length


def random_batch(batch_size: int, vocab_size: int, max_text_len: int, image_size: int,
                 n_mels: int, frames: int, num_classes: int = 8, seed: int = 0,
                 device: str = "cpu", video_frames: int = 0) -> dict:
    """A model batch of random content with every key of the contract (benchmarks, smoke runs).

    Token ids avoid the special ids; every modality is present.
    """
    import torch  # heavy: not loaded for --help

    g = torch.Generator().manual_seed(seed)
    B, L = batch_size, max_text_len
    ids = torch.randint(len(SPECIAL_TOKENS), vocab_size, (B, L), generator=g)
    ids[:, 0], ids[:, -1] = BOS_ID, EOS_ID
    ones = torch.ones(B, L, dtype=torch.int64)
    batch = {
        "sample_id": torch.arange(B, dtype=torch.int64),
        "input_ids": ids, "attention_mask": ones,
        "target_ids": ids.clone(), "target_mask": ones.clone(),
        "label": torch.randint(0, max(num_classes, 1), (B,), generator=g),  # 0: from the data
        "image": torch.randint(0, 256, (B, 3, image_size, image_size), generator=g,
                               dtype=torch.uint8),
        "audio": torch.randn(B, n_mels, frames, generator=g),
        "has_text": torch.ones(B, dtype=torch.bool),
        "has_image": torch.ones(B, dtype=torch.bool),
        "has_audio": torch.ones(B, dtype=torch.bool),
        "label_image": torch.full((B,), -1, dtype=torch.int64),
        "label_audio": torch.full((B,), -1, dtype=torch.int64),
        "video": torch.randint(0, 256, (B, video_frames, 3, image_size, image_size),
                               generator=g, dtype=torch.uint8),
        "has_video": torch.full((B,), video_frames > 0, dtype=torch.bool),
    }
    return {k: v.to(device) for k, v in batch.items()}


def to_device(batch: dict[str, torch.Tensor], device: torch.device) -> dict[str, torch.Tensor]:
    """The batch's tensors on ``device`` (asynchronous copies); other values as they are."""
    import torch  # heavy: not loaded for --help

    return {k: v.to(device, non_blocking=True) if isinstance(v, torch.Tensor) else v
            for k, v in batch.items()}


def as_tensors(batch: dict[str, np.ndarray]) -> dict[str, torch.Tensor]:
    """A numpy batch of the contract -> CPU tensors sharing its memory (no copy).

    Columns that are views of Arrow or object-store memory are read-only; nothing writes to a
    batch, so torch's "not writable" warning (printed once by every worker) is silenced here.

    Raises:
        TypeError: a column holds Python objects; the message names it.
    """
    import torch  # heavy: not loaded for --help

    out = {}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)
        for key, value in batch.items():
            if value.dtype == object:
                raise TypeError(f"batch column {key!r} holds Python objects (ragged or "
                                f"non-numeric rows); the batch contract is fixed-size numeric "
                                f"arrays")
            out[key] = torch.from_numpy(value)
    return out
