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

FUSION_REAL = "test_fusion_real.py::test_every_method_and_stage_learns_matching_and_the_relation"


@pytest.hookimpl(trylast=True)  # after -k / -m deselected what they deselect
def pytest_collection_modifyitems(session, config, items):
    """The real-data fusion bench (tests/integration/test_fusion_real.py: ~400 CPU-s, needs
    nothing from the other tests) starts now in the background at idle CPU priority, and
    its test, which waits for it, runs last. Alone it runs in the foreground."""
    bench = [i for i in items if FUSION_REAL in i.nodeid]
    if not bench or len(items) == len(bench) or config.option.collectonly:
        return
    items[:] = [i for i in items if i not in bench] + bench
    bench[0].module.start_bench()


def pytest_sessionfinish(session, exitstatus):
    for item in getattr(session, "items", []):
        if FUSION_REAL in item.nodeid:
            item.module.stop_bench()
            return


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


@pytest.fixture(scope="session")
def pretrained_dirs(tmp_path_factory):
    """@llama / @siglip / @whisper / @clip / @wav2vec2 / @bert -> directories of tiny random pretrained models saved with
    save_pretrained (tests/tiny_hf.py), built once per session."""
    import torch

    from tests.tiny_hf import MODELS, tiny_lm
    from tests.unit.synthetic_mm import VOCAB

    root = tmp_path_factory.mktemp("pretrained")
    torch.manual_seed(0)
    dirs = {"@llama": tiny_lm(root / "llama", "llama", min_vocab=VOCAB)}
    for name in ("siglip", "whisper", "clip", "wav2vec2", "bert"):
        MODELS[name][0](root / name)
        dirs[f"@{name}"] = root / name
    return dirs


def pretrained_overrides(name: str, dirs: dict) -> list[str]:
    """For a preset of pretrained parts: its keys pointed at the tiny models of ``dirs`` (what a
    user does with their own directories), and no init_from (no stage 1 here)."""
    from mmdist.config import load_config

    m = load_config(name).model
    given = {"decoder_pretrained": "@llama", "image_pretrained": "@siglip",
             "audio_pretrained": "@whisper"}
    out = [f"model.{k}={dirs[v]}" for k, v in given.items() if getattr(m, k)]
    return [*out, "model.init_from=null"] if out else []
