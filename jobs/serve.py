"""Ray job entrypoint for serving: the same arguments as `mmdist serve`.

    ray job submit --working-dir . -- python jobs/serve.py models:/NAME@champion --detach

Under `ray job submit` the job joins the cluster ($RAY_ADDRESS); with ``--detach`` it ends once
the model answers and the Serve application keeps running on the cluster.
"""

import argparse
import sys

from mmdist.cli import ArgumentParser, add_json_flag, run_command
from mmdist.serve import deploy


def build_parser() -> ArgumentParser:
    parser = ArgumentParser(prog="jobs/serve.py", description=__doc__,
                            formatter_class=argparse.RawDescriptionHelpFormatter)
    deploy.configure_parser(parser)
    add_json_flag(parser)
    return parser


def main(argv: list[str] | None = None) -> int:
    return run_command(deploy, build_parser().parse_args(argv))


if __name__ == "__main__":
    sys.exit(main())
