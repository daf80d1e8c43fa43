"""`mmdist cache build|ls|rm`: the frozen-encoder feature cache (``mmdist.data.feature_cache``).

    mmdist cache build --config my.yaml data.path=shards model.freeze=[image_encoder]
    mmdist cache ls                      # entries under ./runs/feature_cache, with sizes
    mmdist cache rm 3f2a... | --all

Training, evaluation and sweep trials build the entry of their key on first use when
``data.feature_cache`` is auto or require; ``build`` does it ahead of time (the same key).
"""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

from mmdist.config import load_config
from mmdist.console import Console
from mmdist.data.feature_cache import CACHE_DIR, cache_root, list_entries, remove_entries
from mmdist.errors import CommandError
from mmdist.ray_env import release_ray

# where `cache build` writes Ray's, Ray Data's and the encoders' own output (in the cache folder)
BUILD_LOG = "build.log"


def configure_parser(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("action", choices=("build", "ls", "rm"),
                        help="build: compute the entry of --config's key (as "
                             "data.feature_cache=require unless the config sets it); ls: list "
                             "entries and sizes; rm: remove entries")
    parser.add_argument("keys", nargs="*", metavar="KEY_OR_OVERRIDE",
                        help="rm: entry keys (as `ls` prints them); build: KEY=VALUE config "
                             "overrides")
    parser.add_argument("--config", "-c", default="demo", metavar="PRESET_OR_YAML",
                        help="a preset name or YAML file: its key (build), its storage (ls, rm)")
    parser.add_argument("--all", action="store_true", help="rm: remove every entry")
    parser.add_argument("--root", default=None,
                        help="the cache folder (default: <train.storage_path of --config, else "
                             f"./runs>/{CACHE_DIR})")
    parser.add_argument("--address", default=None,
                        help="build: Ray cluster address (default: $RAY_ADDRESS, else a local "
                             "Ray)")
    parser.add_argument("--num-cpus", type=int, default=None,
                        help="build: logical CPUs of a local Ray started here (default: all)")
    parser.add_argument("--verbose", action="store_true",
                        help="build: show Ray's and the encoders' own output as Ray prints it "
                             f"(default: in <cache folder>/{BUILD_LOG})")


def _human(n: int) -> str:
    for unit in ("B", "KiB", "MiB", "GiB"):
        if n < 1024 or unit == "GiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return str(n)


def run(args: argparse.Namespace) -> dict[str, Any]:
    overrides = [k for k in args.keys if "=" in k]
    keys = [k for k in args.keys if "=" not in k]
    cfg = load_config(args.config, overrides)
    root = Path(args.root).resolve() if args.root else cache_root(cfg)
    if args.action == "ls":
        entries = list_entries(root)
        for e in entries:
            state = "" if e["complete"] else "  (unfinished)"
            print(f"{e['key']}  {_human(e['bytes']):>10}  {e['rows'] or 0:>8} rows  "
                  f"{','.join(e['modalities']) or '-':<16} {e['built_at'] or '-'}  "
                  f"{e['source'] or ''}{state}")
        print(f"{len(entries)} entr{'y' if len(entries) == 1 else 'ies'}, "
              f"{_human(sum(e['bytes'] for e in entries))} under {root}")
        return {"root": str(root), "entries": entries}
    if args.action == "rm":
        if not keys and not args.all:
            raise CommandError("mmdist cache rm: name entry keys (see `mmdist cache ls`) or "
                               "--all")
        removed = remove_entries(root, ["all"] if args.all else keys)
        for e in removed:
            print(f"removed {e['key']} ({_human(e['bytes'])})")
        return {"root": str(root), "removed": [e["key"] for e in removed],
                "bytes": sum(e["bytes"] for e in removed)}
    with Console(root / BUILD_LOG, verbose=args.verbose) as console:
        summary = build(cfg, args.address, args.num_cpus, console)
        release_ray()
    if not args.verbose:
        print(f"[mmdist] Ray's and the encoders' own output: {root / BUILD_LOG}", flush=True)
    return {**summary, "log_file": str(root / BUILD_LOG)}


def build(cfg: Any, address: str | None, num_cpus: int | None,
          console: Console | None = None) -> dict[str, Any]:
    """Build (or verify) the entry of ``cfg``'s key; the summary of `cache build`.
    ``console`` (the CLI's) sorts what Ray forwards from the encoder actors."""
    from mmdist.models.feature_build import feature_cache_for  # Ray, torch: not for --help
    from mmdist.ray_env import init_ray
    from mmdist.train.run import check_data, ensure_data
    from mmdist.train.startable import with_data_defaults

    if cfg.data.feature_cache == "off":
        cfg = cfg.override({"data.feature_cache": "require"})
    data_dir = ensure_data(cfg)
    manifest = check_data(data_dir, cfg)  # verified here: the build reads it, unhashed
    cfg = with_data_defaults(cfg, manifest)
    init_ray(address, num_cpus)
    if console:
        console.attach_ray()
    cache = feature_cache_for(cfg, data_dir, source=manifest)
    if cache is None:
        raise CommandError("nothing to cache: no frozen pretrained encoder in this config")
    return {"key": cache["key"], "entry": cache["entry"], "rows": cache["rows"],
            "modalities": cache["modalities"], "build_seconds": cache.get("build_seconds")}
