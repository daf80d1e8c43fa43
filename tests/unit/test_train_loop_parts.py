"""The pieces the training loop is made of, without Ray or DeepSpeed: the checkpointer (save,
restore), the reporter's MLflow hand-over, fault injection, the non-finite-loss skip and the
train-loss log."""

import json
import shutil
from pathlib import Path

import pytest
import torch

from mmdist.config import load_config
from mmdist.train import checkpoint as ck
from mmdist.train.checkpointer import Checkpointer
from mmdist.train.elastic import plan_resume
from mmdist.train.faults import Faults
from mmdist.train.job import Job
from mmdist.train.loop import _TrainLossLog
from mmdist.train.optim import FiniteAdamW
from mmdist.train.reporter import Reporter
from mmdist.train.watch import NonFiniteSteps


class _Engine:
    """What the checkpointer asks of a DeepSpeed engine."""

    def __init__(self, global_steps=0):
        self.global_steps = global_steps
        self.loaded = None

    def save_checkpoint(self, d, tag):
        (Path(d) / tag).mkdir()
        (Path(d) / tag / "shard_0.pt").write_bytes(b"x" * 10)
        (Path(d) / tag / "step").write_text(str(self.global_steps))

    def load_checkpoint(self, d, tag, load_module_strict):
        self.loaded = d
        self.global_steps = int((Path(d) / tag / "step").read_text())

    def get_lr(self):
        return [0.5]


class _Reporter(Reporter):
    """A reporter whose Ray reports copy the checkpoint folder into the run folder, as Ray's
    storage does, and whose lines are kept."""

    def __init__(self, run_dir, rank=0, uri=None, run_id=None):
        super().__init__(rank, uri, run_id)
        self.run_dir, self.lines, self.reports = run_dir, [], []

    def say(self, msg):
        self.lines.append(msg)

    def report(self, metrics, checkpoint_dir=None):
        self.reports.append(metrics)
        if checkpoint_dir is not None:
            shutil.copytree(checkpoint_dir, self.run_dir / f"checkpoint_{len(self.reports):06d}")


@pytest.fixture()
def job(tmp_path):
    data = tmp_path / "data"
    (data / "tokenizer").mkdir(parents=True)
    (data / "tokenizer" / "vocab.json").write_text("{}")
    return Job(data_dir=str(data), train_rows=10, storage=str(tmp_path / "run"), run_name="r",
               vocab={"vocab_size": 10}, mlflow_run_id=None)


def test_checkpointer_save_then_restore_round_trip(job, tmp_path):
    cfg = load_config("demo", ["train.num_workers=1"])
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    reporter = _Reporter(run_dir)
    saver = Checkpointer(_Engine(global_steps=6), cfg, job, 0, 1, reporter)
    state = ck.TrainState(global_step=6, epoch=1, order_hash="h", bad_steps_total=1,
                          mlflow_pending=[["lr", 0.1, 1, 6]])
    saver.save(state, [4, 2, 9], {"val_loss": 1.5})

    assert reporter.reports == [{"val_loss": 1.5, "global_step": 6, "epoch": 1}]
    chosen, skipped = ck.choose_checkpoint(run_dir)
    assert chosen is not None and skipped == []  # complete: every listed file is there
    body = json.loads((chosen / ck.STATE_FILE).read_text())
    assert body["metrics"] == {"val_loss": 1.5, "global_step": 6, "epoch": 1}
    assert body["world_size"] == 1 and body["mlflow_pending"] == [["lr", 0.1, 1, 6]]
    assert (chosen / "tokenizer" / "vocab.json").exists()
    listed = json.loads((chosen / "files_rank0.json").read_text())["files"]
    assert "ledger_rank0.json" in listed and "files_rank0.json" not in listed

    engine = _Engine()
    got = Checkpointer(engine, cfg, job, 0, 1, _Reporter(run_dir)).restore(
        plan_resume(run_dir, 1))
    assert engine.loaded == str(chosen) and engine.global_steps == 6
    assert (got.global_step, got.epoch, got.consumed, got.order_hash) == (6, 1, {2, 4, 9}, "h")
    assert got.mlflow_pending == [["lr", 0.1, 1, 6]]
    assert got.resumes == [{"from_step": 6, "checkpoint": chosen.name, "skipped": [],
                            "from_world": 1, "world": 1}]


def test_restore_without_a_checkpoint_starts_at_step_zero(job, tmp_path):
    cfg = load_config("demo", ["train.num_workers=1"])
    state = Checkpointer(_Engine(), cfg, job, 0, 1, _Reporter(tmp_path)).restore(
        plan_resume(tmp_path, 1))
    assert state == ck.TrainState()


def test_hand_over_puts_undelivered_mlflow_values_into_the_state(tmp_path):
    (tmp_path / "file").write_text("")  # a store below a plain file can never open
    reporter = Reporter(0, f"sqlite:///{tmp_path / 'file' / 'x.db'}", "run")
    reporter.resend([["lr", 0.25, 1700000000000, 3]])
    reporter.log({"train_loss": 1.5}, step=4)
    state = ck.TrainState()
    reporter.hand_over(state)
    assert sorted((k, v, s) for k, v, _, s in state.mlflow_pending) == [
        ("lr", 0.25, 3), ("train_loss", 1.5, 4)]
    assert reporter.failed_flushes >= 1 and len(reporter.pending()) == 2
    other_rank = Reporter(1, f"sqlite:///{tmp_path / 'file' / 'x.db'}", "run")
    other_rank.log({"train_loss": 1.0}, step=4)
    other_rank.hand_over(state)  # only rank 0 talks to MLflow; the state is left alone
    assert len(state.mlflow_pending) == 2 and other_rank.pending() == []


def test_faults_count_micro_batches_and_fault_only_their_rank(tmp_path):
    env = {"MMDIST_FAULT_NAN_BATCHES": "2-3,5", "MMDIST_FAULT_RAISE_AT_STEP": "2",
           "MMDIST_FAULT_RANK": "1"}
    f = Faults.parse(env, tmp_path, rank=1)
    one = torch.tensor(1.0)
    assert [bool(torch.isnan(f.loss(one))) for _ in range(6)] == [
        False, True, True, False, True, False]
    Faults.parse(env, tmp_path, rank=0).after_step(2)  # another rank: nothing happens
    f.after_step(1)
    with pytest.raises(RuntimeError, match="deterministic error after step 2"):
        f.after_step(2)
    assert (tmp_path / ".fault-raised-at-2").read_text() == "raised\n"
    nothing = Faults.parse({}, tmp_path)
    assert nothing.loss(one) is one


def test_skipped_steps_are_counted_then_stop():
    """Fed DeepSpeed's ``skipped_steps`` after each optimizer step."""
    lines = []
    guard = NonFiniteSteps(3, lines.append, skipped=1)  # a resumed engine had skipped one
    state = ck.TrainState(global_step=5)
    for skipped in (2, 3, 3, 4, 5):
        guard.after_step(skipped, state)
    assert state.bad_steps_total == 4 and guard.in_a_row == 2
    assert lines[-1] == "step 5: non-finite loss or gradients, update skipped (2 in a row)"
    with pytest.raises(FloatingPointError, match=r"3 consecutive non-finite losses at step 5 "
                                                 r"\(train.max_bad_steps=3\)"):
        guard.after_step(6, state)


def test_finite_adamw_skips_a_non_finite_step_and_flags_it():
    w = torch.nn.Parameter(torch.ones(3))
    opt = FiniteAdamW([w], lr=0.1)
    w.grad = torch.tensor([1.0, float("nan"), 1.0])
    opt.step()
    assert opt.overflow and torch.equal(w.detach(), torch.ones(3)) and not opt.state
    w.grad = torch.tensor([1.0, 1.0, 1.0])
    opt.step()
    assert not opt.overflow and not torch.equal(w.detach(), torch.ones(3))


def test_train_loss_log_averages_the_window_and_restarts(tmp_path):
    reporter = _Reporter(tmp_path)
    log = _TrainLossLog(2, 5, torch.device("cpu"), reporter, step=0)
    for x in (1.0, 2.0, 3.0):
        log.add(torch.tensor(x))
    assert [log.due(s) for s in (1, 2, 3, 5)] == [False, True, False, True]
    out = log.log(_Engine(), ck.TrainState(global_step=2))
    assert out == {"train_loss": 2.0, "lr": 0.5}
    assert reporter.lines[-1].startswith("step 2/5  epoch 0  loss 2.0000  lr 5.00e-01")
    log.add(torch.tensor(4.0))
    log.add(torch.tensor(float("nan")))  # a skipped step's loss stays out of the mean
    assert log.log(_Engine(), ck.TrainState(global_step=4))["train_loss"] == 4.0
