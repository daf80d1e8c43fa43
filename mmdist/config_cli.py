"""`mmdist config show|list`: print a resolved config or the shipped presets."""

from __future__ import annotations

import argparse

import yaml

from mmdist.config import list_presets, load_config


def configure_parser(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("action", choices=["show", "list"],
                        help="show: print the resolved config; list: the shipped presets")
    parser.add_argument("preset", nargs="?", default="demo", metavar="PRESET_OR_YAML",
                        help="preset name or YAML file to show (default: demo)")
    parser.add_argument("overrides", nargs="*", metavar="KEY=VALUE",
                        help="dotted overrides applied before printing, e.g. train.lr=3e-4")


def run(args: argparse.Namespace) -> dict:
    if args.action == "list":
        presets = list_presets()
        if not args.json:
            print("\n".join(presets))
        return {"presets": presets}
    cfg = load_config(args.preset, args.overrides)
    out = {"config": cfg.to_dict(), "derived": cfg.resolve()}
    if not args.json:
        print(yaml.safe_dump(out, sort_keys=False), end="")
    return out
