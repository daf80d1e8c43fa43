"""Ray job entrypoint for training: the same arguments as `mmdist train`.

    ray job submit --working-dir . -- python jobs/train.py --config demo train.num_workers=2
"""

import argparse
import sys

from mmdist.cli import ArgumentParser, add_json_flag, run_command
from mmdist.train import run as train_command


def build_parser() -> ArgumentParser:
    parser = ArgumentParser(prog="jobs/train.py", description=__doc__,
                            formatter_class=argparse.RawDescriptionHelpFormatter)
    train_command.configure_parser(parser)
    add_json_flag(parser)
    return parser


def main(argv: list[str] | None = None) -> int:
    return run_command(train_command, build_parser().parse_args(argv))


if __name__ == "__main__":
    sys.exit(main())
