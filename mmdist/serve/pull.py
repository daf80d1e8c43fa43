"""`mmdist pull`: a registered model -> a self-contained local model directory.

    mmdist pull models:/mmdist-demo@champion --dst ./my-model
    mmdist pull models:/mmdist-demo/3 --dst ./v3
    mmdist pull runs:/<run_id>/model --dst ./from-run

The directory holds model.safetensors, config.json, tokenizer/, data_manifest.json and a
README.md model card (metrics, data manifest hash, training config). Nothing in it is a pickle.
"""

from __future__ import annotations

import argparse
import json
import shutil
import tempfile
from pathlib import Path
from typing import Any

import yaml

from mmdist import tracking
from mmdist.errors import CommandError


def configure_parser(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("uri", help="models:/NAME@ALIAS, models:/NAME/VERSION or runs:/RUN_ID/model")
    parser.add_argument("--dst", required=True, metavar="DIR",
                        help="folder to write the model into (created; must be empty if it exists)")
    parser.add_argument("--tracking-uri", default=None,
                        help="MLflow tracking URI (default: $MLFLOW_TRACKING_URI, else the local "
                             "store ./mlflow.db)")


def source_run(uri: str, tracking_uri: str) -> tuple[str | None, dict[str, Any]]:
    """The source run id of a model URI and what the registry says about the version."""
    from mlflow.tracking import MlflowClient  # heavy: not loaded for --help

    client = MlflowClient(tracking_uri)
    if uri.startswith("runs:/"):
        return uri.split("/")[1], {}
    rest = uri[len("models:/"):]
    if "@" in rest:
        name, alias = rest.split("@", 1)
        mv = client.get_model_version_by_alias(name, alias)
    else:
        name, version = rest.rsplit("/", 1)
        mv = client.get_model_version(name, version)
    return mv.run_id, {"name": mv.name, "version": mv.version, "aliases": list(mv.aliases),
                       "tags": dict(mv.tags)}


def pull(uri: str, dst: str | Path, tracking_uri: str | None = None) -> dict[str, Any]:
    """Download ``uri`` into ``dst`` and write a model card. Returns the summary."""
    import mlflow  # heavy: not loaded for --help
    from mlflow.tracking import MlflowClient  # heavy: not loaded for --help

    if not (uri.startswith("models:/") or uri.startswith("runs:/")):
        raise CommandError(f"{uri!r}: expected models:/NAME@ALIAS, models:/NAME/VERSION or "
                           "runs:/RUN_ID/model")
    turi = tracking_uri or tracking.tracking_uri()
    mlflow.set_tracking_uri(turi)
    dst = Path(dst)
    if dst.exists() and any(dst.iterdir()):
        raise CommandError(f"--dst {dst}: exists and is not empty")
    try:
        run_id, version = source_run(uri, turi)
    except Exception as e:
        raise CommandError(f"{uri}: not found in {turi} ({e})") from None
    with tempfile.TemporaryDirectory() as tmp:
        local = Path(mlflow.artifacts.download_artifacts(artifact_uri=uri, dst_path=tmp))
        src = tracking.model_dir_in(local)
        if src is None:
            raise CommandError(f"{uri}: not an mmdist model (no artifacts/*/model.safetensors)")
        shutil.copytree(src, dst, dirs_exist_ok=True)
    run = MlflowClient(turi).get_run(run_id) if run_id else None
    metrics = dict(run.data.metrics) if run else {}
    manifest_hash = None
    if (dst / "data_manifest.json").exists():
        manifest_hash = json.loads((dst / "data_manifest.json").read_text()).get("manifest_sha256")
    config = json.loads((dst / "config.json").read_text())
    write_model_card(dst, uri, run_id, version, metrics, manifest_hash, config)
    return {"ok": True, "uri": uri, "dst": str(dst.resolve()), "run_id": run_id,
            "version": version.get("version"), "metrics": metrics,
            "data_manifest_sha256": manifest_hash}


def write_model_card(dst: Path, uri: str, run_id: str | None, version: dict, metrics: dict,
                     manifest_hash: str | None, config: dict) -> None:
    val = {k: v for k, v in sorted(metrics.items()) if k.startswith("val_")}
    lines = [f"# {version.get('name', 'mmdist model')}"
             + (f" v{version['version']}" if version.get("version") else ""), "",
             f"- source: `{uri}` (MLflow run `{run_id}`)",
             f"- aliases: {', '.join(version.get('aliases', [])) or '-'}",
             f"- data manifest sha256: `{manifest_hash}`", "", "## Metrics", ""]
    lines += [f"| {k} | {v:.4f} |" for k, v in val.items()] or ["(none logged)"]
    lines += ["", "## Training config", "", "```yaml",
              yaml.safe_dump(config.get("config", config), sort_keys=False).rstrip(), "```",
              "", "Load it with `mmdist predict --model DIR` or "
              "`mmdist.serve.predictor.Predictor.from_dir(DIR)`; weights are safetensors."]
    (dst / "README.md").write_text("\n".join(lines) + "\n")


def run(args: argparse.Namespace) -> dict[str, Any]:
    s = pull(args.uri, args.dst, args.tracking_uri)
    if not args.json:
        print(f"pulled {s['uri']} -> {s['dst']}")
        for k, v in sorted(s["metrics"].items()):
            if k.startswith("val_"):
                print(f"  {k} {v:.4f}")
    return s
