"""Log a consolidated model directory to MLflow as a pyfunc (model from code, no pickle),
register it under ``tracking.model_name`` and give it an alias.

Alias policy: ``champion`` when the new version beats the current champion on the task's primary
val metric (or there is none yet), otherwise ``challenger``.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from mmdist.config import Config
from mmdist.tracking import retry

PYFUNC_CODE = Path(__file__).resolve().parents[1] / "serve" / "pyfunc_model.py"
METRIC_TAG = "mmdist.primary_metric"
VALUE_TAG = "mmdist.primary_metric_value"


def model_signature():
    from mlflow.models import ModelSignature  # heavy: not loaded for --help
    from mlflow.types import ColSpec, Schema  # heavy: not loaded for --help

    inputs = Schema([ColSpec("string", "text", required=False),
                     ColSpec("string", "image", required=False),
                     ColSpec("string", "audio", required=False)])
    return ModelSignature(inputs=inputs)


def _beats(new: float, old: float, mode: str) -> bool:
    return new > old if mode == "max" else new < old


def register_model(uri: str, run_id: str, model_dir: Path, cfg: Config,
                   metrics: dict[str, float]) -> dict[str, Any]:
    """Log ``model_dir`` to ``run_id``, register it, alias it. Retries while MLflow is down."""
    import mlflow  # heavy: not loaded for --help
    import pandas as pd  # heavy: not loaded for --help
    from mlflow.tracking import MlflowClient  # heavy: not loaded for --help

    if not (model_dir / "model.safetensors").exists():
        raise FileNotFoundError(f"{model_dir}: no consolidated model.safetensors to register")
    name = cfg.tracking.model_name
    metric, mode = cfg.primary_metric, cfg.metric_mode
    value = metrics.get(metric)
    mlflow.set_tracking_uri(uri)
    example = pd.DataFrame({"text": ["a red circle with a low tone"]})

    def log() -> Any:
        with mlflow.start_run(run_id=run_id):
            return mlflow.pyfunc.log_model(
                name="model", python_model=str(PYFUNC_CODE),
                artifacts={"model_dir": str(model_dir)},
                signature=model_signature(), input_example=example,
                pip_requirements=["torch", "torchvision", "transformers", "tokenizers",
                                  "safetensors", "pillow", "soundfile", "pandas", "mlflow"],
                registered_model_name=name)

    info = retry(log, "logging the model to MLflow")
    version = str(info.registered_model_version)
    client = MlflowClient(uri)
    alias = "champion"
    try:
        champ = client.get_model_version_by_alias(name, "champion")
        old = champ.tags.get(VALUE_TAG)
        if old is not None and value is not None and not _beats(value, float(old), mode):
            alias = "challenger"
    except Exception:  # no champion yet
        pass

    def tag_and_alias() -> None:
        client.set_model_version_tag(name, version, METRIC_TAG, metric)
        if value is not None:
            client.set_model_version_tag(name, version, VALUE_TAG, str(value))
        client.set_registered_model_alias(name, alias, version)

    retry(tag_and_alias, "setting the model alias")
    return {"model_uri": f"models:/{name}/{version}", "alias": alias, "version": version}
