"""The arguments every command shares: the parser class, ``--config`` + ``key=value``
overrides, ``--json``, and one sub-parser per command module (``mmdist``, ``mmdist bench``).

Below every command module, so commands and ``jobs/*.py`` use it without importing the CLI.
"""

from __future__ import annotations

import argparse
import importlib


def repeated_override(overrides: list[str]) -> str | None:
    """The problem of a ``key=value`` list that sets one key to two different values (which
    one was meant is a guess), or None."""
    seen: dict[str, str] = {}
    for item in overrides:
        if "=" not in item:
            continue
        k, v = (x.strip() for x in item.split("=", 1))
        if k in seen and seen[k] != v:
            return (f"{k} is given twice ({k}={seen[k]}, then {k}={v}); keep the one you mean")
        seen[k] = v
    return None


class ArgumentParser(argparse.ArgumentParser):
    """argparse's parser that takes flags and positionals in any order.

    ``mmdist sweep --space model.fusion=concat,add train.num_workers=1 --json`` puts a
    ``KEY=VALUE`` override after a flag; plain argparse stops the positionals at the first flag
    and refuses the rest as unrecognized. A parser without sub-commands parses intermixed
    (``parse_known_intermixed_args``); one with sub-commands parses as usual up to the command
    name, and the command's own parser (of this class too: ``add_subparsers`` makes its
    parsers of the parent's class) then takes the rest intermixed. Used by ``mmdist`` and by
    every ``jobs/*.py`` entrypoint. A ``KEY=VALUE`` list that sets one key to two different
    values is refused, naming the key (:func:`repeated_override`).
    """

    _intermixing = False

    def parse_known_args(self, args=None, namespace=None):
        # argparse's intermixed parsing refuses sub-parsers, and in Python 3.11 it calls
        # parse_known_args itself: both go to the plain parse.
        if self._intermixing or self._subparsers is not None:
            return super().parse_known_args(args, namespace)
        self._intermixing = True
        try:
            ns, rest = self.parse_known_intermixed_args(args, namespace)
        finally:
            self._intermixing = False
        problem = repeated_override(getattr(ns, "overrides", None) or [])
        if problem:
            self.error(problem)
        return ns, rest


def add_json_flag(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--json", action="store_true",
                        help="print a one-line JSON summary as the last line of stdout")


def add_ray_arguments(parser: argparse.ArgumentParser, address: bool = True,
                      num_cpus: bool = True) -> None:
    """``--address`` (the Ray cluster to join) and ``--num-cpus`` (the local Ray's CPUs), as
    every command that starts or joins Ray takes them (:func:`mmdist.ray_env.init_ray`)."""
    if address:
        parser.add_argument("--address", default=None,
                            help="Ray cluster address (default: $RAY_ADDRESS, else a local Ray)")
    if num_cpus:
        parser.add_argument("--num-cpus", type=int, default=None,
                            help="logical CPUs of the local Ray this command starts when it "
                                 "joins none (default: all cores)")


def add_config_arguments(parser: argparse.ArgumentParser, default: str = "demo") -> None:
    """The shared `--config PRESET_OR_YAML key=value ...` arguments."""
    parser.add_argument("--config", "-c", default=default, metavar="PRESET_OR_YAML",
                        help=f"a preset name shipped with mmdist or a YAML file (default: {default})")
    parser.add_argument("overrides", nargs="*", metavar="KEY=VALUE",
                        help="dotted config overrides, e.g. model.fusion=attention train.lr=3e-4")


def add_command_parsers(sub, table: dict[str, tuple[str, str]], dest: str | None = None) -> None:
    """One sub-parser per ``name -> (module, help)`` entry, with the module's flags and --json.

    ``dest``: a default set to the entry's name on the parsed arguments (e.g. ``_command``).
    """
    for name, (module_name, help_text) in table.items():
        p = sub.add_parser(name, help=help_text, description=help_text)
        importlib.import_module(module_name).configure_parser(p)
        add_json_flag(p)
        if dest:
            p.set_defaults(**{dest: name})
