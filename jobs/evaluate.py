"""Ray job entrypoint for evaluation: the same arguments as `mmdist evaluate`.

    ray job submit --working-dir . -- python jobs/evaluate.py --model models:/NAME@champion --data DIR
"""

import argparse
import sys

from mmdist import evaluate
from mmdist.cli import ArgumentParser, add_json_flag, run_command


def build_parser() -> ArgumentParser:
    parser = ArgumentParser(prog="jobs/evaluate.py", description=__doc__,
                            formatter_class=argparse.RawDescriptionHelpFormatter)
    evaluate.configure_parser(parser)
    add_json_flag(parser)
    return parser


def main(argv: list[str] | None = None) -> int:
    return run_command(evaluate, build_parser().parse_args(argv))


if __name__ == "__main__":
    sys.exit(main())
