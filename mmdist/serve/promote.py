"""`mmdist promote`: point an alias of a registered model at a version.

    mmdist promote models:/mmdist-demo/3 --alias champion

Registration sets ``champion`` or ``challenger`` itself; when it could not tell whether a new
version beats the champion (MLflow down, no permission) it registers the version without an alias
and prints this command to run once MLflow answers.
"""

from __future__ import annotations

import argparse
from typing import Any

from mmdist import tracking
from mmdist.errors import CommandError


def configure_parser(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("uri", help="models:/NAME/VERSION, the version the alias should point at")
    parser.add_argument("--alias", default="champion",
                        help="alias to set, e.g. champion or challenger (default: champion)")
    parser.add_argument("--tracking-uri", default=None,
                        help="MLflow tracking URI (default: $MLFLOW_TRACKING_URI, else the local "
                             "store ./mlflow.db)")


def run(args: argparse.Namespace) -> dict[str, Any]:
    from mlflow.exceptions import MlflowException  # heavy: not loaded for --help

    from mmdist.train.register import promote

    uri = args.tracking_uri or tracking.tracking_uri()
    try:
        out = promote(uri, args.uri, args.alias)
    except ValueError as e:
        raise CommandError(str(e)) from None
    except MlflowException as e:
        raise CommandError(f"{args.uri}: {e.message}") from None
    print(f"[mmdist] {out['alias_uri']} -> {args.uri}")
    return {"ok": True, **out, "tracking_uri": uri}
