import os
from pathlib import Path

import pytest

# Set before any test imports mlflow/ray/deepspeed.
ROOT = Path(__file__).resolve().parents[1]
os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")
os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TORCH_EXTENSIONS_DIR", str(ROOT / ".cache" / "torch_extensions"))


@pytest.fixture(scope="session")
def ray_local():
    """A real local Ray cluster on 127.0.0.1 for the whole session, always shut down.

    With the dashboard: without it, sweep trials stopped by ASHA leak their placement group
    and the next trial waits forever.
    """
    import ray

    from mmdist.ray_env import local_init_kwargs

    ray.init(**local_init_kwargs(num_cpus=2, dashboard=True))  # the local Ray users get
    yield ray
    ray.shutdown()
