"""Ray job entrypoint for training: the same arguments as `mmdist train`.

    ray job submit --working-dir . -- python jobs/train.py --config demo train.num_workers=2
"""

import argparse
import sys

from mmdist.cli import add_json_flag, run_command
from mmdist.train import run as train_command

if __name__ == "__main__":
    parser = argparse.ArgumentParser(prog="jobs/train.py", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    train_command.configure_parser(parser)
    add_json_flag(parser)
    sys.exit(run_command(train_command, parser.parse_args()))
