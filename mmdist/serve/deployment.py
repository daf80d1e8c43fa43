"""The Ray Serve deployment of a registered model: batched predictions over HTTP, following an
alias.

Each replica holds one :class:`~mmdist.serve.predictor.Predictor` (the one inference path of
mmdist) and answers ``POST /predict``, ``GET /health`` and ``POST /reload`` (FastAPI ingress).
Requests are gathered into model calls by ``@serve.batch``. When the model is
``models:/NAME@ALIAS``, a replica looks the alias up every ``poll_s`` seconds and on
``POST /reload``; when it has moved, the new version is loaded beside the old one, which keeps
answering until the switch, so no request is dropped or answered by a half-loaded model.

``build_app`` is also an application builder for ``serve run`` and KubeRay's RayService:
``import_path: mmdist.serve.deployment:build_app`` with ``args: {model: models:/NAME@ALIAS}``.
"""

# No `from __future__ import annotations`: FastAPI reads the endpoints' annotations (Request)
# at run time, and Serve's ingress wrapper cannot resolve them from strings.
import asyncio
import logging
import os
import re
import shutil
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse
from ray import serve
from ray.serve import Application

from mmdist.serve.http_api import (
    RequestError,
    ServeSettings,
    answer_body,
    check_body_size,
    parse_predict_body,
)
from mmdist.serve.predictor import Predictor
from mmdist.serve.pull import pull

log = logging.getLogger("ray.serve")

api = FastAPI(title="mmdist", description="Predictions of a registered mmdist model: "
                                          "POST /predict, GET /health, POST /reload.")


def resolve(model: str, tracking_uri: str) -> dict[str, Any]:
    """Which version ``model`` names now: ``model_uri`` (models:/NAME/VERSION, or the model as
    given for a directory or runs:/ URI) and ``model_version`` (None for those)."""
    m = re.fullmatch(r"models:/([^/@]+)@(.+)", model)
    if m:
        from mlflow.tracking import MlflowClient  # only for registry URIs

        version = str(MlflowClient(tracking_uri).get_model_version_by_alias(*m.groups()).version)
        return {"model_uri": f"models:/{m.group(1)}/{version}", "model_version": version}
    m = re.fullmatch(r"models:/([^/@]+)/(\d+)", model)
    return {"model_uri": model, "model_version": m.group(2) if m else None}


def fetch(model_uri: str, tracking_uri: str, cache: str) -> Path:
    """A local directory of ``model_uri``. A registered version never changes, so it is pulled
    once into ``cache/NAME/VERSION`` and shared by every replica on the machine."""
    if not model_uri.startswith(("models:/", "runs:/")):
        return Path(model_uri)
    final = Path(cache, *re.sub(r"[^A-Za-z0-9._/-]", "_", model_uri.split(":/", 1)[1])
                 .strip("/").split("/"))
    if (final / "model.safetensors").exists():
        return final
    final.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=".pull-", dir=final.parent))
    pull(model_uri, tmp, tracking_uri)
    try:
        os.rename(tmp, final)  # atomic: another replica may have won the race
    except OSError:
        shutil.rmtree(tmp, ignore_errors=True)
    return final


class Loaded:
    """One model version, loaded: the predictor and what every response says about it."""

    def __init__(self, predictor: Predictor, info: dict[str, Any]):
        self.predictor, self.info = predictor, info
        self.modalities = tuple(predictor.cfg.model.modalities)


def _field_of(message: str) -> str:
    m = re.search(r"column '(\w+)'", message)
    return m.group(1) if m else "body"


def _error(e: RequestError) -> JSONResponse:
    return JSONResponse(e.body(), status_code=e.status)


@serve.deployment(name="mmdist", max_ongoing_requests=64, health_check_period_s=10)
@serve.ingress(api)
class ModelServer:
    """A replica: the loaded model, the alias it follows, the batch queue."""

    def __init__(self, settings: dict[str, Any]):
        self.settings = ServeSettings.from_dict(settings)
        self._reload_lock = threading.Lock()
        self.loaded = self._load(resolve(self.settings.model, self.settings.tracking_uri))
        self._predict_batch.set_max_batch_size(self.settings.max_batch_size)
        self._predict_batch.set_batch_wait_timeout_s(self.settings.batch_wait_ms / 1000)
        self._stop = threading.Event()
        if self.settings.poll_s > 0 and "@" in self.settings.model:
            threading.Thread(target=self._poll, name="mmdist-alias-poll", daemon=True).start()

    def _load(self, info: dict[str, Any]) -> Loaded:
        s = self.settings
        t = time.perf_counter()
        directory = fetch(info["model_uri"], s.tracking_uri, s.cache)
        predictor = Predictor.from_dir(directory, device=s.device)
        info = {**info, "model_source": s.model, "task": predictor.task}
        log.info("mmdist: loaded %s in %.1f s", info["model_uri"], time.perf_counter() - t)
        return Loaded(predictor, info)

    def refresh(self) -> dict[str, Any]:
        """Look the alias up; load and switch to the version it names if it moved. Requests
        keep being answered by the old version until the new one is loaded."""
        with self._reload_lock:
            before = self.loaded.info["model_version"]
            now = resolve(self.settings.model, self.settings.tracking_uri)
            if now["model_uri"] != self.loaded.info["model_uri"]:
                self.loaded = self._load(now)  # one assignment: a batch sees one version
            return {"ok": True, "previous_version": before, "changed":
                    self.loaded.info["model_version"] != before, **self.loaded.info}

    def _poll(self) -> None:
        while not self._stop.wait(self.settings.poll_s):
            try:
                self.refresh()
            except Exception as e:  # MLflow down: keep serving the version we have
                log.warning("mmdist: alias look-up of %s failed, still serving %s: %s",
                            self.settings.model, self.loaded.info["model_uri"], e)

    @staticmethod
    def _answer(loaded: Loaded, rows: list[dict[str, Any]]) -> list[dict[str, Any]] | RequestError:
        try:
            return loaded.predictor.predict_rows(rows)
        except (ValueError, TypeError) as e:
            msg = str(e)
            return RequestError(422, msg.replace("column", "field"), _field_of(msg))

    @serve.batch(max_batch_size=16, batch_wait_timeout_s=0.005,
                 batch_size_fn=lambda items: sum(len(rows) for rows in items))
    async def _predict_batch(self, items: list[list[dict[str, Any]]]) -> list[Any]:
        """One model call for the rows of several requests; one version for all of them."""
        loaded = self.loaded
        flat = [row for rows in items for row in rows]
        answers = await asyncio.to_thread(self._answer, loaded, flat)
        if isinstance(answers, RequestError):  # one bad request must not fail the others
            return [(await asyncio.to_thread(self._answer, loaded, rows), loaded)
                    for rows in items]
        out, i = [], 0
        for rows in items:
            out.append((answers[i:i + len(rows)], loaded))
            i += len(rows)
        return out

    async def _read_body(self, request: Request) -> bytes:
        """The body, refused (413) as soon as it is over the limit: by its Content-Length, or
        while it streams in when it has none."""
        check_body_size(int(request.headers.get("content-length") or 0), self.settings)
        chunks, size = [], 0
        async for chunk in request.stream():
            size += len(chunk)
            check_body_size(size, self.settings)
            chunks.append(chunk)
        return b"".join(chunks)

    @api.post("/predict")
    async def predict(self, request: Request) -> JSONResponse:
        """``{"text", "image", "audio", "video"}`` or a list of them -> the answer(s) + model
        version."""
        try:
            raw = await self._read_body(request)
            loaded = self.loaded
            rows, single = parse_predict_body(raw, loaded.modalities, self.settings)
            if len(rows) >= self.settings.max_batch_size:  # already a batch: no queue
                answers = await asyncio.to_thread(self._answer, loaded, rows)
            else:
                answers, loaded = await self._predict_batch(rows)
            if isinstance(answers, RequestError):
                raise answers
        except RequestError as e:
            return _error(e)
        return JSONResponse(answer_body(answers, single, loaded.info))

    @api.get("/health")
    async def health(self) -> JSONResponse:
        """The model version served, the modalities it takes and the batching in force."""
        s = self.settings
        return JSONResponse({"ok": True, **self.loaded.info,
                             "modalities": list(self.loaded.modalities),
                             "max_batch_size": s.max_batch_size, "poll_s": s.poll_s})

    @api.post("/reload")
    async def reload(self) -> JSONResponse:
        """Follow the alias now (this replica; the others at their next poll)."""
        try:
            out = await asyncio.to_thread(self.refresh)
        except Exception as e:
            return JSONResponse({"ok": False, "error": f"reload of {self.settings.model} "
                                 f"failed, still serving {self.loaded.info['model_uri']}: {e}",
                                 **self.loaded.info}, status_code=503)
        return JSONResponse({**out, "poll_s": self.settings.poll_s})


def deployment_options(replicas: int = 1, max_replicas: int | None = None,
                       target_ongoing_requests: float | None = None, cpus: float = 1.0,
                       gpus: float = 0.0, max_batch_size: int = 16) -> dict[str, Any]:
    """``Deployment.options`` for a fixed number of replicas, or autoscaling between
    ``replicas`` and ``max_replicas`` on ongoing requests per replica."""
    out: dict[str, Any] = {"ray_actor_options": {"num_cpus": cpus, "num_gpus": gpus},
                           "max_ongoing_requests": max(64, 4 * max_batch_size)}
    if max_replicas and max_replicas > replicas:
        out["autoscaling_config"] = {
            "min_replicas": replicas, "max_replicas": max_replicas,
            "target_ongoing_requests": target_ongoing_requests or max_batch_size}
    else:
        out["num_replicas"] = replicas
    return out


def build_app(args: dict[str, Any]) -> Application:
    """The Serve application: ``args`` are :class:`ServeSettings` fields (``model`` required;
    ``tracking_uri`` defaults to $MLFLOW_TRACKING_URI, ``cache`` to ./.cache/models) plus
    the keyword arguments of :func:`deployment_options`."""
    args = dict(args)
    option_keys = ("replicas", "max_replicas", "target_ongoing_requests", "cpus", "gpus")
    unknown = set(args) - set(option_keys) - set(ServeSettings.__dataclass_fields__)
    if unknown:
        raise ValueError(f"build_app: unknown args {sorted(unknown)}; known: "
                         f"{sorted([*option_keys, *ServeSettings.__dataclass_fields__])}")
    options = {k: args.pop(k) for k in option_keys if k in args}
    if "model" not in args:
        raise ValueError("build_app: args.model is required (models:/NAME@ALIAS, "
                         "models:/NAME/VERSION or a model directory)")
    args.setdefault("tracking_uri", os.environ.get("MLFLOW_TRACKING_URI", ""))
    args.setdefault("cache", str(Path(".cache/models").resolve()))
    if options.get("gpus"):
        args.setdefault("device", "cuda")
    settings = ServeSettings.from_dict(args)
    problems = settings.problems()
    if problems:
        raise ValueError("; ".join(problems))
    return ModelServer.options(**deployment_options(
        max_batch_size=settings.max_batch_size, **options)).bind(settings.to_dict())
