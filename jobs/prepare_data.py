"""Ray job entrypoint: `mmdist prepare` with the same arguments.

    ray job submit --working-dir . -- python jobs/prepare_data.py --source synthetic --out /data/s
"""

from __future__ import annotations

import sys

from mmdist import cli
from mmdist.data import prepare


def build_parser() -> cli.ArgumentParser:
    parser = cli.ArgumentParser(prog="prepare_data",
                                description="convert a data source into validated Parquet shards")
    prepare.configure_parser(parser)
    cli.add_json_flag(parser)
    return parser


def main(argv: list[str] | None = None) -> int:
    return cli.run_command(prepare, build_parser().parse_args(argv))


if __name__ == "__main__":
    sys.exit(main())
