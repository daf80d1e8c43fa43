"""Audio features for pretrained Hugging Face audio encoders, from a local model directory.

A pretrained audio encoder expects the features its own feature extractor makes, not
mmdist's log-mel (:mod:`mmdist.data.audio`). :class:`AudioFeatures` turns a batch of decoded
waves ``(n, N)`` into them, one fixed shape per kind of encoder:

=============  ==============================  ===========================================
kind           encoders                        per-clip features (float32)
=============  ==============================  ===========================================
``log_mel``    Whisper                         ``(n_mels, min(N, n_samples) // hop)``
``waveform``   wav2vec2, HuBERT, WavLM         ``(N,)``, normalised when ``do_normalize``
``fbank``      AST                             ``(max_length, num_mel_bins)``
=============  ==============================  ===========================================

Whisper's features are computed on the clip itself, not padded to its 30 s window (the encoder,
``mmdist.models.hf_encoders.HFAudioEncoder``, pads them and masks the padding out); a clip
longer than the extractor's window (``chunk_length`` seconds) is cut to it, as Whisper does.

numpy only at import: transformers (seconds of start-up) is imported on the first call, also
after unpickling, so Ray workers that unpickle an :class:`AudioFeatures` pay for it only when
they make features. Directories are read locally, never from the hub.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np

# model type (config.json) -> kind of audio input
AUDIO_KINDS = {"whisper": "log_mel", "wav2vec2": "waveform", "hubert": "waveform",
               "wavlm": "waveform", "audio-spectrogram-transformer": "fbank"}
# feature extractor class (its saved config's ``feature_extractor_type``) -> kind
EXTRACTOR_KINDS = {"WhisperFeatureExtractor": "log_mel", "Wav2Vec2FeatureExtractor": "waveform",
                   "ASTFeatureExtractor": "fbank"}
# what the extractor's output is called, per kind
_OUTPUT_KEY = {"log_mel": "input_features", "waveform": "input_values", "fbank": "input_values"}


def read_json(path: Path) -> dict[str, Any]:
    """A JSON object from ``path``.

    Raises:
        ValueError: not valid JSON, or not an object.
    """
    try:
        data = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ValueError(f"{path}: not valid JSON ({e})") from None
    if not isinstance(data, dict):
        raise ValueError(f"{path}: expected a JSON object")
    return data


def processor_json(path: str | Path, part: str) -> dict[str, Any] | None:
    """The saved settings of a model directory's processor ``part`` (``"feature_extractor"``,
    ``"image_processor"``), or None when the directory has none.

    Looked up as transformers does: nested in ``processor_config.json`` (what a processor's
    ``save_pretrained`` writes), else ``preprocessor_config.json`` (what the part's own
    ``save_pretrained`` writes, and what most published models have).
    """
    d = Path(path)
    if (d / "processor_config.json").is_file():
        nested = read_json(d / "processor_config.json")
        alias = {"feature_extractor": "audio_processor"}.get(part, part)
        found = nested.get(part, nested.get(alias))
        if isinstance(found, dict):
            return found
    if (d / "preprocessor_config.json").is_file():
        return read_json(d / "preprocessor_config.json")
    return None


def feature_kind(path: str | Path) -> str:
    """The kind of features (``log_mel``, ``waveform``, ``fbank``) a model directory's audio
    encoder takes: from ``config.json``'s ``model_type``, else from the saved feature
    extractor's class.

    Raises:
        FileNotFoundError: not a directory, or neither file is there.
        ValueError: a model or extractor of another kind.
    """
    d = Path(path)
    if not d.is_dir():
        raise FileNotFoundError(f"{path!r}: not a directory")
    if (d / "config.json").is_file():
        model_type = read_json(d / "config.json").get("model_type")
        if model_type not in AUDIO_KINDS:
            raise ValueError(f"{path!r}: model type {model_type!r} is not an audio encoder "
                             f"mmdist supports; supported: {sorted(AUDIO_KINDS)}")
        return AUDIO_KINDS[model_type]
    facts = processor_json(d, "feature_extractor")
    if facts is None:
        raise FileNotFoundError(f"{path!r}: no config.json or preprocessor_config.json")
    name = facts.get("feature_extractor_type")
    if name not in EXTRACTOR_KINDS:
        raise ValueError(f"{path!r}: feature extractor {name!r} is not one mmdist supports; "
                         f"supported: {sorted(EXTRACTOR_KINDS)}")
    return EXTRACTOR_KINDS[name]


def _extractor_facts(path: str | Path) -> dict[str, Any]:
    facts = processor_json(path, "feature_extractor")
    if facts is None:
        raise FileNotFoundError(f"{path!r}: no saved feature extractor (preprocessor_config.json"
                                " or processor_config.json); save it with save_pretrained next "
                                "to the model")
    return facts


def _shape(kind: str, facts: dict[str, Any], num_samples: int) -> tuple[int, ...]:
    if kind == "log_mel":
        window = int(facts.get("n_samples") or facts["chunk_length"] * facts["sampling_rate"])
        return (int(facts["feature_size"]), min(num_samples, window) // int(facts["hop_length"]))
    if kind == "waveform":
        return (num_samples,)
    return (int(facts["max_length"]), int(facts["num_mel_bins"]))


def feature_shape(path: str | Path, num_samples: int) -> tuple[int, ...]:
    """The per-clip shape of the features :class:`AudioFeatures` makes for clips of
    ``num_samples`` samples (read from the saved JSON, without transformers): lets callers
    allocate zeros for clips with no audio.

    Raises:
        FileNotFoundError: no saved model config or feature extractor in ``path``.
        ValueError: not an audio encoder mmdist supports.
    """
    return _shape(feature_kind(path), _extractor_facts(path), int(num_samples))


class AudioFeatures:
    """The feature extractor saved in a local model directory, as a picklable batch function.

    ``AutoFeatureExtractor.from_pretrained(path)`` runs on the first call (also after
    unpickling: only the path and the JSON facts are pickled).

    Args:
        path: the model directory (its feature extractor saved with ``save_pretrained``).
        sample_rate: the rate the waves come at (``data.sample_rate``); None: not checked.

    Raises:
        FileNotFoundError: not a directory, or no saved feature extractor in it.
        ValueError: not an audio encoder mmdist supports, or ``sample_rate`` is not the
            extractor's ``sampling_rate``.
    """

    def __init__(self, path: str | Path, sample_rate: int | None = None):
        self.path = str(path)
        self.kind = feature_kind(path)
        self.facts = _extractor_facts(path)
        if sample_rate is not None and int(sample_rate) != self.sampling_rate:
            raise ValueError(f"data.sample_rate={sample_rate} but the feature extractor in "
                             f"{self.path!r} takes {self.sampling_rate} Hz audio; set "
                             f"data.sample_rate={self.sampling_rate}")
        self._extractor: Any = None

    @property
    def sampling_rate(self) -> int:
        """The sample rate (Hz) the extractor takes."""
        return int(self.facts["sampling_rate"])

    def shape(self, num_samples: int) -> tuple[int, ...]:
        """Per-clip feature shape for clips of ``num_samples`` samples (see module docstring)."""
        return _shape(self.kind, self.facts, int(num_samples))

    def __getstate__(self) -> dict[str, Any]:
        return {"path": self.path, "kind": self.kind, "facts": self.facts}

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__dict__.update(state)
        self._extractor = None

    def extractor(self) -> Any:
        """The transformers feature extractor (loaded on first use, local files only)."""
        if self._extractor is None:
            # heavy: imported on first use (see the module docstring)
            from transformers import AutoFeatureExtractor

            self._extractor = AutoFeatureExtractor.from_pretrained(self.path,
                                                                   local_files_only=True)
        return self._extractor

    def __call__(self, waves: np.ndarray) -> np.ndarray:
        """float32 waves ``(n, N)`` at :attr:`sampling_rate` -> float32 features
        ``(n, *self.shape(N))``.

        Raises:
            ValueError: ``waves`` is not 2-D.
        """
        waves = np.asarray(waves, dtype=np.float32)
        if waves.ndim != 2:
            raise ValueError(f"expected waves of shape (n, N), got {waves.shape}")
        n, num_samples = waves.shape
        out_shape = (n, *self.shape(num_samples))
        if n == 0:
            return np.zeros(out_shape, dtype=np.float32)
        kwargs: dict[str, Any] = {"sampling_rate": self.sampling_rate, "return_tensors": "np"}
        if self.kind == "log_mel":
            kwargs["padding"] = "longest"  # the clip's own frames, not Whisper's 30 s window
        out = self.extractor()(list(waves), **kwargs)[_OUTPUT_KEY[self.kind]]
        out = np.ascontiguousarray(out, dtype=np.float32)
        if out.shape != out_shape:  # a transformers change would otherwise shift every batch
            raise ValueError(f"feature extractor in {self.path!r} gave {out.shape}, "
                             f"expected {out_shape}")
        return out
