"""`mmdist bench sweep`: ASHA early stopping against running every trial to its full budget,
over the same space, in one run. Prints the optimizer steps (summed over trials) each used and
whether both found the same best configuration. ``--feature-cache``: frozen-encoder features
cached vs computed in every trial instead (``mmdist.bench.sweep_cache``)."""

from __future__ import annotations

import argparse
import uuid
from typing import Any

from mmdist.arguments import add_config_arguments
from mmdist.config import load_config
from mmdist.tune import sweep


def configure_parser(parser: argparse.ArgumentParser) -> None:
    add_config_arguments(parser, default="tiny")
    parser.add_argument("--space", action="append", default=[], metavar="KEY=SPEC",
                        help="search dimensions as in `mmdist sweep --space` (default: "
                             "model.fusion=concat,add, model.fusion_stage=mid and "
                             "train.lr=0.003,0.00001: 4 trials; with --feature-cache: the 8 "
                             "fusion methods x mid x lr 0.003)")
    parser.add_argument("--feature-cache", action="store_true",
                        help="instead: the space with a frozen pretrained ViT-S/16 image encoder, "
                             "reading cached encoder features vs decoding and encoding in every "
                             "trial, side by side (mmdist.bench.sweep_cache)")


def run(args: argparse.Namespace) -> dict[str, Any]:
    if args.feature_cache:
        from mmdist.bench.sweep_cache import run_cache_row

        return run_cache_row(args.config, args.overrides, args.space)
    space = args.space or ["model.fusion=concat,add", "model.fusion_stage=mid",
                           "train.lr=0.003,0.00001"]
    cfg = load_config(args.config, args.overrides)
    tag = uuid.uuid4().hex[:6]
    asha = sweep(cfg.override({"tune.scheduler": "asha"}), space, name=f"bench-asha-{tag}",
                 register=False)
    full = sweep(cfg.override({"tune.scheduler": "fifo"}), space, name=f"bench-full-{tag}",
                 register=False)
    same = asha["best_config"] == full["best_config"]
    ratio = asha["trial_steps"] / max(1, full["trial_steps"])
    print(f"ASHA        : {asha['trial_steps']} trial-steps, {asha['stopped_early']} of "
          f"{asha['trials']} trials stopped early, best {asha['best_config']} "
          f"({asha['metric']} {asha['best_metric']:.4f})")
    print(f"full budget : {full['trial_steps']} trial-steps, best {full['best_config']} "
          f"({full['metric']} {full['best_metric']:.4f})")
    print(f"ASHA used {ratio:.2f}x the steps; same best configuration: {same}")
    return {"asha_trial_steps": asha["trial_steps"], "full_trial_steps": full["trial_steps"],
            "steps_ratio": ratio, "same_best": same, "asha_best_config": asha["best_config"],
            "full_best_config": full["best_config"], "stopped_early": asha["stopped_early"]}
