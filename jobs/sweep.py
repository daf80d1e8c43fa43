"""Ray job entrypoint for sweeps: the same arguments as `mmdist sweep`.

    ray job submit --working-dir . -- python jobs/sweep.py --config demo \\
        --space model.fusion=concat,attention --space train.lr=0.001,0.003
"""

import argparse
import sys

from mmdist import tune as sweep_command
from mmdist.cli import ArgumentParser, add_json_flag, run_command


def build_parser() -> ArgumentParser:
    parser = ArgumentParser(prog="jobs/sweep.py", description=__doc__,
                            formatter_class=argparse.RawDescriptionHelpFormatter)
    sweep_command.configure_parser(parser)
    add_json_flag(parser)
    return parser


def main(argv: list[str] | None = None) -> int:
    return run_command(sweep_command, build_parser().parse_args(argv))


if __name__ == "__main__":
    sys.exit(main())
