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
import sys
from typing import Any

# name -> (module, one-line help). A dict you can read; no registration on import.
COMMANDS: dict[str, tuple[str, str]] = {
    "prepare": ("mmdist.data.prepare", "convert a data source into validated Parquet shards"),
    "train": ("mmdist.train.run", "train a fused model on Ray Train + DeepSpeed, register it"),
    "sweep": ("mmdist.tune", "Ray Tune sweep over fusion method x stage x learning rate"),
    "evaluate": ("mmdist.evaluate", "score a registered model on a shard set"),
    "pull": ("mmdist.serve.pull", "download a registered model into a self-contained folder"),
    "predict": ("mmdist.serve.predict", "run a model on one image/audio/text example"),
    "bench": ("mmdist.bench", "benchmarks: ingest, train, zero, mfu, sweep"),
    "preflight": ("mmdist.preflight", "check a cluster can run a config before submitting"),
    "config": ("mmdist.config_cli", "show the resolved config of a preset or YAML file"),
}


class CommandError(RuntimeError):
    """An error meant for the user: printed without a traceback, exit code 1."""


class ArgumentParser(argparse.ArgumentParser):
    """argparse's parser that takes flags and positionals in any order.

    ``mmdist sweep --space model.fusion=concat,add train.num_workers=1 --json`` puts a
    ``KEY=VALUE`` override after a flag; plain argparse stops the positionals at the first flag
    and refuses the rest as unrecognized. A parser without sub-commands parses intermixed
    (``parse_known_intermixed_args``); one with sub-commands parses as usual up to the command
    name, and the command's own parser (of this class too: ``add_subparsers`` makes its
    parsers of the parent's class) then takes the rest intermixed. Used by ``mmdist`` and by
    every ``jobs/*.py`` entrypoint.
    """

    _intermixing = False

    def parse_known_args(self, args=None, namespace=None):
        # argparse's intermixed parsing refuses sub-parsers, and in Python 3.11 it calls
        # parse_known_args itself: both go to the plain parse.
        if self._intermixing or self._subparsers is not None:
            return super().parse_known_args(args, namespace)
        self._intermixing = True
        try:
            return self.parse_known_intermixed_args(args, namespace)
        finally:
            self._intermixing = False


def add_json_flag(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--json", action="store_true",
                        help="print a one-line JSON summary as the last line of stdout")


def add_config_arguments(parser: argparse.ArgumentParser, default: str = "demo") -> None:
    """The shared `--config PRESET_OR_YAML key=value ...` arguments."""
    parser.add_argument("--config", "-c", default=default, metavar="PRESET_OR_YAML",
                        help=f"a preset name shipped with mmdist or a YAML file (default: {default})")
    parser.add_argument("overrides", nargs="*", metavar="KEY=VALUE",
                        help="dotted config overrides, e.g. model.fusion=attention train.lr=3e-4")


def load_module(module_name: str):
    """The module of a command, or None when that feature has not landed yet."""
    try:
        return importlib.import_module(module_name)
    except ModuleNotFoundError as e:
        if e.name and module_name.startswith(e.name):
            return None
        raise


def _load_command(name: str):
    return load_module(COMMANDS[name][0])


def add_command_parsers(sub, table: dict[str, tuple[str, str]], dest: str | None = None) -> None:
    """One sub-parser per ``name -> (module, help)`` entry, with the module's flags and --json.

    ``dest``: a default set to the entry's name on the parsed arguments (e.g. ``_command``).
    """
    for name, (module_name, help_text) in table.items():
        module = load_module(module_name)
        p = sub.add_parser(name, help=help_text if module else f"{help_text} (not landed yet)",
                           description=help_text)
        if module is not None:
            module.configure_parser(p)
        add_json_flag(p)
        if dest:
            p.set_defaults(**{dest: name})


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


def run_command(module: Any, args: argparse.Namespace) -> int:
    """Run one command module with user-facing error handling; used by cli and jobs/.

    Errors about the user's input (config, files, shard sets, data sources) print one
    ``error: ...`` message naming the problem and exit 1, without a traceback.
    """
    from mmdist.config import ConfigError
    from mmdist.data.shards import ManifestError
    from mmdist.data.sources import SourceError

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
    parser = build_parser()
    args = parser.parse_args(argv)
    if not getattr(args, "_command", None):
        parser.print_help()
        return 2
    module = _load_command(args._command)
    if module is None:
        msg = f"mmdist {args._command}: this feature has not landed yet"
        print(msg, file=sys.stderr)
        if args.json:
            emit_json({"error": msg, "ok": False})
        return 2
    return run_command(module, args)


if __name__ == "__main__":
    # `python -m mmdist.cli`: run the imported module's main, so CommandError raised by command
    # modules (which import mmdist.cli) is the class run_command catches, not __main__'s copy.
    from mmdist.cli import main as _main

    sys.exit(_main())
