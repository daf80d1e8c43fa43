"""`mmdist bench NAME`: benchmarks that measure two things side by side in one run.

Each benchmark is a module with ``configure_parser(parser)`` and ``run(args) -> dict``, like a
CLI command; the ratio it prints is always measured within the same run (machines are noisy).
"""

from __future__ import annotations

import argparse
import importlib

from mmdist.arguments import add_command_parsers

# name -> (module, one-line help)
BENCHES: dict[str, tuple[str, str]] = {
    "ingest": ("mmdist.bench.ingest", "Ray Data pipeline vs torch DataLoader, same preprocessing"),
    "train": ("mmdist.bench.train", "Ray Train + DeepSpeed (1 worker) vs a plain PyTorch loop"),
    "zero": ("mmdist.bench.zero", "ZeRO-3 model+grad+optimizer bytes per rank, 2 ranks vs 1"),
    "adapt": ("mmdist.bench.adapt", "bytes per rank: full fine-tuning vs frozen encoders vs LoRA"),
    "mfu": ("mmdist.bench.mfu", "model-FLOPs utilisation of the real training step"),
    "sweep": ("mmdist.bench.sweep", "ASHA vs full budget over the same sweep space"),
    "fusion": ("mmdist.bench.fusion", "every fusion method x stage on real data, against chance"),
    "serve": ("mmdist.bench.serve", "Ray Serve with vs without request batching, 1-32 clients"),
}


def configure_parser(parser: argparse.ArgumentParser) -> None:
    sub = parser.add_subparsers(dest="bench", metavar="BENCH", required=True)
    add_command_parsers(sub, BENCHES)


def run(args: argparse.Namespace) -> dict:
    return importlib.import_module(BENCHES[args.bench][0]).run(args)
