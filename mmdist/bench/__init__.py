"""`mmdist bench NAME`: benchmarks that measure two things side by side in one run.

Each benchmark is a module with ``configure_parser(parser)`` and ``run(args) -> dict``, like a
CLI command; the ratio it prints is always measured within the same run (machines are noisy).
"""

from __future__ import annotations

import argparse
import importlib

# name -> (module, one-line help)
BENCHES: dict[str, tuple[str, str]] = {
    "ingest": ("mmdist.bench.ingest", "Ray Data pipeline vs torch DataLoader, same preprocessing"),
    "train": ("mmdist.bench.train", "TorchTrainer + DeepSpeed (1 worker) vs a plain PyTorch loop"),
    "zero": ("mmdist.bench.zero", "ZeRO-3 model+grad+optimizer bytes per rank, 2 ranks vs 1"),
    "mfu": ("mmdist.bench.mfu", "model-FLOPs utilisation of the real training step"),
    "sweep": ("mmdist.bench.sweep", "ASHA vs full budget over the same sweep space"),
}


def _load(name: str):
    module_name = BENCHES[name][0]
    try:
        return importlib.import_module(module_name)
    except ModuleNotFoundError as e:
        if e.name and module_name.startswith(e.name):
            return None
        raise


def configure_parser(parser: argparse.ArgumentParser) -> None:
    from mmdist.cli import add_json_flag

    sub = parser.add_subparsers(dest="bench", metavar="BENCH", required=True)
    for name, (_, help_text) in BENCHES.items():
        module = _load(name)
        p = sub.add_parser(name, help=help_text if module else f"{help_text} (not landed yet)",
                           description=help_text)
        if module is not None:
            module.configure_parser(p)
        add_json_flag(p)


def run(args: argparse.Namespace) -> dict:
    from mmdist.cli import CommandError

    module = _load(args.bench)
    if module is None:
        raise CommandError(f"mmdist bench {args.bench}: this benchmark has not landed yet")
    return module.run(args)
