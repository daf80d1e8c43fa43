"""What a run shows: mmdist's own lines, a progress bar of the training steps and the closing
summary. Everything the libraries say (Ray, Ray Train's controller, DeepSpeed, torch, MLflow,
the workers' stdout and stderr) goes to the run's log file instead; ``--verbose`` shows it all
as Ray prints it.

Workers reach the driver through Ray's log forwarding: rank 0 prints ``[mmdist] ...`` lines
(:func:`step_line` for the step lines) and the driver sorts every forwarded line here: to the
screen (mmdist's lines; step lines become the bar on a terminal) and to the log file (all).
"""

from __future__ import annotations

import logging
import os
import re
import sys
import threading
import time
import warnings
from pathlib import Path
from typing import Any, TextIO

PREFIX = "[mmdist] "
# progress bars of the driver's libraries, off for the command (the file is no terminal)
QUIET_ENV = {"RAY_DATA_DISABLE_PROGRESS_BARS": "1", "MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR": "false"}
# the libraries whose Python logging goes to the log file (their children follow)
LIBRARY_LOGGERS = ("ray", "deepspeed", "mlflow", "alembic", "urllib3", "torch", "transformers",
                   "filelock", "py.warnings", "fsspec", "asyncio", "httpx")
_STEP = re.compile(r"^\[mmdist\] step (\d+)/(\d+)  epoch (\d+)  loss (\S+)  lr (\S+)  "
                   r"(\S+) steps/s$")
# Ray's driver-side dispatcher of forwarded worker output (a private API: used only where it
# is known to exist, else Ray prints the workers' lines itself, as with --verbose)
_RAY_DISPATCH = "ray._private.ray_logging"
_URL_SECRET = re.compile(r"(://[^/\s:@]+:)[^@\s]+@")
_SECRET_KEY = re.compile(r"password|secret|token|api_key", re.I)
_RAY_HANDLER = "ray_print_logs"


def redact(arg: str) -> str:
    """A command-line word fit for a log: no password in a URL, no value of a secret key."""
    arg = _URL_SECRET.sub(r"\1***@", arg)
    key, eq, _ = arg.partition("=")
    return f"{key}=***" if eq and _SECRET_KEY.search(key) else arg


def step_line(step: int, total: int, epoch: int, loss: float, lr: float, rate: float) -> str:
    """The progress line of a logging step (rank 0 prints it; :class:`Console` reads it)."""
    return (f"step {step}/{total}  epoch {epoch}  loss {loss:.4f}  lr {lr:.2e}  "
            f"{rate:.2f} steps/s")


def parse_step(line: str) -> dict[str, Any] | None:
    """``step_line``'s values from a printed line, else None."""
    m = _STEP.match(line.strip())
    if not m:
        return None
    return {"step": int(m[1]), "total": int(m[2]), "epoch": int(m[3]), "loss": float(m[4]),
            "lr": float(m[5]), "rate": float(m[6])}


class Console:
    """Quiet by default, for one command: ``with Console(log_file, verbose) as c: ...``.

    Library loggers write to ``log_file`` (appended: a resumed run continues the same file);
    call :meth:`attach_ray` once Ray is connected so worker output is sorted too.
    """

    def __init__(self, log_file: str | Path, verbose: bool = False,
                 out: TextIO | None = None, worker_lines: bool = True):
        self.log_file = Path(log_file)
        self.verbose = verbose
        self.worker_lines = worker_lines  # a sweep's trials: only to the file
        self.out = out or sys.stdout
        self._lock = threading.Lock()
        self._bar = None
        self._saved: list[tuple[logging.Logger, list[logging.Handler], bool, int]] = []
        self._file: TextIO | None = None
        self._handler: logging.Handler | None = None
        self._attached = False
        self._tenth = -1  # the last tenth of the run a step line was shown for (no terminal)
        self._stderr: TextIO | None = None
        self._fd2: int | None = None  # the screen's file descriptor 2, while it points here
        self._env: dict[str, str | None] = {}

    # -- set-up and tear-down -------------------------------------------------------------
    def __enter__(self) -> Console:
        self.log_file.parent.mkdir(parents=True, exist_ok=True)
        self._file = open(self.log_file, "a", encoding="utf-8", buffering=1)  # noqa: SIM115
        self._file.write(f"\n===== {time.strftime('%Y-%m-%d %H:%M:%S')} "
                         f"{' '.join(map(redact, sys.argv))}\n")
        self._handler = logging.StreamHandler(self._file)
        self._handler.setFormatter(logging.Formatter(
            "%(asctime)s %(levelname)s %(name)s: %(message)s"))
        if not self.verbose:
            # what libraries print to stderr themselves (MLflow's registration notes, Ray
            # Data's and MLflow's download bars, warnings) and loggers made from now on
            self._stderr, sys.stderr = sys.stderr, self._file
            # and what native code writes to file descriptor 2: Ray's C++ core worker logs
            # its errors there, e.g. its note on every Ray Data actor pool (Ray issue 53727)
            sys.__stderr__.flush()
            self._fd2 = os.dup(2)
            os.dup2(self._file.fileno(), 2)
            for key, value in QUIET_ENV.items():
                self._env[key] = os.environ.get(key)
                os.environ[key] = value
            self.route_loggers()
        return self

    def __exit__(self, *exc) -> None:
        self.close_bar()
        self.detach_ray()
        if self._stderr is not None:
            sys.stderr, self._stderr = self._stderr, None
        if self._fd2 is not None:
            self._file.flush()
            os.dup2(self._fd2, 2)
            os.close(self._fd2)
            self._fd2 = None
        for key, value in self._env.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value
        self._env.clear()
        for logger, handlers, propagate, level in self._saved:
            logger.handlers[:] = handlers
            logger.propagate = propagate
            logger.setLevel(level)
        self._saved.clear()
        logging.captureWarnings(False)
        if self._file:
            self._file.close()
            self._file = None

    def route_loggers(self) -> None:
        """Library loggers -> the log file only (call again after ``ray.init``, which sets up
        Ray's logger anew). Python warnings go there too."""
        if self.verbose or self._handler is None:
            return
        done = {id(s[0]) for s in self._saved}
        for name in LIBRARY_LOGGERS:
            logger = logging.getLogger(name)
            if id(logger) not in done:
                self._saved.append((logger, list(logger.handlers), logger.propagate,
                                    logger.level))
            logger.handlers[:] = [self._handler]
            logger.propagate = False
            if logger.level == logging.NOTSET or logger.level > logging.INFO:
                logger.setLevel(logging.INFO)
        logging.captureWarnings(True)
        warnings.simplefilter("default")

    def attach_ray(self) -> bool:
        """Sort the workers' forwarded output here instead of Ray printing it; False (Ray
        prints it as usual) with --verbose or where Ray's dispatcher is not the one known."""
        self.route_loggers()
        if self.verbose or self._attached:
            return self._attached
        try:
            import importlib

            dispatcher = importlib.import_module(_RAY_DISPATCH).global_worker_stdstream_dispatcher
            names = [name for name, _ in dispatcher.handlers]
        except (ImportError, AttributeError, TypeError, ValueError):
            return False
        if _RAY_HANDLER not in names:  # not forwarding to this driver (log_to_driver=False)
            return False
        dispatcher.remove_handler(_RAY_HANDLER)
        dispatcher.add_handler(_RAY_HANDLER, self.worker_output)
        self._dispatcher, self._attached = dispatcher, True
        return True

    def detach_ray(self) -> None:
        if self._attached:
            self._dispatcher.remove_handler(_RAY_HANDLER)  # Ray is disconnecting anyway
            self._attached = False

    # -- output ------------------------------------------------------------------------------
    def worker_output(self, data: dict[str, Any]) -> None:
        """One batch of forwarded worker output (Ray's dict: ``lines``, ``pid``, ``is_err``,
        ``actor_name`` / ``task_name``): all of it to the file, mmdist's lines to the screen."""
        who = data.get("actor_name") or data.get("task_name") or "worker"
        source = f"({who} pid={data.get('pid')}{' stderr' if data.get('is_err') else ''})"
        with self._lock:
            if self._file:
                self._file.writelines(f"{source} {line}\n" for line in data.get("lines", []))
        for line in data.get("lines", []) if self.worker_lines else []:
            if line.startswith(PREFIX):
                self.say(line)

    def say(self, line: str) -> None:
        """An mmdist line: a step line moves the bar (on a terminal; elsewhere one line per
        tenth of the run is shown), others print above it."""
        step = parse_step(line)
        with self._lock:
            if step and self.out.isatty():
                self._advance(step)
                return
            if step:
                tenth = step["step"] * 10 // max(step["total"], 1)
                if tenth <= self._tenth and step["step"] != step["total"]:
                    return
                self._tenth = tenth
            if self._bar is not None:
                self._bar.write(line, file=self.out)
            else:
                print(line, file=self.out, flush=True)

    def count(self, what: str, n: int, total: int) -> None:
        """Move a bar of ``what`` to ``n`` of ``total`` (on a terminal; else nothing)."""
        if self.out.isatty():
            with self._lock:
                self._advance({"step": n, "total": total}, what)

    def _advance(self, s: dict[str, Any], what: str = "train") -> None:
        from tqdm import tqdm  # light, but only a terminal needs it

        if self._bar is None or self._bar.total != s["total"]:
            self.close_bar()
            self._bar = tqdm(total=s["total"], unit="step" if what == "train" else what,
                             desc=what, file=self.out, dynamic_ncols=True, leave=True)
        self._bar.n = s["step"]  # a retry resumes from a checkpoint: steps may go back
        if "loss" in s:
            self._bar.set_postfix(epoch=s["epoch"], loss=f"{s['loss']:.4f}",
                                  rate=f"{s['rate']:.2f}/s", refresh=False)
        self._bar.refresh()

    def close_bar(self) -> None:
        if self._bar is not None:
            self._bar.close()
            self._bar = None
