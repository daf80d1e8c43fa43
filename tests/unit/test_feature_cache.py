"""The frozen-encoder feature cache without Ray: what makes a new key, what is refused, and that
the trainable parts train on cached features exactly as on the live encoder outputs (the real
FeatureEncoder UDF, Parquet round trip and CachedBatchPreprocessor; tiny pretrained models
saved with save_pretrained)."""

from __future__ import annotations

import copy
import shutil

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch

from mmdist.config import ConfigError, load_config
from mmdist.data.feature_cache import cache_key, cache_plan, key_parts
from mmdist.data.feature_read import cached_batch
from mmdist.data.pipeline import audio_dir
from mmdist.data.preprocess import PreprocessSpec, arrow_to_numpy, preprocess_batch
from mmdist.data.schema import as_tensors
from mmdist.data.shards import load_tokenizer, read_manifest, shard_paths
from mmdist.models import build_model
from mmdist.models.adapt import freeze
from mmdist.models.feature_build import FeatureEncoder
from mmdist.train.run import ensure_data


def _cfg(dirs, tmp, *extra):
    return load_config("tiny", [
        f"model.image_pretrained={dirs['@siglip']}", f"model.audio_pretrained={dirs['@whisper']}",
        "model.freeze=[image_encoder,audio_encoder]", "data.feature_cache=auto",
        "model.modality_tokens={image: 4, audio: 4}", "data.synthetic_samples=48",
        f"train.storage_path={tmp / 'runs'}", *extra])


@pytest.fixture(scope="module")
def data(pretrained_dirs, tmp_path_factory):
    tmp = tmp_path_factory.mktemp("fc")
    return ensure_data(_cfg(pretrained_dirs, tmp), tmp / "data")


def _key(cfg, data_dir):
    return cache_plan(cfg, data_dir, log=lambda s: None).key


def test_a_new_key_for_new_weights_image_size_or_data(pretrained_dirs, data, tmp_path):
    cfg = _cfg(pretrained_dirs, tmp_path)
    base = _key(cfg, data)
    assert _key(cfg, data) == base and len(base) == 20  # deterministic
    assert _key(cfg.override({"model.fusion": "add", "train.lr": 0.1}), data) == base
    assert _key(cfg.override({"data.image_size": 48}), data) != base
    assert _key(cfg.override({"data.audio_seconds": 0.25}), data) != base
    # other weights: the same architecture saved again with one tensor changed
    changed = tmp_path / "siglip2"
    shutil.copytree(pretrained_dirs["@siglip"], changed)
    from safetensors.torch import load_file, save_file

    w = load_file(str(changed / "model.safetensors"))
    name = sorted(w)[0]
    w[name] = w[name] + 1e-3
    save_file(w, str(changed / "model.safetensors"), metadata={"format": "pt"})
    assert _key(cfg.override({"model.image_pretrained": str(changed)}), data) != base
    # other data: a different synthetic set
    other = ensure_data(cfg.override({"data.synthetic_samples": 40}), tmp_path / "data2")
    assert _key(cfg, other) != base
    parts = key_parts(cfg, data, ["image", "audio"])
    assert cache_key(parts) == base and set(parts["encoders"]) == {"audio", "image"}


def test_only_frozen_pretrained_encoders_are_cached(pretrained_dirs, data, tmp_path):
    said = []
    cfg = _cfg(pretrained_dirs, tmp_path, "model.freeze=[image_encoder]")
    plan = cache_plan(cfg, data, log=said.append)
    assert plan.modalities == ("image",)
    assert "its encoder trains" in said[0] and "audio" in said[0]
    assert cache_plan(cfg.override({"data.feature_cache": "off"}), data) is None
    none = cfg.override({"model.freeze": []})
    assert cache_plan(none, data, log=said.append) is None and "reading raw media" in said[-1]
    with pytest.raises(ConfigError, match="data.feature_cache=require: nothing to cache"):
        cache_plan(none.override({"data.feature_cache": "require"}), data)
    with pytest.raises(ConfigError, match=r"data.augment=true with data.feature_cache=auto"):
        cache_plan(cfg.override({"data.augment": True}), data)


def _round_trip(cfg, data_dir, tmp_path):
    """A train shard's rows through the real FeatureEncoder UDF, written and read back as a
    feature shard, and the same rows preprocessed as raw media."""
    manifest = read_manifest(data_dir)
    table = pq.read_table(shard_paths(data_dir, manifest, "train")[0]).slice(0, 16)
    spec = PreprocessSpec.from_config(cfg.data, augment=False, audio_features=audio_dir(cfg))
    tok_dir = str(data_dir / manifest.get("tokenizer", "tokenizer"))
    threads = torch.get_num_threads()
    try:  # the actor sets its process's torch threads
        enc = FeatureEncoder(cfg.to_dict(), ["audio", "image"], spec.to_dict(), tok_dir, "cpu",
                             threads)
        out = enc(table)
    finally:
        torch.set_num_threads(threads)
    shapes = {m: [int(x) for x in out.column(f"{m}_shape")[0].as_py().split(",")]
              for m in ("audio", "image")}
    out = out.drop_columns(["audio_shape", "image_shape"])
    assert "image" not in out.column_names and "audio" not in out.column_names
    pq.write_table(out, tmp_path / "f.parquet")
    back = pq.read_table(tmp_path / "f.parquet")
    tok = load_tokenizer(data_dir)
    cached = as_tensors(cached_batch(back, spec, tok, shapes))
    raw = as_tensors(preprocess_batch(arrow_to_numpy(table), spec, tok))
    return raw, cached


def test_training_on_cached_features_matches_live_features(pretrained_dirs, data, tmp_path):
    cfg = _cfg(pretrained_dirs, tmp_path)
    raw, cached = _round_trip(cfg, data, tmp_path)
    assert cached["image_features"].dtype == torch.float32 and cached["image"].numel() == 16 * 3
    assert torch.equal(cached["sample_id"], raw["sample_id"])
    assert torch.equal(cached["has_image"], raw["has_image"])
    tok = load_tokenizer(data)
    torch.manual_seed(0)
    live = build_model(cfg, **tok.model_vocab())
    freeze(live, cfg.model.freeze)
    # Whisper's encoder draws a layerdrop number per layer in train mode (p=0: nothing is
    # dropped, but the draw would shift the negatives' random stream): frozen backbones in eval
    for m in ("image", "audio"):
        live.encoders[m].backbone.eval()
    fed = copy.deepcopy(live)
    calls = {"n": 0}
    for m in ("image", "audio"):
        fed.encoders[m].backbone.register_forward_hook(
            lambda *a: calls.__setitem__("n", calls["n"] + 1))

    def steps(model, batch):
        opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
        losses = []
        for i in range(3):
            torch.manual_seed(100 + i)  # the same negatives and dropout both ways
            loss = model(batch)["loss"]
            opt.zero_grad()
            loss.backward()
            opt.step()
            losses.append(loss.item())
        return losses

    live_losses, cached_losses = steps(live, raw), steps(fed, cached)
    assert calls["n"] == 0  # the frozen backbones never ran on cached features
    np.testing.assert_allclose(cached_losses, live_losses, rtol=1e-5, atol=1e-6)
    assert live_losses[0] != live_losses[2]  # they trained
    for (name, a), b in zip(live.named_parameters(), fed.parameters()):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5, msg=name)


def test_feature_rows_are_fixed_size_bytes(pretrained_dirs, data, tmp_path):
    from mmdist.data.feature_read import fixed_rows

    x = np.arange(24, dtype=np.float32).reshape(4, 2, 3)
    col = pa.chunked_array([pa.array([r.tobytes() for r in x[:1]], pa.binary()),
                            pa.array([r.tobytes() for r in x[1:]], pa.binary())])
    np.testing.assert_array_equal(fixed_rows(col, np.float32, [2, 3]), x)
    np.testing.assert_array_equal(fixed_rows(col.combine_chunks().slice(2), np.float32, [2, 3]),
                                  x[2:])
