"""The feature cache end to end on a real local Ray: built once by the Ray Data actor-pool stage
(`mmdist cache build`), then reused, never rebuilt, by a training run and by every trial of a
sweep (real Ray Train + DeepSpeed + MLflow); a corrupted feature shard is refused by checksum;
`mmdist cache ls/rm` show and remove the entry. Tiny pretrained SigLIP + Whisper saved with
save_pretrained."""

from __future__ import annotations

import json

import pyarrow.parquet as pq
import pytest

from mmdist.cli import main
from mmdist.config import load_config
from mmdist.data.feature_cache import cache_root, list_entries, verify_cache
from mmdist.data.shards import ManifestError
from mmdist.models.feature_build import BUILDS_LOG, feature_cache_for
from mmdist.train.cache_cmd import build
from mmdist.train.run import ensure_data
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
        feature_cache_for(cfg, data, verified={**manifest, "entry": str(root / "other")})

    # `mmdist cache ls` shows it with its size; `rm` removes it
    assert main(["cache", "ls", "--root", str(root)]) == 0  # no --json: it stops Ray
    listed = capsys.readouterr().out
    assert built["key"] in listed and "KiB" in listed and "96 rows" in listed
    (entry,) = list_entries(root)
    assert entry["bytes"] > 0 and entry["complete"]
    assert main(["cache", "rm", built["key"], "--root", str(root)]) == 0
    assert list_entries(root) == []
    assert main(["cache", "rm", "nope", "--root", str(root)]) == 1
