"""The HTTP JSON API of `mmdist serve`, without Ray: request bodies -> predictor rows, answers ->
response bodies, and errors that name the field.

``POST /predict`` takes ``{"text": str, "image": base64, "audio": base64, "video": base64}`` (any
subset the model takes) or a list of such objects; a video is decoded by the predictor as
`mmdist prepare` decodes it (an undecodable one answers 422 naming the field). One object answers with what ``mmdist predict --json`` prints
(``ok``, ``task``, ``score`` / ``label`` + ``probability`` / ``text``); a list answers
``{"ok": true, "predictions": [...]}``. Every answer names the model version it came from.
"""

from __future__ import annotations

import base64
import binascii
import json
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from typing import Any

from mmdist.data.rows import RowLimits, check_audio, check_image

MODALITIES = ("text", "image", "audio", "video")


class RequestError(ValueError):
    """A request the server refuses: an HTTP status (4xx) and a message naming the field."""

    def __init__(self, status: int, message: str, field: str, row: int | None = None):
        super().__init__(message)
        self.status, self.field, self.row = status, field, row

    def body(self) -> dict[str, Any]:
        out: dict[str, Any] = {"ok": False, "error": str(self), "field": self.field}
        if self.row is not None:
            out["row"] = self.row
        return out


@dataclass(frozen=True)
class ServeSettings:
    """What every replica needs to know; plain values, so it travels to replicas as a dict.

    Attributes:
        model: models:/NAME@ALIAS, models:/NAME/VERSION or a model directory.
        tracking_uri: MLflow tracking URI (absolute: replicas run in other folders).
        cache: where pulled versions are kept (absolute).
        device: "cpu" or "cuda".
        max_batch_size: rows per model call that ``@serve.batch`` gathers (1: no batching).
        batch_wait_ms: how long a batch waits for more rows.
        poll_s: seconds between alias look-ups (0: only on ``POST /reload``).
        max_request_bytes: the largest request body taken (413 past it).
        max_rows: the most objects in one request.
    """

    model: str
    tracking_uri: str
    cache: str
    device: str = "cpu"
    max_batch_size: int = 16
    batch_wait_ms: float = 5.0
    poll_s: float = 30.0
    max_request_bytes: int = 16 * 2**20
    max_rows: int = 256
    limits: RowLimits = RowLimits()

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> ServeSettings:
        d = dict(d)
        d["limits"] = RowLimits(**d.get("limits", {}))
        return cls(**d)

    def problems(self) -> list[str]:
        """Every value that cannot work, naming its flag."""
        out = []
        for flag, value, least in (("--max-batch-size", self.max_batch_size, 1),
                                   ("--max-request-bytes", self.max_request_bytes, 1),
                                   ("--max-rows", self.max_rows, 1),
                                   ("--batch-wait-ms", self.batch_wait_ms, 0),
                                   ("--poll-s", self.poll_s, 0)):
            if value < least:
                out.append(f"{flag}={value}: must be >= {least}")
        return out


def _where(row: int | None, name: str) -> str:
    return f"row {row}, field {name!r}" if row is not None else f"field {name!r}"


def _media(value: Any, name: str, row: int | None, limits: RowLimits) -> bytes:
    """base64 text -> the file's bytes, checked to decode the way training decodes (a video by
    the predictor, which decodes it once)."""
    if not isinstance(value, str):
        raise RequestError(400, f"{_where(row, name)}: expected base64 text of the {name} "
                                f"file, got {type(value).__name__}", name, row)
    try:
        data = base64.b64decode(value, validate=True)
    except (binascii.Error, ValueError) as e:
        raise RequestError(400, f"{_where(row, name)}: not valid base64 ({e})", name, row) \
            from None
    if not data:
        raise RequestError(422, f"{_where(row, name)}: the {name} is empty (0 bytes)", name, row)
    try:
        if name == "image":
            check_image(data, limits.max_image_pixels)
        elif name == "audio":
            check_audio(data, limits.max_audio_seconds)
    except ValueError as e:
        raise RequestError(422, f"{_where(row, name)}: {e}", name, row) from None
    return data


def parse_item(item: Any, row: int | None, modalities: Sequence[str],
               limits: RowLimits = RowLimits()) -> dict[str, Any]:
    """One request object -> a predictor row (text str, image/audio/video bytes, None when
    absent).

    Raises:
        RequestError: 400 for a malformed value or an unknown field, 422 for a value the model
            cannot take (a modality it was not trained on, an image that does not decode).
    """
    if not isinstance(item, dict):
        raise RequestError(400, f"{'row ' + str(row) if row is not None else 'body'}: expected "
                                f"a JSON object with any of {list(MODALITIES)}, got "
                                f"{type(item).__name__}", "body", row)
    unknown = sorted(set(item) - set(MODALITIES))
    if unknown:
        raise RequestError(400, f"{_where(row, unknown[0])}: unknown field; use any of "
                                f"{list(MODALITIES)}", unknown[0], row)
    given = {k: v for k, v in item.items() if v is not None and v != ""}
    for name in given:
        if name not in modalities:
            raise RequestError(422, f"{_where(row, name)}: this model takes "
                                    f"{sorted(modalities)}, not {name}", name, row)
    if not given:
        raise RequestError(400, f"{'row ' + str(row) if row is not None else 'body'}: no input; "
                                f"give at least one of {sorted(modalities)}",
                           "body", row)
    out: dict[str, Any] = {"text": None, "image": None, "audio": None, "video": None}
    if "text" in given:
        text = given["text"]
        if not isinstance(text, str):
            raise RequestError(400, f"{_where(row, 'text')}: expected a string, got "
                                    f"{type(text).__name__}", "text", row)
        if len(text) > limits.max_text_chars:
            raise RequestError(413, f"{_where(row, 'text')}: {len(text):,} characters, over "
                                    f"the limit of {limits.max_text_chars:,}", "text", row)
        out["text"] = text
    for name in ("image", "audio", "video"):
        if name in given:
            out[name] = _media(given[name], name, row, limits)
    return out


def check_body_size(length: int, settings: ServeSettings) -> None:
    """Refuse a body (or its Content-Length) over ``--max-request-bytes``: 413 naming it."""
    if length > settings.max_request_bytes:
        raise RequestError(413, f"body: {length:,} bytes, over the limit of "
                                f"{settings.max_request_bytes:,} (--max-request-bytes)", "body")


def parse_predict_body(raw: bytes, modalities: Sequence[str],
                       settings: ServeSettings) -> tuple[list[dict[str, Any]], bool]:
    """A ``POST /predict`` body -> (predictor rows, whether it was one object, not a list).

    Raises:
        RequestError: naming the field (and the row, in a list) of the first problem.
    """
    check_body_size(len(raw), settings)
    try:
        body = json.loads(raw)
    except (ValueError, UnicodeDecodeError) as e:
        raise RequestError(400, f"body: not JSON ({e})", "body") from None
    if isinstance(body, dict):
        return [parse_item(body, None, modalities, settings.limits)], True
    if not isinstance(body, list) or not body:
        raise RequestError(400, "body: expected a JSON object {\"text\", \"image\", \"audio\"} "
                                "or a non-empty list of them", "body")
    if len(body) > settings.max_rows:
        raise RequestError(413, f"body: {len(body)} objects, over the limit of "
                                f"{settings.max_rows} (--max-rows)", "body")
    return [parse_item(item, i, modalities, settings.limits) for i, item in enumerate(body)], False


def answer_body(answers: list[dict[str, Any]], single: bool,
                model: dict[str, Any]) -> dict[str, Any]:
    """The response to a good request: the answer(s) and the model version that made them."""
    if single:
        return {"ok": True, **answers[0], **model}
    return {"ok": True, "predictions": answers, **model}
