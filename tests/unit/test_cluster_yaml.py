"""Every YAML under cluster/ parses and has the keys its tool (ray up, KubeRay, ray job submit)
requires."""

from pathlib import Path

import pytest
import yaml

CLUSTER = Path(__file__).resolve().parents[2] / "cluster"
YAMLS = sorted(CLUSTER.rglob("*.yaml")) + sorted(CLUSTER.rglob("*.yml"))


def _docs(path: Path) -> list[dict]:
    docs = [d for d in yaml.safe_load_all(path.read_text()) if d is not None]
    assert docs, f"{path} is empty"
    for d in docs:
        assert isinstance(d, dict), f"{path}: every document must be a mapping"
    return docs


def _kind(doc: dict) -> str:
    if "cluster_name" in doc or "available_node_types" in doc:
        return "launcher"
    if "kind" in doc:
        return doc["kind"]
    if "env_vars" in doc or "excludes" in doc or "working_dir" in doc:
        return "runtime_env"
    return "unknown"


def test_the_expected_files_exist():
    names = {p.relative_to(CLUSTER).as_posix() for p in YAMLS}
    assert {"aws.yaml", "runtime_env.yaml", "kuberay/raycluster.yaml",
            "kuberay/rayjob-train.yaml", "kuberay/rayjob-sweep.yaml",
            "kuberay/rayservice.yaml"} <= names


@pytest.mark.parametrize("path", YAMLS, ids=lambda p: p.relative_to(CLUSTER).as_posix())
def test_every_cluster_yaml_parses_and_is_known(path):
    for doc in _docs(path):
        kind = _kind(doc)
        assert kind in {"launcher", "runtime_env", "RayCluster", "RayJob", "RayService",
                        "PersistentVolumeClaim"}, f"{path}: unknown document kind {kind!r}"
        {"launcher": _check_launcher, "runtime_env": _check_runtime_env,
         "RayCluster": _check_raycluster, "RayJob": _check_rayjob,
         "RayService": _check_rayservice, "PersistentVolumeClaim": _check_pvc}[kind](doc, path)


def _check_launcher(d: dict, path: Path):
    for key in ("cluster_name", "provider", "head_node_type", "available_node_types",
                "setup_commands", "head_start_ray_commands", "worker_start_ray_commands"):
        assert key in d, f"{path}: launcher config lacks {key}"
    assert d["provider"].get("type"), f"{path}: provider.type"
    types = d["available_node_types"]
    assert d["head_node_type"] in types, f"{path}: head_node_type not in available_node_types"
    for name, t in types.items():
        assert "node_config" in t and "resources" in t, f"{path}: node type {name}"
    workers = [t for n, t in types.items() if n != d["head_node_type"]]
    assert any("max_workers" in t for t in workers), f"{path}: no worker node type"
    assert any(t["node_config"].get("InstanceType", "").startswith(("g", "p")) for t in workers), \
        f"{path}: no GPU worker instance type"
    setup = " ".join(d["setup_commands"])
    assert "uv sync" in setup, f"{path}: setup_commands must install the project with uv"
    for key in ("head_start_ray_commands", "worker_start_ray_commands"):
        assert "RAY_AUTH_MODE=token" in " ".join(d[key]), f"{path}: {key} without token auth"
    head = " ".join(d["head_start_ray_commands"])
    assert "--dashboard-host=127.0.0.1" in head, f"{path}: dashboard must bind to loopback"
    assert "file_mounts" in d, f"{path}: file_mounts (the project) missing"


def _check_runtime_env(d: dict, path: Path):
    excludes = d.get("excludes", [])
    for big in (".venv", ".git", "runs", ".cache", ".cluster", "mlruns"):
        assert big in excludes, f"{path}: excludes must hold {big}"
    env = d.get("env_vars", {})
    assert all(isinstance(v, str) for v in env.values()), f"{path}: env_vars values are strings"
    for key in ("MLFLOW_DISABLE_TELEMETRY", "RAY_USAGE_STATS_ENABLED", "TORCH_EXTENSIONS_DIR"):
        assert key in env, f"{path}: env_vars.{key}"
    assert "MLFLOW_TRACKING_URI" not in env, f"{path}: the tracking URI comes from the cluster"


def _containers(template: dict) -> list[dict]:
    return template["spec"]["containers"]


def _check_raycluster_spec(spec: dict, path: Path):
    assert spec.get("authOptions", {}).get("mode") == "token", f"{path}: authOptions.mode: token"
    major, minor = (int(x) for x in spec["rayVersion"].split(".")[:2])
    assert (major, minor) >= (2, 52), f"{path}: token auth needs rayVersion >= 2.52"
    head = spec["headGroupSpec"]
    assert "rayStartParams" in head and _containers(head["template"]), f"{path}: headGroupSpec"
    assert head.get("serviceType", "ClusterIP") == "ClusterIP", f"{path}: head must not be public"
    groups = spec["workerGroupSpecs"]
    assert groups, f"{path}: workerGroupSpecs"
    gpus = 0
    for g in groups:
        for key in ("groupName", "rayStartParams", "template"):
            assert key in g, f"{path}: workerGroupSpecs[].{key}"
        for c in _containers(g["template"]):
            gpus += int(c.get("resources", {}).get("limits", {}).get("nvidia.com/gpu", 0))
    assert gpus > 0, f"{path}: no worker group with nvidia.com/gpu limits"
    for tmpl in [head["template"]] + [g["template"] for g in groups]:
        claims = [v for v in tmpl["spec"].get("volumes", []) if "persistentVolumeClaim" in v]
        assert claims, f"{path}: every Ray pod mounts the shared checkpoint volume"
        for c in _containers(tmpl):
            env = {e["name"]: e for e in c.get("env", [])}
            uri = env.get("MLFLOW_TRACKING_URI", {})
            assert "secretKeyRef" in uri.get("valueFrom", {}), \
                f"{path}: MLFLOW_TRACKING_URI must come from a Secret"


def _check_raycluster(d: dict, path: Path):
    assert d["apiVersion"] == "ray.io/v1", f"{path}: apiVersion"
    assert d["metadata"]["name"], f"{path}: metadata.name"
    _check_raycluster_spec(d["spec"], path)


def _check_rayjob(d: dict, path: Path):
    assert d["apiVersion"] == "ray.io/v1", f"{path}: apiVersion"
    spec = d["spec"]
    script = "jobs/sweep.py" if "sweep" in path.name else "jobs/train.py"
    entry = spec["entrypoint"]
    assert f"{script} " in entry + " ", f"{path}: entrypoint must run {script}"
    assert "train.storage_path=/mnt/" in entry, f"{path}: checkpoints must go to the shared volume"
    assert "train.use_gpu=true" in entry
    if "runtimeEnvYAML" in spec:
        yaml.safe_load(spec["runtimeEnvYAML"])
    _check_raycluster_spec(spec["rayClusterSpec"], path)


def _check_rayservice(d: dict, path: Path):
    """The Serve config is what mmdist.serve.deployment.build_app takes, and builds."""
    from mmdist.serve.deployment import build_app

    assert d["apiVersion"] == "ray.io/v1", f"{path}: apiVersion"
    serve_config = yaml.safe_load(d["spec"]["serveConfigV2"])
    assert serve_config["http_options"]["port"] == 8000, f"{path}: http_options.port"
    for app in serve_config["applications"]:
        assert app["import_path"] == "mmdist.serve.deployment:build_app", f"{path}: import_path"
        assert app["args"]["model"].startswith("models:/"), f"{path}: args.model"
        build_app(app["args"])  # refuses an arg it does not know, naming it
    _check_raycluster_spec(d["spec"]["rayClusterConfig"], path)


def _check_pvc(d: dict, path: Path):
    assert "ReadWriteMany" in d["spec"]["accessModes"], f"{path}: checkpoints need an RWX volume"
