"""`mmdist train`'s MLflow run, opened by a helper process that starts with the command.

Ray Train cannot start before the run exists (every worker is handed its id), and opening it
costs the command about 1.8 CPU-s of imports (MLflow 1.2 s, its SQL store 0.6 s on the
2-core machine) before a single MLflow call. :class:`RunOpener` starts
``python -m mmdist.train.run_opener`` first thing: the helper imports MLflow on another core
while the command loads its config, torch and Ray, then reads one request from its stdin (the
params never appear on a command line), opens the run, logs the params, answers one JSON line
and exits.

What MLflow raised in the helper comes back as a :class:`~mmdist.errors.CommandError` naming the
store; a helper that could not start or died without answering is replaced by the same calls in
this process, so nothing is lost either way. A process that has imported MLflow already (a
notebook, the test suite) gets no helper: the calls then cost it no import.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from typing import Any

from mmdist.errors import CommandError


def open_run(uri: str, experiment: str, run_name: str, params: dict[str, Any]) -> str:
    """The run named ``run_name`` in ``experiment`` (created, or the one a resumed run had) with
    ``params`` logged: what the helper does, and the fallback here."""
    from mmdist import tracking  # heavy (MLflow): not for --help

    run_id = tracking.get_or_create_run(uri, experiment, run_name)
    tracking.log_params(uri, run_id, params)
    return run_id


class RunOpener:
    """A started helper process; :meth:`open` hands it the one request it serves."""

    def __init__(self) -> None:
        self._proc: subprocess.Popen | None = None
        if "mlflow.tracking" in sys.modules:  # loaded already (a notebook, a test): no gain
            return
        try:
            self._proc = subprocess.Popen(
                [sys.executable, "-m", "mmdist.train.run_opener"], stdin=subprocess.PIPE,
                stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
        except OSError:
            self._proc = None

    def open(self, uri: str, experiment: str, run_name: str, params: dict[str, Any]) -> str:
        """The run id (see :func:`open_run`).

        Raises:
            CommandError: MLflow refused (store unreachable, no permission); the message is
                MLflow's.
        """
        from mmdist.tracking import safe_params  # stringified here: the values MLflow gets

        request = {"uri": uri, "experiment": experiment, "run_name": run_name,
                   "params": safe_params(params)}
        reply = self._ask(request)
        if reply is None:  # no helper: the same calls, here
            return open_run(**request)
        if "error" in reply:
            raise CommandError(f"MLflow could not open run {run_name!r} of experiment "
                               f"{experiment!r} at {uri}: {reply['error']}")
        return str(reply["run_id"])

    def _ask(self, request: dict[str, Any]) -> dict[str, Any] | None:
        proc = self._proc
        if proc is None or proc.stdin is None or proc.stdout is None or proc.stdin.closed:
            return None  # no helper, or it served its one request already
        try:
            proc.stdin.write(json.dumps(request) + "\n")
            proc.stdin.close()
            # the answer, not the helper's exit: close() reaps it
            line = next((ln for ln in proc.stdout if ln.startswith("{")), "")
        except OSError:  # it died before reading: a broken pipe
            return None
        try:
            reply = json.loads(line) if line else None
        except json.JSONDecodeError:
            reply = None
        return reply if isinstance(reply, dict) and ("run_id" in reply or "error" in reply) \
            else None

    def close(self) -> None:
        """Reap the helper; stop one that was never asked (the command failed before opening
        the run)."""
        proc, self._proc = self._proc, None
        if proc is None:
            return
        try:
            proc.wait(timeout=5 if proc.stdin is not None and proc.stdin.closed else 0)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
        for pipe in (proc.stdin, proc.stdout):
            if pipe is not None:
                pipe.close()


def main() -> None:
    # the slow part first, before the request comes: MLflow's client and its SQL store
    import mlflow.store.tracking.sqlalchemy_store  # noqa: F401
    import mlflow.tracking  # noqa: F401

    import mmdist.tracking  # noqa: F401

    line = sys.stdin.readline()
    if not line.strip():
        return  # the command ended without asking
    request = json.loads(line)
    try:
        reply = {"run_id": open_run(**request)}
    except Exception as e:  # MLflow's own errors, whatever their class
        reply = {"error": f"{type(e).__name__}: {e}"}
    print(json.dumps(reply), flush=True)
    # Every call above has committed; skip the interpreter's teardown of MLflow and SQLAlchemy
    # (about 0.5 CPU-s, while the command is starting Ray Train).
    os._exit(0)


if __name__ == "__main__":
    main()
