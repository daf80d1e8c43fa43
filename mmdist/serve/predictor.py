"""A loaded model directory that answers requests: the one inference path of mmdist.

Used by `mmdist predict`, by the MLflow pyfunc, by `mmdist evaluate` and by batch inference.
Rows go through the same preprocessing as training (``mmdist.data.preprocess``); a video goes
through the same decoder as `mmdist prepare` (``mmdist.data.video``): K frames, its sound track
as the audio and the subtitles beside it as the text, when those are not given.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import torch

from mmdist.config import Config
from mmdist.data.preprocess import PreprocessSpec, preprocess_batch
from mmdist.data.rows import RowError, RowLimits, check_audio, check_image
from mmdist.data.schema import as_tensors
from mmdist.data.shards import canonical_batches
from mmdist.data.tokenizer import TextTokenizer
from mmdist.data.video import VideoError, VideoSpec, video_fields
from mmdist.data.video_sources import load_video
from mmdist.models.model_files import AUDIO_PROCESSOR_DIR, load_model
from mmdist.tasks import compute_metrics

INPUT_COLUMNS = ("text", "image", "audio", "video")


def _absent(value: Any) -> bool:
    """None, NaN (pandas' missing value) and "" mean the modality is not given."""
    return (value is None or (isinstance(value, float) and math.isnan(value))
            or (isinstance(value, str) and not value))


def _read_input(value: Any, column: str, row: int) -> bytes | None:
    """A file path or the file's bytes -> bytes; None/NaN/"" -> None (the modality is absent).

    Raises:
        ValueError: naming the row and column (no such file, unreadable, wrong type).
    """
    if _absent(value):
        return None
    if isinstance(value, (bytes, bytearray, memoryview)):
        data = bytes(value)
    elif isinstance(value, str):
        p = Path(value)
        if not p.is_file():
            raise ValueError(f"row {row}, column {column!r}: no such file {value!r}")
        try:
            data = p.read_bytes()
        except OSError as e:
            raise ValueError(f"row {row}, column {column!r}: cannot read {value!r}: "
                             f"{e.strerror or e}") from None
    else:
        raise ValueError(f"row {row}, column {column!r}: expected a file path or bytes, "
                         f"got {type(value).__name__} {value!r:.60}")
    if not data:
        raise ValueError(f"row {row}, column {column!r}: the {column} is empty (0 bytes)")
    return data


def _video_input(value: Any, row: int, spec: VideoSpec, limits: RowLimits) -> dict[str, Any]:
    """A video file path or bytes -> ``video`` (frame strip), ``audio`` (its sound track or
    None) and ``subtitles`` (beside a path, or None), decoded as `mmdist prepare` does.

    Raises:
        ValueError: naming the row, the column and the file (missing, undecodable, empty).
    """
    where = f"row {row}, column 'video'"
    if isinstance(value, str):
        if not Path(value).is_file():
            raise ValueError(f"{where}: no such file {value!r}")
        try:
            return load_video(value, spec, limits)
        except RowError as e:
            raise ValueError(f"{where}: {value}: {e}") from None
    data = _read_input(value, "video", row)
    try:
        return {**video_fields(data, spec), "subtitles": None}
    except VideoError as e:
        raise ValueError(f"{where}: {e}") from None


def _text_input(value: Any, row: int) -> str | None:
    if _absent(value):
        return None
    if not isinstance(value, str):
        raise ValueError(f"row {row}, column 'text': expected a string, got "
                         f"{type(value).__name__} {value!r:.60}")
    return value


class Predictor:
    """Model + tokenizer + preprocessing spec, loaded from a model directory (no pickle)."""

    def __init__(self, model, tokenizer, cfg: Config, device: str = "cpu",
                 audio_features: str | None = None):
        self.model = model.to(device).eval()
        self.tokenizer = tokenizer
        self.cfg = cfg
        self.device = device
        self.spec = PreprocessSpec.from_config(cfg.data, augment=False,
                                               audio_features=audio_features,
                                               video="video" in cfg.model.modalities)
        self.video_spec = VideoSpec.from_config(cfg.data)

    @classmethod
    def from_dir(cls, path: str | Path, device: str = "cpu") -> Predictor:
        path = Path(path)
        model = load_model(path)
        audio = path / AUDIO_PROCESSOR_DIR  # a pretrained audio encoder's feature extractor
        return cls(model, TextTokenizer.load(path / "tokenizer"), Config.from_dict(model.config),
                   device, str(audio) if audio.is_dir() else None)

    @property
    def task(self) -> str:
        return self.cfg.model.task

    def batch_from_rows(self, rows: list[dict[str, Any]]) -> dict[str, torch.Tensor]:
        """Raw rows (text, image/audio as path or bytes) -> a model batch on the device."""
        known = set(self.cfg.model.modalities)
        cols: dict[str, list] = {"sample_id": list(range(len(rows)))}
        for c in ("text", "target", "label", "image", "audio", "video"):
            cols[c] = []
        for i, r in enumerate(rows):
            if not isinstance(r, dict):
                raise ValueError(f"row {i}: expected a mapping of {list(INPUT_COLUMNS)}, got "
                                 f"{type(r).__name__}")
            given = {k for k in INPUT_COLUMNS if not _absent(r.get(k))}
            extra = given - known
            if extra:
                raise ValueError(f"row {i}: the model was trained on {sorted(known)} and does "
                                 f"not take {sorted(extra)}")
            if not given:
                raise ValueError(f"row {i}: no input; give at least one of {sorted(known)}")
            video = ({} if _absent(r.get("video")) else
                     _video_input(r.get("video"), i, self.video_spec,
                                  RowLimits.from_config(self.cfg.data)))
            text = _text_input(r.get("text"), i)
            # the video's subtitles and sound track, as prepare stores them, unless given
            text = video.get("subtitles") if text is None and "text" in known else text
            cols["text"].append(text)
            cols["target"].append(None)
            cols["label"].append(r.get("label") if isinstance(r.get("label"), int) else None)
            cols["image"].append(_read_input(r.get("image"), "image", i))
            cols["video"].append(video.get("video"))
            audio = _read_input(r.get("audio"), "audio", i)
            if audio is None and "audio" in known:
                audio = video.get("audio")
            if audio is not None:
                try:  # preprocessing would zero-pad an empty clip into silence
                    check_audio(audio)
                except ValueError as e:
                    raise ValueError(f"row {i}, column 'audio': {e}") from None
            cols["audio"].append(audio)
        batch = preprocess_batch({k: np.array(v, dtype=object) for k, v in cols.items()},
                                 self.spec, self.tokenizer)
        for i in range(len(rows)):  # bytes that do not decode are an error at inference
            if cols["image"][i] is not None and not batch["has_image"][i]:
                try:
                    check_image(cols["image"][i])
                    reason = "cannot decode the image"
                except ValueError as e:
                    reason = str(e)
                raise ValueError(f"row {i}, column 'image': {reason}")
            if cols["audio"][i] is not None and not batch["has_audio"][i]:
                raise ValueError(f"row {i}, column 'audio': cannot decode the audio")
            if cols["video"][i] is not None and not batch["has_video"][i]:
                raise ValueError(f"row {i}, column 'video': cannot read the decoded frames")
        return {k: v.to(self.device) for k, v in as_tensors(batch).items()}

    @torch.no_grad()
    def predict_rows(self, rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
        """One answer per row: ``score`` (itm/contrastive), ``label``+``probability``
        (classify), ``text`` (lm/vqa generation)."""
        if not rows:
            return []
        return self._answers(self.model.predict(self.batch_from_rows(rows)), len(rows))

    @torch.no_grad()
    def predict_shard_rows(self, rows: dict[str, Any]) -> list[dict[str, Any]]:
        """One answer per shard row (columns as `mmdist prepare` writes them: a video is its
        frame strip, its sound track the ``audio``), the rows preprocessed as evaluation does;
        batch inference (``mmdist.serve.batch``) answers a dataset with it."""
        n = len(rows["sample_id"])
        if not n:
            return []
        batch = preprocess_batch({**rows, "target": np.full(n, None, dtype=object)}, self.spec,
                                 self.tokenizer)
        batch = {k: v.to(self.device) for k, v in as_tensors(batch).items()}
        return self._answers(self.model.predict(batch), n)

    def _answers(self, out: dict[str, torch.Tensor], n: int) -> list[dict[str, Any]]:
        answers: list[dict[str, Any]] = [{"task": self.task} for _ in range(n)]
        if "score" in out:
            for a, s in zip(answers, out["score"].float().cpu().tolist()):
                a["score"] = float(s)
        if "text_emb" in out:  # contrastive: cosine similarity of the text and the rest
            sim = torch.nn.functional.cosine_similarity(out["text_emb"].float(),
                                                        out["other_emb"].float(), dim=-1)
            for a, s in zip(answers, sim.cpu().tolist()):
                a["score"] = float(s)
        probs_key = "probs" if "probs" in out else "answer_probs" if "answer_probs" in out else None
        if probs_key:
            probs = out[probs_key].float().cpu()
            p, idx = probs.max(dim=-1)
            for a, pi, ii in zip(answers, p.tolist(), idx.tolist()):
                a["label"], a["probability"] = int(ii), float(pi)
        if "tokens" in out:
            for a, ids in zip(answers, out["tokens"].cpu().tolist()):
                a["text"] = self.tokenizer.decode(ids)
        return answers

    def predict_frame(self, df):
        """pandas DataFrame in (columns text/image/audio/video) -> DataFrame of answers."""
        if not isinstance(df, pd.DataFrame):
            try:
                df = pd.DataFrame(df)
            except (ValueError, TypeError) as e:
                raise ValueError(f"expected a DataFrame (or records) with any of the columns "
                                 f"{list(INPUT_COLUMNS)}; got {type(df).__name__}: {e}") from None
        unknown = set(df.columns) - set(INPUT_COLUMNS)
        if unknown:
            raise ValueError(f"unknown input columns {sorted(unknown)}; "
                             f"use any of {', '.join(INPUT_COLUMNS)}")
        known = [c for c in INPUT_COLUMNS if c in self.cfg.model.modalities]
        if not any(c in df.columns for c in known):
            raise ValueError(f"the input has none of the columns {known} this model takes "
                             f"(columns given: {sorted(map(str, df.columns))})")
        rows = df.to_dict(orient="records")
        answers = []
        for i in range(0, len(rows), 64):
            answers.extend(self.predict_rows(rows[i:i + 64]))
        return pd.DataFrame(answers)

    @torch.no_grad()
    def eval_outputs(self, rows: dict[str, Any]) -> dict[str, torch.Tensor]:
        """Shard-row columns of one canonical batch -> the model's per-sample eval outputs."""
        batch = preprocess_batch(rows, self.spec, self.tokenizer)
        batch = {k: v.to(self.device) for k, v in as_tensors(batch).items()}
        n = len(rows["sample_id"])
        return {k: v.detach().cpu() for k, v in self.model(batch, mode="eval").items()
                if v.ndim >= 1 and v.shape[0] == n}

    def evaluate_dir(self, data_dir: str | Path, split: str = "val",
                     batch_size: int | None = None) -> dict[str, float]:
        """The task's metrics on one split of a shard directory, in this process, over the
        same canonical batches as evaluation during training."""
        outputs = [self.eval_outputs({k: np.array(v, dtype=object)
                                      for k, v in table.to_pydict().items()})
                   for table in canonical_batches(data_dir, split,
                                                  batch_size or self.cfg.train.micro_batch_size)]
        merged = {k: torch.cat([o[k] for o in outputs]) for k in outputs[0]}
        return compute_metrics(self.cfg, merged, self.model.vocab, self.tokenizer)
