"""What the logged pyfunc needs to load in a fresh environment (``mlflow models serve``, a
``load_model`` elsewhere): mmdist's own source as ``code_paths``, and the distributions its
prediction path imports as ``pip_requirements``, pinned to the versions that made the model.
"""

from __future__ import annotations

import importlib.metadata
import re
import tomllib
from pathlib import Path

PACKAGE_DIR = Path(__file__).resolve().parents[1]  # .../mmdist

# mmdist's dependencies that loading a model and predicting never imports (training, sweeps,
# data sources, reports); tests/integration/test_serve_http.py checks it on a registered model.
# av decodes video in `mmdist prepare` only: the predictor takes text, image and audio.
NOT_FOR_PREDICTION = frozenset({
    "ray", "deepspeed", "accelerate", "matplotlib", "tabulate", "scikit-learn",
    "espeakng-loader", "threadpoolctl", "av", "sacrebleu"})


def _canonical(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def _declared() -> list[str]:
    """mmdist's runtime dependencies: the installed metadata, else the source's pyproject."""
    try:
        reqs = importlib.metadata.requires("mmdist") or []
    except importlib.metadata.PackageNotFoundError:
        project = tomllib.loads((PACKAGE_DIR.parent / "pyproject.toml").read_text())["project"]
        reqs = project["dependencies"]
    return [r for r in reqs if "extra ==" not in r and "extra==" not in r]


def pyfunc_requirements() -> list[str]:
    """``name==version`` for each dependency the prediction path imports, as installed now."""
    out = []
    for req in _declared():
        name = re.match(r"[A-Za-z0-9._-]+", req.strip()).group(0)
        if _canonical(name) in NOT_FOR_PREDICTION:
            continue
        try:
            out.append(f"{name}=={importlib.metadata.version(name)}")
        except importlib.metadata.PackageNotFoundError:
            out.append(re.sub(r"\[.*?\]", "", req.split(";")[0]).strip())
    if not any(_canonical(r).startswith("mlflow") for r in out):
        out.append(f"mlflow=={importlib.metadata.version('mlflow')}")
    return out


def pyfunc_code_paths() -> list[str]:
    """mmdist's package directory: MLflow copies it into the model and puts it on sys.path
    when loading, so the model loads where mmdist is not installed."""
    return [str(PACKAGE_DIR)]
