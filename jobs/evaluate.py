"""Ray job entrypoint for evaluation: the same arguments as `mmdist evaluate`.

    ray job submit --working-dir . -- python jobs/evaluate.py --model models:/NAME@champion --data DIR
"""

import argparse
import sys

from mmdist import evaluate
from mmdist.cli import add_json_flag, run_command

if __name__ == "__main__":
    parser = argparse.ArgumentParser(prog="jobs/evaluate.py", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    evaluate.configure_parser(parser)
    add_json_flag(parser)
    sys.exit(run_command(evaluate, parser.parse_args()))
