"""`mmdist bench sweep --feature-cache`: the same fusion x stage x lr sweep with a frozen
pretrained image encoder, run twice side by side: reading cached encoder features
(``data.feature_cache=require``; the cache is built inside the timed run, from empty) and
decoding the images and running the frozen encoder in every trial (``off``). Prints both wall
times, trial-steps/s and whether both found the same best configuration.

The encoder is a ViT of realistic cost relative to the trained parts: a CLIP vision tower of
ViT-S/16 shape (12 layers, width 384, 224-pixel images, 196 patches) with random weights saved
with ``save_pretrained`` into the bench's folder (nothing is downloaded); the fused model around
it is the tiny preset's. Each trial pays its own start-up (Ray Train workers, DeepSpeed, MLflow),
which the cache does not remove.
"""

from __future__ import annotations

import time
import uuid
from pathlib import Path
from typing import Any

from mmdist.errors import CommandError

# what the row's sweeps run on top of --config and its overrides
BASE = {"model.modalities": ["text", "image"], "model.freeze": ["image_encoder"],
        "model.modality_tokens": {"image": 16}, "data.image_size": 224,
        "data.synthetic_samples": 320, "data.shard_rows": 64, "train.micro_batch_size": 16,
        "train.max_steps": 18, "train.eval_every": 18, "train.checkpoint_every": 18,
        "tune.scheduler": "fifo"}
DEFAULT_SPACE = ["model.fusion=concat,add,mul,weighted,attention,transformer,conv,recurrent",
                 "model.fusion_stage=mid", "train.lr=0.003"]
VIT_S = {"hidden_size": 384, "intermediate_size": 1536, "num_hidden_layers": 12,
         "num_attention_heads": 6, "image_size": 224, "patch_size": 16}


def vit_dir(root: Path) -> Path:
    """A random CLIP vision tower of ViT-S/16 shape saved in ``root`` (made once)."""
    d = root / "clip-vit-s16-random"
    if not (d / "config.json").exists():
        import torch
        import transformers

        torch.manual_seed(0)
        model = transformers.CLIPVisionModel(transformers.CLIPVisionConfig(**VIT_S))
        model.save_pretrained(d)
    return d


def run_cache_row(config: str, overrides: list[str], space: list[str] | None
                  ) -> dict[str, Any]:
    """Both sweeps, cached first, on ``config`` with :data:`BASE` and then ``overrides``
    applied; the summary's ``--json`` keys."""
    from mmdist.config import load_config
    from mmdist.train.run import ensure_data
    from mmdist.tune import sweep

    cfg = load_config(config).override(BASE).override(overrides)
    tag = uuid.uuid4().hex[:6]
    storage = Path(cfg.train.storage_path or "runs").resolve() / f"bench-cache-{tag}"
    base = cfg.override({"train.storage_path": str(storage)})
    if not cfg.model.image_pretrained:
        base = base.override({"model.image_pretrained": str(vit_dir(storage.parent))})
    data = ensure_data(base, storage.parent / "bench-cache-data")  # not timed: both read it
    base = base.override({"data.path": str(data)})
    space = space or DEFAULT_SPACE
    out = {}
    for mode in ("require", "off"):
        t0 = time.perf_counter()
        out[mode] = sweep(base.override({"data.feature_cache": mode}), space,
                          name=f"bench-cache-{mode}-{tag}", register=False)
        out[mode]["wall"] = time.perf_counter() - t0
        if out[mode]["failed_trials"]:  # a failed trial ends early: the times would not compare
            raise CommandError(
                f"bench sweep --feature-cache: {out[mode]['failed_trials']} of "
                f"{out[mode]['trials']} trials of the data.feature_cache={mode} sweep failed "
                "(their errors are above); no speed-up is reported")
    cached, uncached = out["require"], out["off"]
    same = cached["best_config"] == uncached["best_config"]
    speedup = uncached["wall"] / max(cached["wall"], 1e-9)
    for label, s in (("cached  ", cached), ("uncached", uncached)):
        print(f"{label}: {s['wall']:.1f} s wall, {s['trials']} trials, {s['trial_steps']} "
              f"trial-steps ({s['trial_steps'] / s['wall']:.2f}/s), best {s['best_config']} "
              f"({s['metric']} {s['best_metric']:.4f})")
    print(f"feature cache: {speedup:.2f}x faster wall time; same best configuration: {same}")
    return {"cached_seconds": round(cached["wall"], 1), "uncached_seconds":
            round(uncached["wall"], 1), "cache_speedup": round(speedup, 3), "same_best": same,
            "cached_trial_steps_per_s": round(cached["trial_steps"] / cached["wall"], 3),
            "uncached_trial_steps_per_s": round(uncached["trial_steps"] / uncached["wall"], 3),
            "trials": cached["trials"], "cached_best_config": cached["best_config"],
            "uncached_best_config": uncached["best_config"]}
