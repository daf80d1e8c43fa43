"""`mmdist preflight` against a real (small) Ray: each check passes or fails with a clear line."""

import argparse
import json

import pytest

from mmdist.cli import CommandError
from mmdist.config import load_config
from mmdist.preflight import check_data, check_deepspeed, check_mlflow, preflight, run


@pytest.fixture(scope="module")
def ray_two_cpus(ray_local):
    """The session's 2-CPU Ray (tests/conftest.py)."""
    return ray_local


def _args(tmp_path, *overrides, json_flag=False):
    return argparse.Namespace(
        config="tiny", address=None, sweep=False, timeout=60.0, json=json_flag,
        overrides=[f"train.storage_path={tmp_path / 'runs'}",
                   f"tracking.tracking_uri=sqlite:///{tmp_path / 'mlflow.db'}", *overrides])


def test_more_workers_than_the_cluster_has_fails_naming_the_resources(ray_two_cpus, tmp_path,
                                                                       capsys):
    with pytest.raises(CommandError) as e:
        run(_args(tmp_path, "train.num_workers=8", "train.cpus_per_worker=1"))
    msg = str(e.value)
    assert "1 problem(s)" in msg
    assert "resources: needs 8.5 CPUs, the cluster (1 node(s)) has 2 CPUs" in msg
    assert "train.num_workers=8 x train.cpus_per_worker=1" in msg
    out = capsys.readouterr().out
    assert "FAIL  resources" in out
    for name in ("storage", "mlflow", "data", "deepspeed"):  # the others still ran, and passed
        assert f"OK    {name}" in out


def test_gpus_asked_for_on_a_cpu_cluster_fail(ray_two_cpus, tmp_path):
    cfg = load_config("tiny", ["train.use_gpu=true", f"train.storage_path={tmp_path}"])
    (res,) = [c for c in preflight(cfg) if c.name == "resources"]
    assert not res.ok
    assert "needs 1 GPUs" in res.detail and "no node has a GPU" in res.detail


def test_a_config_that_fits_passes_and_the_worker_wrote_the_storage(ray_two_cpus, tmp_path,
                                                                    capsys):
    summary = run(_args(tmp_path, json_flag=True))
    assert summary["ok"] is True
    checks = {c["name"]: c for c in summary["checks"]}
    assert set(checks) == {"resources", "storage", "mlflow", "data", "deepspeed"}
    assert "from a Ray worker" in checks["storage"]["detail"]
    assert (tmp_path / "runs").is_dir() and not list((tmp_path / "runs").iterdir())
    assert "synthetic" in checks["data"]["detail"]


def test_json_keeps_every_check_when_it_fails(ray_two_cpus, tmp_path):
    summary = run(_args(tmp_path, "train.num_workers=8", f"data.path={tmp_path / 'nope'}",
                        json_flag=True))
    assert summary["ok"] is False
    failed = sorted(c["name"] for c in summary["checks"] if not c["ok"])
    assert failed == ["data", "resources"]
    assert "manifest.json not found" in summary["error"]
    json.dumps(summary)


def test_manifest_is_read_and_bad_json_is_named(tmp_path):
    good = tmp_path / "good"
    good.mkdir()
    (good / "manifest.json").write_text(json.dumps({"counts": {"train_rows": 90,
                                                               "val_rows": 10}}))
    bad = tmp_path / "bad"
    bad.mkdir()
    (bad / "manifest.json").write_text("{not json")
    ok = check_data(load_config("tiny", [f"data.path={good}"]))
    assert ok.ok and "train_rows=90" in ok.detail
    broken = check_data(load_config("tiny", [f"data.path={bad}"]))
    assert not broken.ok and "not valid JSON" in broken.detail


def test_read_only_storage_is_caught_naming_the_key():
    """sysfs refuses new folders even to root: a storage path nobody can write."""
    from mmdist.preflight import check_storage

    check = check_storage(load_config("tiny", ["train.storage_path=/sys/mmdist-runs"]))
    assert not check.ok
    assert "train.storage_path=/sys/mmdist-runs: cannot write there" in check.detail


def test_cluster_submissions_need_absolute_storage_and_a_tracking_uri(monkeypatch):
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    cfg = load_config("tiny")
    (storage,) = [c for c in preflight(cfg, address="http://127.0.0.1:1") if c.name == "storage"]
    assert not storage.ok and "train.storage_path is not set" in storage.detail
    assert not check_mlflow(cfg, on_cluster=True).ok


def test_unreachable_tracking_server_fails(tmp_path):
    cfg = load_config("tiny", ["tracking.tracking_uri=http://127.0.0.1:9"])
    c = check_mlflow(cfg)
    assert not c.ok and "not reachable" in c.detail


def test_deepspeed_world_size_check():
    assert check_deepspeed(load_config("tiny", ["train.num_workers=4"])).ok


def test_fp16_on_a_cpu_without_float16_is_named_before_any_worker(monkeypatch):
    """The rule, on either kind of CPU: the probe of this machine's float16 is replaced by each
    answer in turn (which one the machine gives decides only which path training takes)."""
    import mmdist.train.deepspeed_config as dsc

    fp16 = load_config("tiny", ["train.precision=fp16"])
    monkeypatch.setattr(dsc, "cpu_fp16_supported", lambda: False)
    check = check_deepspeed(fp16)
    assert not check.ok and "train.precision=fp16" in check.detail and "bf16" in check.detail
    assert check_deepspeed(fp16, on_cluster=True).ok  # the cluster's CPUs are not this one's
    assert check_deepspeed(load_config("tiny", ["train.precision=bf16"])).ok
    assert dsc.precision_problem(fp16.override(["train.use_gpu=true"])) is None
    monkeypatch.setattr(dsc, "cpu_fp16_supported", lambda: True)
    assert check_deepspeed(fp16).ok
