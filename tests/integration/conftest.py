import os

import pytest


@pytest.fixture(scope="session")
def ray_local():
    """A real local Ray cluster on 127.0.0.1 for the whole session, always shut down."""
    import ray

    ray.init(num_cpus=2, include_dashboard=False, _node_ip_address="127.0.0.1",
             runtime_env={"env_vars": {"TORCH_EXTENSIONS_DIR": os.environ["TORCH_EXTENSIONS_DIR"],
                                       "MLFLOW_DISABLE_TELEMETRY": "true",
                                       "TOKENIZERS_PARALLELISM": "false"}})
    yield ray
    ray.shutdown()
