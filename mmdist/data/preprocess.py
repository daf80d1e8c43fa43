"""Preprocessing of whole batches: shard rows -> the model batch contract (``schema.py``).

The same :func:`preprocess_batch` runs inside Ray Data ``map_batches``, in the torch DataLoader
baseline and at inference, so the three can never drift apart:

    spec = PreprocessSpec.from_config(cfg.data)
    batch = preprocess_batch({"sample_id": ..., "text": ..., "image": ..., ...}, spec, tokenizer)

Each modality is a module of pure functions: :mod:`mmdist.data.image` (uint8 ``(3, S, S)``)
and :mod:`mmdist.data.audio` (log-mel ``(n_mels, F)`` float32); text goes through the
dataset's tokenizer. Undecodable bytes are treated as a missing modality, never a crash.
"""

from __future__ import annotations

import ctypes
import dataclasses
from collections.abc import Iterator
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import numpy as np

from mmdist.data.audio import decode_audio, log_mel
from mmdist.data.hf_audio import AudioFeatures
from mmdist.data.image import decode_image
from mmdist.data.schema import MODALITY_LABELS, audio_frames
from mmdist.data.video import strip_to_frames

if TYPE_CHECKING:
    from mmdist.config import DataConfig
    from mmdist.data.tokenizer import TextTokenizer


@dataclass(frozen=True)
class PreprocessSpec:
    """Everything preprocessing needs to know; built from ``DataConfig``.

    Args:
        image_size: S, the side of the square output image.
        sample_rate: Hz after resampling.
        audio_seconds: clip length after cutting/padding.
        n_mels: log-mel bins.
        hop_length: samples between STFT frames.
        max_text_len: L, tokens per text row including [BOS]/[EOS].
        augment: random crop + horizontal flip of images (training only).
        audio_features: a pretrained audio encoder's directory (``model.audio_pretrained``, or
            the copy a saved model holds): its feature extractor makes the audio features
            (``mmdist.data.hf_audio``) instead of mmdist's log-mel.
        video_frames: K, frames per video in the batch; 0 when the model reads no video
            (the ``video`` key is then ``(B, 0, 3, S, S)``: no bytes move).
    """

    image_size: int = 64
    sample_rate: int = 16000
    audio_seconds: float = 1.0
    n_mels: int = 32
    hop_length: int = 160
    max_text_len: int = 32
    augment: bool = False
    audio_features: str | None = None
    video_frames: int = 0

    @classmethod
    def from_config(cls, data: DataConfig, augment: bool | None = None,
                    audio_features: str | None = None, video: bool = False) -> PreprocessSpec:
        """The spec of ``cfg.data``; ``augment`` overrides ``data.augment`` (False for val);
        ``audio_features``: ``model.audio_pretrained`` (see the class); ``video``: the model
        reads video (``data.video_frames`` frames per row, else none)."""
        return cls(image_size=data.image_size, sample_rate=data.sample_rate,
                   audio_seconds=data.audio_seconds, n_mels=data.n_mels,
                   hop_length=data.hop_length, max_text_len=data.max_text_len,
                   augment=data.augment if augment is None else augment,
                   audio_features=audio_features,
                   video_frames=data.video_frames if video else 0)

    def replace(self, **changes: Any) -> PreprocessSpec:
        return dataclasses.replace(self, **changes)

    @property
    def num_samples(self) -> int:
        """Audio samples per clip."""
        return int(round(self.sample_rate * self.audio_seconds))

    @property
    def n_fft(self) -> int:
        """FFT size: the smallest power of two >= 2.5 hops (512 for hop 160)."""
        return int(2 ** np.ceil(np.log2(max(2.5 * self.hop_length, 16))))

    @property
    def frames(self) -> int:
        """F, log-mel frames per clip (see ``schema.audio_frames``)."""
        return audio_frames(self.sample_rate, self.audio_seconds, self.hop_length)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


# ---- memory ---------------------------------------------------------------------------------

# glibc's allocator: blocks from this size on get a mapping of their own, and this much free
# memory at the top of the heap is kept (see `reuse_freed_memory`).
MMAP_THRESHOLD_BYTES = 32 * 1024 * 1024  # glibc's largest allowed value on 64-bit
TRIM_THRESHOLD_BYTES = 128 * 1024 * 1024
_M_TRIM_THRESHOLD, _M_MMAP_THRESHOLD = -1, -3  # mallopt parameter numbers (malloc.h)
_allocator_tuned = False


def reuse_freed_memory() -> bool:
    """Let this process's allocator keep freed memory for the next batch (glibc; once per
    process; a no-op elsewhere). Returns whether the setting is in effect.

    Every batch allocates and frees the same few arrays of 0.1-10 MB (decoded waves, STFT
    frames and spectra, image stacks). glibc starts with a 128 KiB mmap threshold, so by default
    such arrays get fresh mappings of their own or are trimmed off the heap when freed, and
    every batch faults its memory in page by page again. A 32 MiB threshold and 128 MiB kept make
    preprocessing faster and cut most of those page faults (figures: ``docs/performance.md``).
    The price: a worker keeps up to 128 MiB of freed memory.
    Called where preprocessing runs in a loop: Ray Data tasks (:class:`BatchPreprocessor`) and
    DataLoader workers (``shard_batches.ShardBatches``), so both paths run the same way.
    """
    global _allocator_tuned
    if _allocator_tuned:
        return True
    try:
        libc = ctypes.CDLL("libc.so.6")
        ok = (libc.mallopt(_M_MMAP_THRESHOLD, MMAP_THRESHOLD_BYTES) == 1
              and libc.mallopt(_M_TRIM_THRESHOLD, TRIM_THRESHOLD_BYTES) == 1)
    except (OSError, AttributeError):  # not glibc (macOS, musl): its own allocator stays
        ok = False
    _allocator_tuned = ok
    return ok


# ---- the batch function ---------------------------------------------------------------------


def _column(batch: dict[str, Any], key: str, n: int) -> list:
    col = batch.get(key)
    if col is None:
        return [None] * n
    return list(col)


def _present(v: Any) -> bool:
    if v is None:
        return False
    if isinstance(v, float) and np.isnan(v):  # pandas' missing value
        return False
    return True


def preprocess_batch(batch: dict[str, Any], spec: PreprocessSpec,
                     tokenizer: TextTokenizer) -> dict[str, np.ndarray]:
    """Shard rows -> the model batch of ``schema.py`` (every key, dtype and shape).

    Args:
        batch: column name -> array/list of ``len == B`` with the shard columns
            (``sample_id, text, target, label, image, audio``); missing columns count as absent.
        spec: sizes and options.
        tokenizer: the dataset's tokenizer.

    Returns:
        ``schema.BATCH_KEYS`` -> numpy arrays. A missing or undecodable modality is zeros with
        ``has_<modality> = False``; a missing ``target`` falls back to ``text``.
    """
    n = len(batch["sample_id"])
    S, M, F, N = spec.image_size, spec.n_mels, spec.frames, spec.num_samples
    texts = [t if _present(t) and isinstance(t, str) else None for t in _column(batch, "text", n)]
    targets = [g if _present(g) and isinstance(g, str) else t
               for g, t in zip(_column(batch, "target", n), texts)]
    input_ids, attention_mask = tokenizer.encode_batch(texts, spec.max_text_len)
    target_ids, target_mask = tokenizer.encode_batch(targets, spec.max_text_len)

    images = np.zeros((n, 3, S, S), dtype=np.uint8)
    has_image = np.zeros(n, dtype=bool)
    rng = np.random.default_rng() if spec.augment else None
    for i, data in enumerate(_column(batch, "image", n)):
        if not _present(data):
            continue
        try:
            images[i] = decode_image(bytes(data), S, spec.augment, rng)
            has_image[i] = True
        except Exception:  # undecodable at training time -> missing modality, never a crash
            pass

    waves = np.zeros((n, N), dtype=np.float32)
    has_audio = np.zeros(n, dtype=bool)
    for i, data in enumerate(_column(batch, "audio", n)):
        if not _present(data):
            continue
        try:
            waves[i] = decode_audio(bytes(data), spec.sample_rate, N)
            has_audio[i] = True
        except Exception:
            pass
    if spec.audio_features:  # a pretrained encoder's own features
        features = audio_features(spec.audio_features, spec.sample_rate)
        audio = np.zeros((n, *features.shape(N)), dtype=np.float32)
        if has_audio.any():
            audio[has_audio] = features(waves[has_audio])
    else:
        audio = np.zeros((n, M, F), dtype=np.float32)
        if has_audio.any():
            audio[has_audio] = log_mel(waves[has_audio], spec.sample_rate, M, spec.hop_length,
                                       spec.n_fft)

    K = spec.video_frames
    videos = np.zeros((n, K, 3, S, S), dtype=np.uint8)
    has_video = np.zeros(n, dtype=bool)
    for i, data in enumerate(_column(batch, "video", n) if K else ()):
        if not _present(data):
            continue
        try:
            videos[i] = strip_to_frames(bytes(data), K, S)
            has_video[i] = True
        except Exception:
            pass

    labels = {k: np.array([int(v) if _present(v) else -1 for v in _column(batch, k, n)],
                          dtype=np.int64) for k in ("label", *MODALITY_LABELS)}
    return {
        "sample_id": np.asarray(batch["sample_id"], dtype=np.int64),
        "input_ids": input_ids,
        "attention_mask": attention_mask,
        "target_ids": target_ids,
        "target_mask": target_mask,
        "label": labels["label"],
        "image": images,
        "audio": audio,
        "has_text": np.array([t is not None for t in texts], dtype=bool),
        "has_image": has_image,
        "has_audio": has_audio,
        **{k: labels[k] for k in MODALITY_LABELS},
        "video": videos,
        "has_video": has_video,
    }


_FEATURES: dict[tuple[str, int], AudioFeatures] = {}


def audio_features(path: str, sample_rate: int) -> AudioFeatures:
    """The feature extractor of ``path``, loaded once per process."""
    key = (str(path), int(sample_rate))
    if key not in _FEATURES:
        _FEATURES[key] = AudioFeatures(path, sample_rate)
    return _FEATURES[key]


def arrow_to_numpy(table: Any) -> dict[str, np.ndarray]:
    """The columns of a pyarrow Table or RecordBatch as the numpy batch
    :func:`preprocess_batch` takes (strings and bytes become object arrays)."""
    return {k: table.column(k).to_numpy(zero_copy_only=False) for k in table.column_names}


class BatchPreprocessor:
    """:func:`preprocess_batch` bound to a spec and tokenizer: the picklable UDF that Ray Data
    and DataLoader workers call.

    Called with a whole block (Ray Data ``batch_size=None``, which lets the read and this map
    fuse into one task), it preprocesses the block in chunks of ``chunk_rows`` so each call's
    arrays stay small. Given a pyarrow Table (``batch_format="pyarrow"``, what the training
    pipeline uses) it converts each chunk's columns to numpy on their own, as the DataLoader
    path converts each record batch: converting a whole shard of encoded images and audio at
    once (``"numpy"``) makes hundreds of MB of fresh arrays per task and costs more worker CPU
    (``docs/performance.md``). It lives here (numpy only) rather than beside the torch code so
    Ray workers unpickling it skip torch.

    What it yields is what leaves the Ray task as blocks when Ray's own block shaping is off
    for this map (``mmdist.data.ray_scheduling.UdfShapesBlocks``). With ``block_bytes`` it
    yields blocks of up to ``block_bytes``: every block costs the driver, the raylet and the
    worker some ms of CPU, so few and large is cheapest. Only the tasks that start an execution
    (``task_idx < first_wave``, one per task slot of the cluster) yield their first
    ``first_rows`` rows on their own first, so the consumer's first batch of every epoch waits
    for those rather than a shard (a training worker's first batch needs its whole local
    shuffle buffer); later tasks' output is needed only after theirs. Without ``block_bytes``
    it yields every chunk (for Ray to merge, or for a caller that wants chunks).

    Args:
        spec: preprocessing sizes and options.
        tokenizer: the dataset's tokenizer.
        chunk_rows: rows per :func:`preprocess_batch` call.
        block_bytes: most bytes per yielded block (None: yield every chunk).
        first_wave: tasks (by Ray Data's task index) that yield their first rows alone; outside
            a Ray Data task every call does.
        first_rows: rows of that first block (default: one chunk).
    """

    def __init__(self, spec: PreprocessSpec, tokenizer: TextTokenizer, chunk_rows: int = 64,
                 block_bytes: int | None = None, first_wave: int = 1,
                 first_rows: int | None = None):
        self.spec, self.tokenizer, self.chunk_rows = spec, tokenizer, max(1, int(chunk_rows))
        self.block_bytes = int(block_bytes) if block_bytes else None
        self.first_wave = max(0, int(first_wave))
        self.first_rows = max(1, int(first_rows or self.chunk_rows))

    def __call__(self, batch: Any) -> Iterator[dict[str, np.ndarray]]:
        reuse_freed_memory()
        chunks = self._chunks(batch)
        if self.block_bytes is None:
            yield from chunks
            return
        held: list[dict[str, np.ndarray]] = []
        size = 0
        if _task_index() < self.first_wave:
            rows = 0
            for chunk in chunks:
                held.append(chunk)
                rows += len(chunk["sample_id"])
                if rows >= self.first_rows:
                    break
            if held:
                yield _concat(held)
            held = []
        for chunk in chunks:
            held.append(chunk)
            size += sum(v.nbytes for v in chunk.values())
            if size >= self.block_bytes:
                yield _concat(held)
                held, size = [], 0
        if held:
            yield _concat(held)

    def _chunks(self, batch: Any) -> Iterator[dict[str, np.ndarray]]:
        if hasattr(batch, "column_names"):  # a pyarrow Table
            for start in range(0, batch.num_rows, self.chunk_rows):
                part = batch.slice(start, self.chunk_rows)
                yield preprocess_batch(arrow_to_numpy(part), self.spec, self.tokenizer)
            return
        n = len(batch["sample_id"])
        for start in range(0, n, self.chunk_rows):
            chunk = {k: v[start:start + self.chunk_rows] for k, v in batch.items()}
            yield preprocess_batch(chunk, self.spec, self.tokenizer)


def _task_index() -> int:
    """Ray Data's index of the running map task within its operator (0 outside a task)."""
    # Imported here, not at the top: ray_scheduling imports Ray Data (seconds of CPU), and
    # this module also serves the DataLoader baseline and inference, where only Ray Data tasks
    # (already holding it) ever call this.
    from mmdist.data import ray_scheduling  # loads ray: not for --help

    return ray_scheduling.task_index()


def _concat(chunks: list[dict[str, np.ndarray]]) -> dict[str, np.ndarray]:
    if len(chunks) == 1:
        return chunks[0]
    return {k: np.concatenate([c[k] for c in chunks]) for k in chunks[0]}
