import pytest


@pytest.fixture(scope="session")
def synthetic_data(tmp_path_factory):
    """Synthetic shards shared by the integration tests (320 rows, tiny sizes)."""
    from mmdist.config import load_config
    from mmdist.train.run import ensure_data

    return ensure_data(load_config("tiny", ["data.synthetic_samples=320"]),
                       tmp_path_factory.mktemp("data"))


@pytest.fixture(scope="session")
def trained(ray_local, synthetic_data, tmp_path_factory):
    """One real training run, shared: 2 Ray Train workers, DeepSpeed ZeRO-2 (gloo), MLflow
    sqlite store, the model registered as `zero2-model` with an alias."""
    from mmdist.config import load_config
    from mmdist.train.run import train

    tmp = tmp_path_factory.mktemp("trained")
    uri = f"sqlite:///{tmp / 'mlflow.db'}"
    overrides = [
        f"data.path={synthetic_data}", f"tracking.tracking_uri={uri}",
        f"train.storage_path={tmp / 'runs'}", "train.num_workers=2", "train.zero_stage=2",
        "train.max_steps=40", "train.eval_every=20", "train.checkpoint_every=20",
        "train.lr=0.003", "tracking.model_name=zero2-model"]
    cfg = load_config("tiny", overrides)
    summary = train(cfg)
    return {"summary": summary, "data": synthetic_data, "uri": uri, "tmp": tmp, "cfg": cfg,
            "overrides": overrides}
