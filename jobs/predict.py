"""Batch inference over shards with a Ray Data actor pool; writes Parquet predictions with the
sample ids (one row per input row).

    ray job submit --working-dir . -- python jobs/predict.py --model models:/NAME@champion \\
        --data DIR --out preds/
"""

import argparse
import sys

from mmdist.cli import ArgumentParser, add_json_flag, run_command


class BatchPredict:
    @staticmethod
    def configure_parser(parser: argparse.ArgumentParser) -> None:
        parser.add_argument("--model", required=True, metavar="URI_OR_DIR",
                            help="models:/NAME@ALIAS, models:/NAME/VERSION or a model directory")
        parser.add_argument("--data", required=True, metavar="DIR",
                            help="shard directory written by `mmdist prepare`")
        parser.add_argument("--out", required=True, metavar="DIR",
                            help="output folder for Parquet predictions")
        parser.add_argument("--splits", default="train,val",
                            help="comma-separated splits to predict (default: train,val)")
        parser.add_argument("--batch-size", type=int, default=64, help="rows per model call")
        parser.add_argument("--actors", type=int, default=1, help="model replicas (default: 1)")
        parser.add_argument("--use-gpu", action="store_true", help="one GPU per actor")
        parser.add_argument("--address", default=None, help="Ray address (default: local)")
        parser.add_argument("--tracking-uri", default=None, help="MLflow tracking URI")
        parser.add_argument("--cache", default=".cache/models", help="where pulled models go")

    @staticmethod
    def run(args: argparse.Namespace) -> dict:
        from mmdist.ray_env import init_ray
        from mmdist.serve.batch import predict_distributed
        from mmdist.serve.predict import resolve_model_dir

        model_dir = resolve_model_dir(args.model, args.tracking_uri, args.cache)
        init_ray(args.address)
        s = predict_distributed(model_dir, args.data, args.out,
                                tuple(x for x in args.splits.split(",") if x),
                                args.batch_size, args.actors, args.use_gpu)
        print(f"wrote {s['rows_out']} predictions for {s['rows_in']} rows to {s['out']}")
        return {"ok": s["rows_in"] == s["rows_out"], **s}


def build_parser() -> ArgumentParser:
    parser = ArgumentParser(prog="jobs/predict.py", description=__doc__,
                            formatter_class=argparse.RawDescriptionHelpFormatter)
    BatchPredict.configure_parser(parser)
    add_json_flag(parser)
    return parser


def main(argv: list[str] | None = None) -> int:
    return run_command(BatchPredict, build_parser().parse_args(argv))


if __name__ == "__main__":
    sys.exit(main())
