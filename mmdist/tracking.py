"""MLflow: where runs go, one run per run name, buffered metrics, the registered model.

Only the driver and rank 0 of a training run talk to MLflow. Without a tracking URI (config or
``MLFLOW_TRACKING_URI``) runs go to a local sqlite store in the project folder
(``./mlflow.db`` with artifacts in ``./mlartifacts``); open it with
``mlflow ui --backend-store-uri sqlite:///mlflow.db --host 127.0.0.1``.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import tempfile
import time
from pathlib import Path
from typing import Any

from mmdist.config import Config

log = logging.getLogger(__name__)

RUN_NAME_TAG = "mmdist.run_name"
LOCAL_DB = "mlflow.db"
LOCAL_ARTIFACTS = "mlartifacts"
# Keys whose values must never reach MLflow params or logs.
SECRET_WORDS = ("password", "token", "secret", "key_id", "access_key")


def tracking_uri(cfg: Config | None = None, root: str | Path | None = None) -> str:
    """The tracking URI: config, then $MLFLOW_TRACKING_URI, then a local sqlite store."""
    if cfg is not None and cfg.tracking.tracking_uri:
        return cfg.tracking.tracking_uri
    if os.environ.get("MLFLOW_TRACKING_URI"):
        return os.environ["MLFLOW_TRACKING_URI"]
    root = Path(root or os.getcwd()).resolve()
    return f"sqlite:///{root / LOCAL_DB}"


def _artifact_location(uri: str, experiment: str) -> str | None:
    """sqlite stores need an explicit artifact folder; servers pick their own."""
    if uri.startswith("sqlite:///"):
        db = Path(uri[len("sqlite:///"):])
        return (db.parent / LOCAL_ARTIFACTS / experiment).as_uri()
    return None


def get_or_create_experiment(uri: str, name: str) -> str:
    from mlflow.tracking import MlflowClient  # heavy: not loaded for --help

    client = MlflowClient(uri)
    exp = client.get_experiment_by_name(name)
    if exp is not None:
        return exp.experiment_id
    return client.create_experiment(name, artifact_location=_artifact_location(uri, name))


def get_or_create_run(uri: str, experiment: str, run_name: str,
                      parent_run_id: str | None = None, tags: dict[str, str] | None = None) -> str:
    """The run id for ``run_name``: the existing run of that name, or a new one.

    A training run started again under the same name (resume after a crash or a killed job)
    continues the same MLflow run instead of opening a second one.
    """
    from mlflow.tracking import MlflowClient  # heavy: not loaded for --help

    client = MlflowClient(uri)
    exp_id = get_or_create_experiment(uri, experiment)
    found = client.search_runs([exp_id], filter_string=f"tags.`{RUN_NAME_TAG}` = '{run_name}'",
                               max_results=1)
    if found:
        run_id = found[0].info.run_id
        if found[0].info.status != "RUNNING":
            client.update_run(run_id, status="RUNNING")
        return run_id
    all_tags = {RUN_NAME_TAG: run_name, **(tags or {})}
    if parent_run_id:
        all_tags["mlflow.parentRunId"] = parent_run_id
    return client.create_run(exp_id, run_name=run_name, tags=all_tags).info.run_id


def safe_params(params: dict[str, Any]) -> dict[str, str]:
    """Stringified params with secrets redacted and MLflow's value limit respected."""
    out = {}
    for k, v in params.items():
        if any(w in k.lower() for w in SECRET_WORDS):
            v = "***"
        s = str(v)
        out[k] = s if len(s) <= 6000 else s[:5997] + "..."
    return out


# run tag: {param: [value at each resume that changed it]} (MLflow params cannot change)
CHANGED_ON_RESUME_TAG = "mmdist.params_changed_on_resume"


def log_params(uri: str, run_id: str, params: dict[str, Any]) -> None:
    """Log params. On a resumed run a value already logged stays (MLflow params never change);
    one the resume changed (``train.num_workers`` of an elastic resume) is appended to the run
    tag :data:`CHANGED_ON_RESUME_TAG`, so the run says what it really ran with."""
    from mlflow.entities import Param  # heavy: not loaded for --help
    from mlflow.tracking import MlflowClient  # heavy: not loaded for --help

    client = MlflowClient(uri)
    run = client.get_run(run_id)
    existing = run.data.params
    safe = safe_params(params)
    new = {k: v for k, v in safe.items() if k not in existing}
    items = [Param(k, v) for k, v in new.items()]
    for i in range(0, len(items), 100):
        client.log_batch(run_id, params=items[i:i + 100])
    try:
        history = json.loads(run.data.tags.get(CHANGED_ON_RESUME_TAG) or "{}")
    except ValueError:
        history = {}
    changed = False
    for k, v in safe.items():  # against the value the run last ran with
        if k in existing and v != (history.get(k) or [existing[k]])[-1]:
            history.setdefault(k, []).append(v)
            changed = True
    if changed:
        text = json.dumps(history, sort_keys=True)
        if len(text) > 8000:  # MLflow's limit for a tag: the latest value of each
            text = json.dumps({k: v[-1:] for k, v in history.items()}, sort_keys=True)
        client.set_tag(run_id, CHANGED_ON_RESUME_TAG, text[:8000])


class MetricsLogger:
    """Buffers metrics and sends them in batches; a tracking server that is down for a while
    loses nothing: failed batches stay buffered and are retried on the next flush.

    With ``fail_fast`` (the training loop's logger) a flush to a tracking server that does not
    answer gives up at once instead of in MLflow's own retry loop (minutes of backoff that would
    stall every training step); what it could not send stays in :meth:`pending` for the driver
    to deliver with :func:`deliver_pending` once the server is back.
    """

    def __init__(self, uri: str, run_id: str, flush_every_s: float = 5.0,
                 fail_fast: bool = False):
        self.uri, self.run_id, self.flush_every_s = uri, run_id, flush_every_s
        self._buffer: list[Any] = []
        self._last_flush = 0.0
        self.failed_flushes = 0
        if fail_fast and uri.startswith(("http://", "https://")):
            # read by MLflow's REST client at request time; this process only logs metrics
            os.environ["MLFLOW_HTTP_REQUEST_MAX_RETRIES"] = "0"
            os.environ["MLFLOW_HTTP_REQUEST_TIMEOUT"] = "10"

    def pending(self) -> list[tuple[str, float, int, int]]:
        """Metric values not yet delivered: ``(key, value, timestamp_ms, step)``."""
        return [(m.key, m.value, m.timestamp, m.step) for m in self._buffer]

    def log(self, metrics: dict[str, float], step: int) -> None:
        ts = int(time.time() * 1000)
        self.add([(k, v, ts, step) for k, v in metrics.items()])
        if time.monotonic() - self._last_flush >= self.flush_every_s:
            self.flush()

    def add(self, rows: list[tuple[str, float, int, int]]) -> None:
        """Buffer ``(key, value, timestamp_ms, step)`` rows (e.g. another logger's
        :meth:`pending`) for the next flush."""
        if not rows:  # a fresh run's restore: MLflow's import waits for the first metric
            return
        from mlflow.entities import Metric  # heavy: not loaded for --help

        self._buffer.extend(Metric(k, float(v), int(ts), int(step)) for k, v, ts, step in rows)

    def flush(self, raise_on_error: bool = False) -> bool:
        from mlflow.tracking import MlflowClient  # heavy: not loaded for --help

        self._last_flush = time.monotonic()
        if not self._buffer:
            return True
        try:
            client = MlflowClient(self.uri)
            while self._buffer:
                chunk = self._buffer[:500]
                client.log_batch(self.run_id, metrics=chunk)
                del self._buffer[:len(chunk)]
            return True
        except Exception as e:  # the server may be restarting: keep the buffer, retry later
            self.failed_flushes += 1
            log.warning("MLflow unreachable (%s); %d metric values buffered",
                        type(e).__name__, len(self._buffer))
            if raise_on_error:
                raise
            return False


def deliver_pending(uri: str, run_id: str, rows: list) -> int:
    """Send metric values a worker could not deliver (``MetricsLogger.pending()``), retrying
    while the tracking server is down. Returns how many were sent."""
    if not rows:
        return 0
    logger = MetricsLogger(uri, run_id)
    logger.add(rows)
    retry(lambda: logger.flush(raise_on_error=True),
          f"delivering {len(rows)} buffered metric values to MLflow")
    return len(rows)


def retry(fn, what: str, attempts: int = 40, wait_s: float = 3.0):
    """Call ``fn`` until it succeeds (MLflow down for a minute or two must not lose a trained
    model or its metrics): ``attempts`` tries ``wait_s`` apart, plus MLflow's own retries."""
    for i in range(attempts):
        try:
            return fn()
        except Exception as e:
            if i == attempts - 1:
                raise RuntimeError(f"{what} failed after {attempts} attempts: {e}") from e
            log.warning("%s failed (%s), retrying in %.0f s", what, e, wait_s)
            time.sleep(wait_s)
    return None


def set_terminated(uri: str, run_id: str, status: str = "FINISHED") -> None:
    from mlflow.tracking import MlflowClient  # heavy: not loaded for --help

    MlflowClient(uri).set_terminated(run_id, status=status)


def model_dir_in(local: Path) -> Path | None:
    """The mmdist model directory inside a downloaded MLflow pyfunc (``artifacts/<name>/``)."""
    found = sorted(Path(local).glob("artifacts/*/model.safetensors"))
    return found[0].parent if found else None


def download_model(uri: str, dst: str | Path, tracking_uri: str) -> Path:
    """Download the mmdist model of ``uri`` (``models:/NAME@ALIAS``, ``models:/NAME/VERSION``,
    ``runs:/RUN_ID/model``) into the directory ``dst``.

    Raises:
        ValueError: the URI does not hold an mmdist model.
        mlflow.exceptions.MlflowException: not found.
    """
    import mlflow  # heavy: not loaded for --help

    with tempfile.TemporaryDirectory() as tmp:
        local = Path(mlflow.artifacts.download_artifacts(artifact_uri=uri, dst_path=tmp,
                                                         tracking_uri=tracking_uri))
        src = model_dir_in(local)
        if src is None:
            raise ValueError(f"{uri}: not an mmdist model (no artifacts/*/model.safetensors)")
        shutil.copytree(src, dst, dirs_exist_ok=True)
    return Path(dst)
