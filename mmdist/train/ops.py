"""DeepSpeed's compiled ops, built once per machine at install (``make setup``) instead of at a
user's first training run.

On CPU, DeepSpeed's communication layer compiles its shared-memory collective op
(``ShareMemCommBuilder``) the first time a process group starts, into ``$TORCH_EXTENSIONS_DIR``
(the Makefile points it at ``.cache/torch_extensions``); a fresh machine's first run waited for
the compiler inside its start-up. ``python -m mmdist.train.ops`` builds it ahead of time; later
loads find it compiled. On a GPU machine DeepSpeed uses NCCL and nothing is built here.
"""

from __future__ import annotations

import contextlib
import sys
import threading
import time


def build_ops() -> dict[str, float]:
    """Build (or find already built) the ops a CPU run loads; seconds per op."""
    from mmdist.train.engine import import_deepspeed

    deepspeed = import_deepspeed()  # before deepspeed.accelerator: without MLflow
    from deepspeed.accelerator import get_accelerator
    out: dict[str, float] = {}
    if get_accelerator().device_name() != "cpu":
        return out
    builder = get_accelerator().create_op_builder("ShareMemCommBuilder")
    if builder is None or not deepspeed.ops.__compatible_ops__.get(builder.NAME, False):
        return out
    t0 = time.perf_counter()
    builder.load(verbose=False)
    out[builder.NAME] = round(time.perf_counter() - t0, 1)
    return out


def main() -> None:
    """Build the ops; says what it is doing when that takes more than a moment (the first
    time), and once they are ready. DeepSpeed's own output goes to stderr (the caller's log)."""
    from mmdist.train.engine import import_deepspeed

    screen = sys.stdout  # redirected below, for every thread: the notice goes here
    with contextlib.redirect_stdout(sys.stderr):
        import_deepspeed()  # seconds of imports: not what the notice below is about
    notice = threading.Timer(2.0, lambda: print(
        "[mmdist] building DeepSpeed's CPU ops (once per machine; about a minute)",
        file=screen, flush=True))
    notice.start()
    try:
        with contextlib.redirect_stdout(sys.stderr):  # "... built successfully" and the like
            built = build_ops()
    finally:
        notice.cancel()
    if any(v >= 2.0 for v in built.values()):
        print("[mmdist] DeepSpeed ops ready: "
              + ", ".join(f"{k} ({v:.1f} s)" for k, v in built.items()), flush=True)


if __name__ == "__main__":
    sys.exit(main())
