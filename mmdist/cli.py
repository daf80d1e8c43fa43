"""The `mmdist` command.

Each subcommand lives in its own module that exposes two functions:

    configure_parser(parser: argparse.ArgumentParser) -> None   # its flags, each with help
    run(args: argparse.Namespace) -> dict                        # does the work, prints for
                                                                  # people, returns the summary

With ``--json`` the summary is printed as the last line of stdout (one JSON object, snake_case
keys). ``jobs/*.py`` call the same two functions with the same parser class
(:class:`ArgumentParser`: flags and ``key=value`` overrides in any order), so a job under
``ray job submit`` takes the same arguments as the CLI. Command modules import heavy libraries (torch, ray, mlflow) inside
``run``, never at module level, so ``mmdist --help`` stays fast.
"""

from __future__ import annotations

import argparse
import importlib
import json
import os
import sys
import time
from pathlib import Path
from typing import Any

from mmdist.arguments import ArgumentParser, add_command_parsers, add_json_flag
from mmdist.config import ConfigError
from mmdist.data.shards import ManifestError
from mmdist.data.sources import SourceError
from mmdist.errors import CommandError

__all__ = ["COMMANDS", "ArgumentParser", "CommandError", "add_json_flag", "build_parser",
           "emit_json", "main", "run_command"]

# name -> (module, one-line help). A dict you can read; no registration on import.
COMMANDS: dict[str, tuple[str, str]] = {
    "prepare": ("mmdist.data.prepare", "convert a data source into validated Parquet shards"),
    "train": ("mmdist.train.run", "train a fused model on Ray Train + DeepSpeed, register it"),
    "sweep": ("mmdist.tune", "Ray Tune sweep over fusion method x stage x learning rate"),
    "evaluate": ("mmdist.evaluate", "score a registered model on a shard set"),
    "pull": ("mmdist.serve.pull", "download a registered model into a self-contained folder"),
    "predict": ("mmdist.serve.predict", "run a model on one image/audio/text example"),
    "promote": ("mmdist.serve.promote", "point an alias (champion) at a registered version"),
    "serve": ("mmdist.serve.deploy", "serve a registered model over HTTP on Ray Serve"),
    "bench": ("mmdist.bench", "benchmarks: ingest, train, zero, mfu, sweep"),
    "preflight": ("mmdist.preflight", "check a cluster can run a config before submitting"),
    "config": ("mmdist.config_cli", "show the resolved config of a preset or YAML file"),
    "cache": ("mmdist.train.cache_cmd", "frozen-encoder feature cache: build, ls, rm"),
}


def build_parser() -> argparse.ArgumentParser:
    parser = ArgumentParser(
        prog="mmdist",
        description="Train, sweep, register and serve fused multimodal models on Ray + DeepSpeed "
                    "+ MLflow. Run `mmdist COMMAND --help` for the flags of a command.")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    add_command_parsers(sub, COMMANDS, dest="_command")
    return parser


def emit_json(summary: dict[str, Any]) -> None:
    print(json.dumps(summary, default=str, sort_keys=True), flush=True)


def process_started_at() -> float | None:
    """Wall-clock time this process started (Linux ``/proc``, 10 ms resolution), else None."""
    try:
        ticks = int(Path("/proc/self/stat").read_text().rsplit(")", 1)[1].split()[19])
        uptime = float(Path("/proc/uptime").read_text().split()[0])
        return time.time() - (uptime - ticks / os.sysconf("SC_CLK_TCK"))
    except (OSError, ValueError, IndexError):
        return None


def run_command(module: Any, args: argparse.Namespace) -> int:
    """Run one command module with user-facing error handling; used by cli and jobs/.

    Errors about the user's input (config, files, shard sets, data sources) print one
    ``error: ...`` message naming the problem and exit 1, without a traceback.
    """
    try:
        summary = module.run(args) or {}
    except (ConfigError, CommandError, FileNotFoundError, ManifestError, SourceError) as e:
        print(f"error: {e}", file=sys.stderr)
        if getattr(args, "json", False):
            emit_json({"error": str(e), "ok": False})
        return 1
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
    if getattr(args, "json", False):
        _stop_ray_logs()
        emit_json(summary)
    return 0 if summary.get("ok", True) else 1


def _stop_ray_logs() -> None:
    """Shut down a Ray this process started or joined, so no worker log line can follow the
    JSON summary on stdout."""
    ray = sys.modules.get("ray")
    if ray is not None and ray.is_initialized():
        ray.shutdown()


def main(argv: list[str] | None = None) -> int:
    # when the command started: the process's start for the `mmdist` executable, else now
    started_at = (process_started_at() if argv is None else None) or time.time()
    parser = build_parser()
    args = parser.parse_args(argv)
    args.started_at = started_at
    if not getattr(args, "_command", None):
        parser.print_help()
        return 2
    return run_command(importlib.import_module(COMMANDS[args._command][0]), args)


if __name__ == "__main__":
    sys.exit(main())
