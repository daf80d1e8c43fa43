"""What resumes at another world size and what is refused (mmdist.train.elastic), and how the
LR schedule's length and the run's end are planned; no Ray, no DeepSpeed."""

import shutil

import pytest

from mmdist.config import load_config
from mmdist.errors import CommandError
from mmdist.train import checkpoint as ck
from mmdist.train.elastic import plan_resume, schedule_steps, steps_to_run
from mmdist.train.loop import steps_per_epoch, total_steps


def _checkpoint(run, name="checkpoint_a", step=4, world=2, stage=2, model=None, **state):
    """A complete checkpoint folder as ``world`` ranks write it (what the rules read)."""
    d = run / name
    for rank in range(world):
        part = run.parent / "parts" / f"{name}-rank{rank}"
        (part / "ds").mkdir(parents=True)
        (part / "ds" / f"shard_{rank}.pt").write_bytes(b"x" * 10)
        if rank == 0:
            ck.write_state(part, ck.TrainState(global_step=step, **state), {
                "world_size": world, "zero_stage": stage,
                "config": {"model": model or {"fusion": "concat"}}})
        ck.write_file_list(part, rank)
        shutil.copytree(part, d, dirs_exist_ok=True)
    return d


@pytest.mark.parametrize("saved,now", [((2, 2), (1, 2)), ((2, 2), (3, 2)), ((2, 1), (3, 2)),
                                       ((3, 1), (2, 1)), ((1, 0), (2, 0))])
def test_zero_1_and_2_resume_at_another_world_size(tmp_path, saved, now):
    d = _checkpoint(tmp_path / "run", world=saved[0], stage=saved[1])
    ck.check_resume(d, now[0], now[1], {"fusion": "concat"})  # no refusal
    plan = plan_resume(tmp_path / "run", now[0])
    assert plan.checkpoint == d and plan.saved_world == saved[0]
    assert plan.universal is (saved[1] != 0)  # ZeRO-0 state is whole: it loads as it is


@pytest.mark.parametrize("saved,now,why", [
    ((2, 3), (1, 3), r"a ZeRO-3 checkpoint resumes at the world size that wrote it only .* "
                     r"train\.num_workers=2"),
    ((2, 2), (4, 3), r"ZeRO-2 -> ZeRO-3: a ZeRO-3 checkpoint"),
    ((1, 0), (2, 2), r"written at ZeRO-0, where the optimizer state is one unpartitioned copy "
                     r".* train\.zero_stage=0"),
    ((2, 2), (1, 0), r"loads into a ZeRO-1/2 engine only, and this run is ZeRO-0\. Set "
                     r"train\.zero_stage=2 and train\.zero_on_one_worker=true"),
])
def test_what_cannot_be_converted_is_refused_naming_why(tmp_path, saved, now, why):
    d = _checkpoint(tmp_path / "run", world=saved[0], stage=saved[1])
    with pytest.raises(ValueError, match=rf"written by {saved[0]} worker\(s\) and this run has "
                                         rf"{now[0]}.*{why}"):
        ck.check_resume(d, now[0], now[1], {"fusion": "concat"})


def test_another_model_is_refused_at_another_world_size_too(tmp_path):
    d = _checkpoint(tmp_path / "run")
    with pytest.raises(ValueError, match=r"model\.fusion \('concat' there, 'film' here\)"):
        ck.check_resume(d, 3, 2, {"fusion": "film"})


def test_resume_on_one_worker_keeps_zero_2_and_says_why(tmp_path, capsys):
    from mmdist.train.run import check_resumable

    cfg = load_config("tiny", ["train.num_workers=1", "train.zero_stage=2"])
    _checkpoint(tmp_path / "run", world=2, stage=2, model=cfg.to_dict()["model"])
    got = check_resumable(cfg, tmp_path / "run")
    assert got.train.zero_on_one_worker and got.train.zero_stage_at() == 2
    out = capsys.readouterr().out
    assert "universal checkpoint, which loads into a ZeRO-1/2 engine only" in out
    assert "resumes from checkpoint_a, written by 2 worker(s), on 1 at ZeRO-2" in out
    refused = cfg.override({"model.fusion": "attention"})
    with pytest.raises(CommandError, match=r"run run: cannot resume .* model\.fusion"):
        check_resumable(refused, tmp_path / "run")


def test_the_schedule_is_planned_at_the_first_world_size(tmp_path):
    run = tmp_path / "run"
    assert plan_resume(run, 3).schedule_world == 3  # a fresh run plans at its own size
    _checkpoint(run, world=2)  # written before schedule_world was recorded: its own size
    assert plan_resume(run, 1).schedule_world == 2
    _checkpoint(run, "checkpoint_b", step=8, world=1, schedule_world=2)
    assert plan_resume(run, 3).schedule_world == 2  # kept through a resume on 1 worker


@pytest.mark.parametrize("over", [["train.max_steps=7"], ["train.max_steps=0", "train.epochs=2"],
                                  ["train.max_steps=0", "train.epochs=3",
                                   "train.global_batch_size=64"]])
def test_schedule_steps_at_the_run_s_own_size_is_the_run_s_total(over):
    for workers in (1, 2, 4):
        cfg = load_config("tiny", [f"train.num_workers={workers}", *over])
        assert schedule_steps(cfg.train, 1000, workers) == total_steps(cfg, 1000, workers)


def test_a_run_counting_epochs_trains_every_epoch_at_another_world_size():
    t = load_config("tiny", ["train.num_workers=1", "train.max_steps=0",
                             "train.epochs=2"]).train
    planned = schedule_steps(t, 320, 2)  # 2 epochs x 10 steps at 2 workers
    here = schedule_steps(t, 320, 1)  # 2 epochs x 20 steps at 1
    assert (planned, here) == (20, 40)
    # resumed at step 4 in epoch 0: 2 epochs of 20 steps bound the run, the data ends it
    assert steps_to_run(planned, here, t, 4, 0, 20) == 44
    assert steps_to_run(planned, planned, t, 4, 0, 20) == 20  # same size: the plan
    fixed = load_config("tiny", ["train.max_steps=9"]).train
    assert steps_to_run(9, 9, fixed, 4, 0, 20) == 9  # max_steps ends the run anywhere


def test_steps_per_epoch_matches_the_planned_schedule():
    cfg = load_config("tiny", ["train.num_workers=2", "train.max_steps=0", "train.epochs=1"])
    assert schedule_steps(cfg.train, 288, 2) == steps_per_epoch(cfg, 288, 2) == 9
