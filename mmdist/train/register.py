"""Log a consolidated model directory to MLflow as a pyfunc (model from code, no pickle),
register it under ``tracking.model_name`` and give it an alias.

Alias policy: ``champion`` when the new version beats the current champion on the task's primary
val metric (or there is none yet), otherwise ``challenger``.

Exactly once: a checkpoint (its storage path, with the run id) gets one logged model and one
model version however often registration is retried or the job resubmitted. Each step first
looks for what an earlier attempt may have stored (a timed-out request can have reached the
server): the run's logged model and the version tagged with the checkpoint.

No alias on missing facts: only "no champion alias" means there is no champion. Any other error
of the lookup (MLflow down, no permission) is retried and then leaves the version registered
without an alias, saying how to set it (``mmdist promote``).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from mmdist.config import Config
from mmdist.data.shards import example_texts
from mmdist.tracking import retry
from mmdist.train.model_env import pyfunc_code_paths, pyfunc_requirements

PYFUNC_CODE = Path(__file__).resolve().parents[1] / "serve" / "pyfunc_model.py"
METRIC_TAG = "mmdist.primary_metric"
VALUE_TAG = "mmdist.primary_metric_value"
CHECKPOINT_TAG = "mmdist.checkpoint"  # what a logged model / version was made from


class AliasUnknown(RuntimeError):
    """The champion could not be looked up: the version stays registered without an alias."""


def model_signature():
    from mlflow.models import ModelSignature  # heavy: not loaded for --help
    from mlflow.types import ColSpec, Schema  # heavy: not loaded for --help

    inputs = Schema([ColSpec("string", "text", required=False),
                     ColSpec("string", "image", required=False),
                     ColSpec("string", "audio", required=False),
                     ColSpec("string", "video", required=False)])
    return ModelSignature(inputs=inputs)


def _beats(new: float, old: float, mode: str) -> bool:
    return new > old if mode == "max" else new < old


def register_model(uri: str, run_id: str, model_dir: Path, cfg: Config,
                   metrics: dict[str, float], checkpoint: str | None = None,
                   data_dir: str | Path | None = None,
                   attempts: int = 40, wait_s: float = 3.0) -> dict[str, Any]:
    """Log ``model_dir`` to ``run_id``, register it, alias it; retries while MLflow is down.

    Args:
        checkpoint: what identifies the checkpoint the model comes from (its storage path);
            defaults to ``model_dir``. A second call with the same run and checkpoint returns
            the version the first one made.
        data_dir: the shards it trained on: the input example takes texts of theirs.
        attempts, wait_s: retries of each MLflow step.

    Returns:
        ``model_uri``, ``version``, ``alias`` (None when the champion lookup kept failing) and,
        then, ``alias_error``.
    """
    import mlflow  # heavy: not loaded for --help
    import pandas as pd  # heavy: not loaded for --help
    from mlflow.tracking import MlflowClient  # heavy: not loaded for --help

    if not (model_dir / "model.safetensors").exists():
        raise FileNotFoundError(f"{model_dir}: no consolidated model.safetensors to register")
    name = cfg.tracking.model_name
    metric, mode = cfg.primary_metric, cfg.metric_mode
    value = metrics.get(metric)
    identity = str(checkpoint or model_dir)
    mlflow.set_tracking_uri(uri)
    client = MlflowClient(uri)
    # the input example: texts of the training data (images and audio are file paths in
    # this signature, which would not exist where the model is served)
    texts = example_texts(data_dir) if data_dir and "text" in cfg.model.modalities else []
    example = pd.DataFrame({"text": texts}) if texts else None

    def log() -> str:
        found = logged_model_of(client, run_id, identity)
        if found:
            return found
        with mlflow.start_run(run_id=run_id):
            info = mlflow.pyfunc.log_model(
                name="model", python_model=str(PYFUNC_CODE),
                artifacts={"model_dir": str(model_dir)},
                signature=model_signature(), input_example=example,
                pip_requirements=pyfunc_requirements(), code_paths=pyfunc_code_paths(),
                tags={CHECKPOINT_TAG: identity})
        return info.model_uri

    def register(model_uri: str) -> str:
        found = version_of(client, name, run_id, identity)
        if found:
            return found
        return str(mlflow.register_model(model_uri, name,
                                         tags={CHECKPOINT_TAG: identity}).version)

    model_uri = retry(log, "logging the model to MLflow", attempts, wait_s)
    version = retry(lambda: register(model_uri), "registering the model", attempts, wait_s)
    out = {"model_uri": f"models:/{name}/{version}", "version": version, "alias": None}
    try:
        champ = retry(lambda: champion(client, name), "looking up the champion", attempts,
                      wait_s)
    except RuntimeError as e:
        out["alias_error"] = (
            f"{name} version {version} is registered without an alias: {e}. Set it when "
            f"MLflow answers: mmdist promote models:/{name}/{version} --alias champion "
            "(or --alias challenger)")
        print(f"[mmdist] {out['alias_error']}", flush=True)
        return out
    alias = "champion"
    old = champ.tags.get(VALUE_TAG) if champ is not None else None
    if old is not None and value is not None and not _beats(value, float(old), mode):
        alias = "challenger"

    def tag_and_alias() -> None:
        client.set_model_version_tag(name, version, METRIC_TAG, metric)
        if value is not None:
            client.set_model_version_tag(name, version, VALUE_TAG, str(value))
        client.set_registered_model_alias(name, alias, version)

    retry(tag_and_alias, "setting the model alias", attempts, wait_s)
    out["alias"] = alias
    return out


def champion(client: Any, name: str) -> Any:
    """The ``champion`` version of ``name``, or None when the model or the alias does not exist.

    Raises:
        MlflowException: any other error (server down, no permission): not knowing the champion
            is not the same as having none.
    """
    from mlflow.exceptions import MlflowException  # heavy: not loaded for --help

    try:
        return client.get_model_version_by_alias(name, "champion")
    except MlflowException as e:
        if e.error_code == "RESOURCE_DOES_NOT_EXIST" or (
                e.error_code == "INVALID_PARAMETER_VALUE" and "alias" in str(e)
                and "not found" in str(e)):
            return None
        raise


def logged_model_of(client: Any, run_id: str, identity: str) -> str | None:
    """URI of the model already logged to ``run_id`` from checkpoint ``identity``, if any."""
    run = client.get_run(run_id)
    for m in client.search_logged_models(
            experiment_ids=[run.info.experiment_id],
            filter_string=f"source_run_id = '{run_id}'"):
        if m.tags.get(CHECKPOINT_TAG) == identity and str(m.status).endswith("READY"):
            return m.model_uri
    return None


def version_of(client: Any, name: str, run_id: str, identity: str) -> str | None:
    """The version of ``name`` already registered from ``run_id``'s checkpoint ``identity``."""
    from mlflow.exceptions import MlflowException  # heavy: not loaded for --help

    try:
        versions = client.search_model_versions(f"name = '{name}' and run_id = '{run_id}'")
    except MlflowException as e:
        if e.error_code == "RESOURCE_DOES_NOT_EXIST":
            return None
        raise
    mine = [v for v in versions if v.tags.get(CHECKPOINT_TAG) == identity]
    return str(min(int(v.version) for v in mine)) if mine else None


def promote(uri: str, model_uri: str, alias: str) -> dict[str, Any]:
    """Point ``alias`` of a registered model at ``models:/NAME/VERSION``."""
    from mlflow.tracking import MlflowClient  # heavy: not loaded for --help

    parts = model_uri.removeprefix("models:/").split("/")
    if not model_uri.startswith("models:/") or len(parts) != 2 or not parts[1].isdigit():
        raise ValueError(f"{model_uri!r}: expected models:/NAME/VERSION")
    name, version = parts
    MlflowClient(uri).set_registered_model_alias(name, alias, version)
    return {"model_uri": model_uri, "alias": alias, "alias_uri": f"models:/{name}@{alias}"}
