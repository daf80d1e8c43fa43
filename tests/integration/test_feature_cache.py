"""The feature cache end to end on a real local Ray: built once by the Ray Data actor-pool stage
(`mmdist cache build`), then reused, never rebuilt, by a training run and by every trial of a
sweep (real Ray Train + DeepSpeed + MLflow); a corrupted feature shard is refused by checksum;
`mmdist cache ls/rm` show and remove the entry. Tiny pretrained SigLIP + Whisper saved with
save_pretrained."""

from __future__ import annotations

import json

import pyarrow.parquet as pq
import pytest
from mlflow import MlflowClient

from mmdist.cli import main
from mmdist.config import load_config
from mmdist.data.feature_cache import cache_root, list_entries, verify_cache
from mmdist.data.shards import ManifestError, read_manifest
from mmdist.models.feature_build import BUILDS_LOG, feature_cache_for
from mmdist.train.cache_cmd import build
from mmdist.train.run import ensure_data, train
from mmdist.tune import sweep


def _builds(root):
    log = root / BUILDS_LOG
    return [json.loads(line) for line in log.read_text().splitlines()] if log.exists() else []


@pytest.fixture(scope="module")
def setup(pretrained_dirs, tmp_path_factory):
    tmp = tmp_path_factory.mktemp("fcache")
    cfg = load_config("tiny", [
        f"model.image_pretrained={pretrained_dirs['@siglip']}",
        f"model.audio_pretrained={pretrained_dirs['@whisper']}",
        "model.freeze=[image_encoder,audio_encoder]", "data.feature_cache=require",
        "model.modality_tokens={image: 4, audio: 4}", "data.synthetic_samples=96",
        "data.shard_rows=40", f"train.storage_path={tmp / 'runs'}",
        f"tracking.tracking_uri=sqlite:///{tmp / 'mlflow.db'}", "tracking.register=false",
        "train.max_steps=2", "train.eval_every=2", "train.checkpoint_every=2"])
    data = ensure_data(cfg, tmp / "data")
    return cfg.override({"data.path": str(data)}), data


def test_built_once_then_reused_by_a_run_and_every_sweep_trial(ray_local, setup, capsys):
    cfg, data = setup
    root = cache_root(cfg)
    built = build(cfg, None, None)  # `mmdist cache build`: the Ray Data actor-pool stage
    assert built["rows"] == 96 and built["modalities"] == ["audio", "image"]
    (line,) = _builds(root)  # one pass of the encoders over every row
    assert line["key"] == built["key"] and line["rows"] == 96
    manifest = verify_cache(root / built["key"])
    assert len(manifest["files"]) >= 2 and {f["split"] for f in manifest["files"]} == {"train",
                                                                                     "val"}
    shard = root / built["key"] / manifest["files"][0]["path"]
    cols = pq.read_schema(shard).names
    assert "image" not in cols and {"image_features", "audio_features", "sample_id"} <= set(cols)

    out = sweep(cfg, ["model.fusion=concat,add", "model.fusion_stage=mid", "train.lr=0.003"],
                register=False)
    assert out["trials"] == 2 and out["failed_trials"] == 0
    assert len(_builds(root)) == 1  # both trials (two training runs) read the same entry
    assert f"feature cache {built['key']}: reusing" in capsys.readouterr().out

    # a corrupted feature shard is refused by its checksum, naming the file
    data_bytes = bytearray(shard.read_bytes())
    data_bytes[len(data_bytes) // 2] ^= 0xFF
    shard.write_bytes(bytes(data_bytes))
    with pytest.raises(ManifestError, match=f"feature shard {shard}: sha256"):
        feature_cache_for(cfg, data)
    with pytest.raises(ManifestError, match=f"feature shard {shard}: sha256"):
        # what a sweep's driver verified is taken only for its own entry
        feature_cache_for(cfg, data, verified_entry=str(root / "other"))

    # `mmdist cache ls` shows it with its size; `rm` removes it
    assert main(["cache", "ls", "--root", str(root)]) == 0  # no --json: it stops Ray
    listed = capsys.readouterr().out
    assert built["key"] in listed and "KiB" in listed and "96 rows" in listed
    (entry,) = list_entries(root)
    assert entry["bytes"] > 0 and entry["complete"]
    assert main(["cache", "rm", built["key"], "--root", str(root)]) == 0
    assert list_entries(root) == []
    assert main(["cache", "rm", "nope", "--root", str(root)]) == 1


def test_a_cached_run_trains_exactly_as_the_live_run(ray_local, setup, tmp_path):
    """The feature cache mirrors the source shards (one feature shard per source shard, its rows
    in the same order), so a run reading it gets the batches of a run reading the raw media, in
    the same order: the same train loss at every step, through Ray Data and Ray Train."""
    cfg, data = setup
    cfg = cfg.override({"train.storage_path": str(tmp_path / "runs"), "train.num_workers": 1,
                        "train.max_steps": 8, "train.log_every": 1, "train.eval_every": 8,
                        "train.checkpoint_every": 8})
    cached = train(cfg)
    live = train(cfg.override({"data.feature_cache": "off"}))
    (entry,) = list_entries(cache_root(cfg))
    manifest = verify_cache(cache_root(cfg) / entry["key"])
    source = read_manifest(data)
    assert ([(f["path"], f["rows"]) for f in manifest["files"]]
            == [(s["path"], s["rows"]) for s in source["shards"]])
    uri = cfg.tracking.tracking_uri
    losses = {name: [m.value for m in sorted(
        MlflowClient(uri).get_metric_history(s["run_id"], "train_loss"), key=lambda m: m.step)]
        for name, s in (("cached", cached), ("live", live))}
    assert len(losses["live"]) == 8
    assert losses["cached"] == pytest.approx(losses["live"], rel=1e-4, abs=1e-5)
