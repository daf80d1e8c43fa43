"""mmdist's process-group backend (mmdist.train.backend): what Ray Train's controller unpickles
and what a worker imports before it asks for its shard load no torch; the worker half connects a
real gloo group from the environment the controller half sets; another Ray falls back to Ray's
TorchTrainer (the real runs: tests/integration/test_train.py)."""

import os
import pickle
import socket
import subprocess
import sys
import textwrap
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def _run(code: str, env: dict | None = None) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-c", textwrap.dedent(code)], cwd=ROOT,
                          capture_output=True, text=True, timeout=300,
                          env={**os.environ, **(env or {})})


def test_the_controller_and_the_entry_point_load_no_torch(tmp_path):
    """Ray Train's controller unpickles the backend config and builds its backend; a worker
    unpickles the entry point and imports the data pipeline before its shard streams. None of
    it may import torch (1.5 CPU-s of the controller's start, and the worker's shard request
    would wait for it)."""
    from mmdist.train.backend import ProcessGroupConfig

    blob = tmp_path / "config.pkl"
    blob.write_bytes(pickle.dumps(ProcessGroupConfig(backend="gloo")))
    r = _run(f'''
        import pickle, sys
        config = pickle.loads(open({str(blob)!r}, "rb").read())
        backend = config.backend_cls()
        with config.train_func_context():
            pass
        assert config.framework is not None and config.to_dict()["backend"] == "gloo"
        assert backend.share_cuda_visible_devices
        import mmdist.train.entry, mmdist.data.pipeline, mmdist.data.torch_batches
        print("LOADED", sorted(m for m in ("torch", "deepspeed") if m in sys.modules))
    ''')
    assert r.returncode == 0, r.stderr[-3000:]
    assert "LOADED []" in r.stdout, r.stdout


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_a_worker_connects_its_group_from_the_environment_once():
    """With the environment the controller half sets, a real 1-rank gloo group; a second call
    (Ray's TorchTrainer made the group) leaves it alone; without that environment, no group."""
    env = {"MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(_free_port()), "RANK": "0",
           "WORLD_SIZE": "1", "MMDIST_DIST_BACKEND": "gloo", "MMDIST_DIST_TIMEOUT_S": "60"}
    r = _run('''
        import os, torch, torch.distributed as dist
        from mmdist.train.backend import _destroy_process_group, init_process_group
        init_process_group()
        assert dist.is_initialized() and dist.get_backend() == "gloo"
        assert dist.get_world_size() == 1 and dist.get_rank() == 0
        init_process_group()  # a group already there: left alone
        x = torch.ones(2)
        dist.all_reduce(x)
        _destroy_process_group()
        assert not dist.is_initialized()
        os.environ.pop("MMDIST_DIST_BACKEND")
        init_process_group()
        print("OK", x.tolist(), dist.is_initialized())
    ''', env)
    assert r.returncode == 0, r.stderr[-3000:]
    assert "OK [1.0, 1.0] False" in r.stdout


def test_the_supported_ray_gets_the_light_backend_and_another_ray_torch_trainer(monkeypatch,
                                                                                caplog):
    import ray
    from ray.train.v2.api.data_parallel_trainer import DataParallelTrainer

    from mmdist.train import backend

    trainer, kwargs = backend.trainer_and_backend(use_gpu=True)
    assert backend.light_backend_reason() is None
    assert issubclass(trainer, DataParallelTrainer)
    assert kwargs["backend_config"].backend == "nccl"
    assert backend.trainer_and_backend(use_gpu=False)[1]["backend_config"].backend == "gloo"

    monkeypatch.setattr(ray, "__version__", "9.1.0")
    monkeypatch.setattr(backend, "_FALLBACK_SAID", False)
    assert "Ray 9.1.0" in backend.light_backend_reason()
    with caplog.at_level("WARNING", logger="mmdist.train.backend"):
        trainer, kwargs = backend.trainer_and_backend(use_gpu=False)
        backend.trainer_and_backend(use_gpu=False)
    assert trainer.__name__ == "TorchTrainer" and kwargs == {}
    said = [r.getMessage() for r in caplog.records if "TorchTrainer" in r.getMessage()]
    assert len(said) == 1 and "Ray 9.1.0" in said[0], said


def test_ray_train_v1_gets_torch_trainer(monkeypatch):
    from mmdist.train import backend

    monkeypatch.setenv("RAY_TRAIN_V2_ENABLED", "0")
    assert "RAY_TRAIN_V2_ENABLED=0" in backend.light_backend_reason()


def test_the_trainer_leaves_out_ray_trains_dataset_callback_and_maybe_the_cleaner(tmp_path):
    """mmdist hands the workers their data itself (no dataset-manager actor from Ray Train's
    dataset callback); `mmdist train` (its job ends with the run) has no placement-group
    cleaner either; every other caller (sweep trials, in-process callers) keeps the cleaner and
    the rest of Ray Train's default callbacks."""
    from ray.train import RunConfig, ScalingConfig
    from ray.train.v2._internal.callbacks.datasets import DatasetsCallback
    from ray.train.v2._internal.callbacks.placement_group_callback import (
        PlacementGroupCleanerCallback,
    )
    from ray.train.v2.api.data_parallel_trainer import DataParallelTrainer

    from mmdist.train import backend

    def callbacks(cls, kwargs) -> list[type]:
        trainer = cls(lambda: None, **kwargs, scaling_config=ScalingConfig(num_workers=1),
                      run_config=RunConfig(name="cb", storage_path=str(tmp_path)))
        return [type(c) for c in trainer._create_default_callbacks()]

    ray_own = callbacks(DataParallelTrainer, {})
    with_cleaner = callbacks(*backend.trainer_and_backend(use_gpu=False))
    without = callbacks(*backend.trainer_and_backend(use_gpu=False, placement_group_cleaner=False))
    assert DatasetsCallback in ray_own and PlacementGroupCleanerCallback in ray_own
    assert with_cleaner == [c for c in ray_own if c is not DatasetsCallback]
    assert without == [c for c in with_cleaner if c is not PlacementGroupCleanerCallback]
