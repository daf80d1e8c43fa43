"""Quiet by default: mmdist's lines on screen, everything else in the run's log file."""

import io
import logging
import os

from mmdist.console import Console, parse_step, step_line


def test_step_lines_round_trip():
    line = "[mmdist] " + step_line(40, 120, 1, 0.693147, 3e-4, 2.5)
    assert parse_step(line) == {"step": 40, "total": 120, "epoch": 1, "loss": 0.6931,
                                "lr": 3e-4, "rate": 2.5}
    assert parse_step("[mmdist] eval val_loss 0.5") is None


def test_worker_output_is_sorted_into_screen_and_file(tmp_path):
    out = io.StringIO()  # not a terminal: step lines print as lines, no bar
    log = tmp_path / "run" / "mmdist.log"
    ray_handlers = list(logging.getLogger("ray").handlers)
    with Console(log, out=out) as c:
        c.worker_output({"lines": [
            "[2026-12-03 07:31:06] [WARNING] [real_accelerator.py:213] Setting accelerator to CPU",
            "[mmdist] DeepSpeed ZeRO-0 engine ready on 1 worker(s) in 3.1 s",
            "DeepSpeed deepspeed.ops.comm.deepspeed_shm_comm_op built successfully",
            "[mmdist] " + step_line(10, 20, 0, 0.7, 1e-3, 3.0)],
            "pid": 42, "actor_name": "RayTrainWorker", "is_err": False})
        logging.getLogger("ray.train").warning("Requesting resources")  # a library logger
        logging.getLogger("mlflow.store").info("Creating initial MLflow database tables")
    shown = out.getvalue().splitlines()
    assert shown == ["[mmdist] DeepSpeed ZeRO-0 engine ready on 1 worker(s) in 3.1 s",
                     "[mmdist] step 10/20  epoch 0  loss 0.7000  lr 1.00e-03  3.00 steps/s"]
    text = log.read_text()
    for kept in ("(RayTrainWorker pid=42) DeepSpeed deepspeed.ops.comm.deepspeed_shm_comm_op",
                 "Setting accelerator to CPU", "WARNING ray.train: Requesting resources",
                 "INFO mlflow.store: Creating initial MLflow database tables",
                 "[mmdist] DeepSpeed ZeRO-0 engine ready"):
        assert kept in text, kept
    assert logging.getLogger("ray").handlers == ray_handlers  # given back as they were


def test_verbose_leaves_the_libraries_alone(tmp_path):
    before = list(logging.getLogger("mlflow").handlers)
    with Console(tmp_path / "x.log", verbose=True):
        assert logging.getLogger("mlflow").handlers == before
    assert (tmp_path / "x.log").exists()


def test_without_a_terminal_one_step_line_per_tenth_of_the_run(tmp_path):
    out = io.StringIO()
    with Console(tmp_path / "x.log", out=out) as c:
        for step in range(5, 101, 5):  # every 5 of 100 steps, as with train.log_every=5
            c.say("[mmdist] " + step_line(step, 100, 0, 0.5, 1e-3, 2.0))
    shown = [int(line.split()[2].split("/")[0]) for line in out.getvalue().splitlines()]
    assert shown == [5, 10, 20, 30, 40, 50, 60, 70, 80, 90, 100]


def test_the_logged_command_line_holds_no_secret():
    from mmdist.console import redact

    assert redact("tracking.tracking_uri=https://ann:s3cret@mlflow:5000") == (
        "tracking.tracking_uri=https://ann:***@mlflow:5000")
    assert redact("MLFLOW_TRACKING_PASSWORD=s3cret") == "MLFLOW_TRACKING_PASSWORD=***"
    assert redact("train.lr=0.003") == "train.lr=0.003"


def test_the_sweep_callback_pickles_without_its_console(tmp_path):
    """Tune pickles its callbacks into the experiment state; the console (a lock, open files)
    stays behind."""
    import pickle

    from mmdist.tune.progress import TrialLines

    with Console(tmp_path / "x.log") as c:
        lines = TrialLines(c, total=4, metric="val_accuracy")
        lines.done = 2
        again = pickle.loads(pickle.dumps(lines))
    assert (again.console, again.done, again.total, again.metric) == (None, 2, 4, "val_accuracy")


def test_native_stderr_goes_to_the_log_and_comes_back(tmp_path, capfd):
    """Native code (Ray's C++ core worker) writes to file descriptor 2, not sys.stderr."""
    log = tmp_path / "x.log"
    with Console(log):
        os.write(2, b"core_worker.cc: a native note\n")
    os.write(2, b"after the command\n")
    assert "core_worker.cc: a native note" in log.read_text()
    err = capfd.readouterr().err
    assert "a native note" not in err and "after the command" in err
