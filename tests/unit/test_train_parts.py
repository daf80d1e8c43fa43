"""Training pieces that need no cluster: the DeepSpeed config, the schedule, the data position."""

import shutil

import pytest
import torch

from mmdist.config import load_config
from mmdist.train import checkpoint as ck
from mmdist.train.deepspeed_config import deepspeed_config
from mmdist.train.loop import _skip_consumed, steps_per_epoch, total_steps
from mmdist.train.optim import warmup_cosine


def test_deepspeed_config_comes_from_train_config():
    cfg = load_config("demo", ["train.num_workers=2", "train.micro_batch_size=8",
                               "train.global_batch_size=64", "train.zero_stage=3",
                               "train.precision=bf16", "train.grad_clip=0.5"])
    ds = deepspeed_config(cfg)
    assert ds["train_batch_size"] == 64
    assert ds["train_micro_batch_size_per_gpu"] == 8
    assert ds["gradient_accumulation_steps"] == 4
    assert ds["zero_optimization"]["stage"] == 3
    assert ds["bf16"]["enabled"] and not ds["fp16"]["enabled"]
    assert ds["gradient_clipping"] == 0.5
    assert "optimizer" not in ds and "scheduler" not in ds  # built in Python, one lr source
    with pytest.raises(ValueError, match="multiple"):
        deepspeed_config(cfg, world_size=3)


def test_bf16_without_zero_is_torch_autocast_over_fp32_weights():
    """DeepSpeed's BF16 optimizer copies every gradient and weight between bf16 and an fp32
    master copy each step; without ZeRO, autocast does what a plain PyTorch loop does."""
    from mmdist.train.optim import FiniteAdamW, build_optimizer

    one = load_config("demo", ["train.num_workers=1", "train.precision=bf16"])
    ds = deepspeed_config(one)
    assert ds["zero_optimization"]["stage"] == 0
    assert not ds["bf16"]["enabled"]
    assert ds["torch_autocast"] == {"enabled": True, "dtype": "bfloat16"}
    # the step goes straight to the client optimizer: it clips and skips non-finite steps
    # itself, so DeepSpeed's own clipping is off
    opt, _ = build_optimizer(torch.nn.Linear(2, 2), one, total_steps=4)
    assert isinstance(opt, FiniteAdamW) and opt.max_norm == one.train.grad_clip > 0
    assert ds["gradient_clipping"] == 0.0
    two = load_config("demo", ["train.num_workers=2", "train.precision=bf16"])
    ds = deepspeed_config(two)
    assert ds["zero_optimization"]["stage"] == 2 and ds["bf16"]["enabled"]
    assert "torch_autocast" not in ds and ds["gradient_clipping"] == two.train.grad_clip
    opt, _ = build_optimizer(torch.nn.Linear(2, 2), two, total_steps=4)
    assert not isinstance(opt, FiniteAdamW)


def test_eager_adamw_is_torch_adamw_without_its_dynamo_wrappers(monkeypatch):
    """The same weights, state and state dict as torch's AdamW, step after step; the state is
    made without autograd; on a torch it was not read against, torch's own methods."""
    from mmdist.train import optim
    from mmdist.train.optim import EagerAdamW

    assert optim._RAW, "the installed torch's AdamW was not recognised (optim.EAGER_TORCH)"
    torch.manual_seed(0)
    ours, theirs = torch.nn.Linear(4, 3), torch.nn.Linear(4, 3)
    theirs.load_state_dict(ours.state_dict())
    kw = {"lr": 0.05, "weight_decay": 0.1, "betas": (0.8, 0.99)}
    a, b = EagerAdamW(ours.parameters(), **kw), torch.optim.AdamW(theirs.parameters(), **kw)
    for _ in range(4):
        x = torch.randn(5, 4)
        for model, opt in ((ours, a), (theirs, b)):
            opt.zero_grad()
            model(x).pow(2).sum().backward()
            opt.step()
    assert all(torch.equal(p, q) for p, q in zip(ours.parameters(), theirs.parameters()))
    assert not any(v.requires_grad for s in a.state.values() for v in s.values())
    mine, torchs = a.state_dict(), b.state_dict()
    assert mine["param_groups"] == torchs["param_groups"]
    assert all(torch.equal(mine["state"][k]["exp_avg_sq"], torchs["state"][k]["exp_avg_sq"])
               for k in torchs["state"])
    again = EagerAdamW(torch.nn.Linear(4, 3).parameters(), **kw)
    again.load_state_dict(torchs)
    assert torch.equal(again.state_dict()["state"][0]["exp_avg"], torchs["state"][0]["exp_avg"])
    monkeypatch.setattr(torch, "__version__", "9.0.0")
    assert optim._undecorated() == {}


def test_finite_adamw_clips_as_a_plain_loop_does():
    """One norm clips and checks: the same update as clip_grad_norm_ then AdamW."""
    from mmdist.train.optim import FiniteAdamW

    torch.manual_seed(0)
    ours, theirs = torch.nn.Linear(4, 3), torch.nn.Linear(4, 3)
    theirs.load_state_dict(ours.state_dict())
    a = FiniteAdamW(ours.parameters(), max_norm=0.1, lr=0.05)
    b = torch.optim.AdamW(theirs.parameters(), lr=0.05)
    for step in range(3):
        x = torch.randn(8, 4, generator=torch.Generator().manual_seed(step)) * 10
        for m in (ours, theirs):
            m.zero_grad()
            m(x).pow(2).sum().backward()
        a.step()
        torch.nn.utils.clip_grad_norm_(theirs.parameters(), 0.1)
        b.step()
        assert not a.overflow
    for p, q in zip(ours.parameters(), theirs.parameters()):
        torch.testing.assert_close(p, q)


def test_offload_uses_deepspeed_optimizer_with_the_same_lr():
    cfg = load_config("demo", ["train.offload_optimizer=true", "train.lr=0.0007"])
    ds = deepspeed_config(cfg)
    assert ds["zero_optimization"]["offload_optimizer"]["device"] == "cpu"
    assert ds["optimizer"]["params"]["lr"] == pytest.approx(7e-4)


def test_warmup_then_cosine():
    assert warmup_cosine(0, 10, 100) == pytest.approx(0.1)
    assert warmup_cosine(9, 10, 100) == pytest.approx(1.0)
    assert warmup_cosine(10, 10, 100) == pytest.approx(1.0)
    assert warmup_cosine(100, 10, 100) == pytest.approx(0.1)
    mids = [warmup_cosine(s, 10, 100) for s in range(10, 101)]
    assert all(a >= b for a, b in zip(mids, mids[1:]))


def test_steps_per_epoch_and_total():
    cfg = load_config("demo", ["train.num_workers=2", "train.micro_batch_size=10",
                               "train.epochs=3", "train.max_steps=0"])
    assert steps_per_epoch(cfg, 1000, 2) == 50
    assert total_steps(cfg, 1000, 2) == 150
    assert total_steps(cfg.override({"train.max_steps": 7}), 1000, 2) == 7


def _batches(ids, size):
    for i in range(0, len(ids), size):
        chunk = torch.tensor(ids[i:i + size])
        yield {"sample_id": chunk, "x": chunk.float() * 2}


def test_skip_consumed_drops_and_rebatches():
    out = list(_skip_consumed(_batches(list(range(20)), 4), {1, 2, 3}, 4))
    seen = torch.cat([b["sample_id"] for b in out]).tolist()
    assert seen == [0, *range(4, 19)]  # 17 left: 4 full batches, the partial tail is dropped
    assert all(len(b["sample_id"]) == 4 for b in out)
    assert all(torch.equal(b["x"], b["sample_id"].float() * 2) for b in out)
    assert len(list(_skip_consumed(_batches(list(range(8)), 4), set(), 4))) == 2


def test_state_and_ledgers_round_trip(tmp_path):
    pending = [["train_loss", 0.5, 1700000000000, 12]]  # not delivered to MLflow yet
    state = ck.TrainState(global_step=12, epoch=1, bad_steps_total=2, mlflow_pending=pending)
    ck.write_state(tmp_path, state, {"run_name": "r"})
    ck.write_ledger(tmp_path, 0, 1, [1, 2, 3], "abc")
    ck.write_ledger(tmp_path, 1, 1, [7, 8], "def")
    got = ck.read_state(tmp_path, rank=1)
    assert (got.global_step, got.epoch, got.bad_steps_total) == (12, 1, 2)
    assert got.consumed == {1, 2, 3, 7, 8} and got.order_hash == "def"
    assert got.mlflow_pending == pending
    assert ck.update_order_hash("", [1, 2]) != ck.update_order_hash("", [2, 1])


# ---- checkpoint completeness -----------------------------------------------------------------


def _fake_checkpoint(root, name, step, world=2, stage=2, model=None, train=None, **body):
    d = root / name
    root.mkdir(parents=True, exist_ok=True)
    for rank in range(world):  # what each rank writes into its own folder; Ray merges them
        part = root.parent / "parts" / f"{name}-rank{rank}"
        (part / "ds").mkdir(parents=True)
        (part / "ds" / f"shard_{rank}.pt").write_bytes(b"x" * (100 + rank))
        if rank == 0:
            ck.write_state(part, ck.TrainState(global_step=step), {
                "world_size": world, "zero_stage": stage, **body,
                "config": {"model": model or {"fusion": "concat"}, "train": train or {}}})
        ck.write_file_list(part, rank)
        shutil.copytree(part, d, dirs_exist_ok=True)
    return d


def test_choose_checkpoint_skips_incomplete_ones_and_says_why(tmp_path):
    tmp_path = tmp_path / "run"
    old = _fake_checkpoint(tmp_path, "checkpoint_a", 4)
    new = _fake_checkpoint(tmp_path, "checkpoint_b", 8)
    assert ck.choose_checkpoint(tmp_path) == (new, [])
    (new / "ds" / "shard_1.pt").write_bytes(b"x" * 7)  # truncated
    chosen, skipped = ck.choose_checkpoint(tmp_path)
    assert chosen == old
    assert skipped == ["checkpoint_b (step 8): ds/shard_1.pt (rank 1) has 7 bytes, "
                       "101 were written"]
    (old / "files_rank1.json").unlink()  # rank 1 never finished its upload
    chosen, skipped = ck.choose_checkpoint(tmp_path)
    assert chosen is None and "files_rank1.json is missing" in skipped[1]


def test_check_resume_refuses_another_world_size_at_zero_0_or_model(tmp_path):
    tmp_path = tmp_path / "run"
    d = _fake_checkpoint(tmp_path, "checkpoint_a", 4)
    ck.check_resume(d, 2, 2, {"fusion": "concat", "compile": True})  # runtime keys may change
    ck.check_resume(d, 1, 2, {"fusion": "concat"})  # re-partitioned (mmdist.train.elastic)
    with pytest.raises(ValueError, match=r"written by 2 worker\(s\) and this run has 1: .* "
                                         r"ZeRO-1/2 engine only"):
        ck.check_resume(d, 1, 0, {"fusion": "concat"})
    with pytest.raises(ValueError, match=r"model\.fusion \('concat' there, 'film' here\)"):
        ck.check_resume(d, 2, 2, {"fusion": "film"})
    with pytest.raises(ValueError, match=r"written at ZeRO-2 and this run is ZeRO-3: .* "
                                         r"train\.zero_stage=2"):
        ck.check_resume(d, 2, 3, {"fusion": "concat"})


def test_check_resume_refuses_optimizer_state_of_another_optimizer(tmp_path):
    model = {"fusion": "concat"}
    # bf16 without ZeRO, written before it became autocast: DeepSpeed's BF16 optimizer state
    old = _fake_checkpoint(tmp_path / "a", "checkpoint_a", 4, world=1, stage=0,
                           train={"precision": "bf16"})
    ck.check_resume(old, 1, 0, model)  # nothing known about this run: no refusal
    with pytest.raises(ValueError, match=r"written by DeepSpeed's ZeRO / fp16 / bf16 optimizer "
                                         r"and this run steps with mmdist's AdamW.*predates"):
        ck.check_resume(old, 1, 0, model, "mmdist")
    new = _fake_checkpoint(tmp_path / "b", "checkpoint_b", 4, world=1, stage=0,
                           train={"precision": "bf16"}, optimizer_steps="mmdist")
    ck.check_resume(new, 1, 0, model, "mmdist")
    with pytest.raises(ValueError, match="train.precision or train.offload_optimizer differ"):
        ck.check_resume(new, 1, 0, model, "deepspeed")  # e.g. fp16 now
    z2 = _fake_checkpoint(tmp_path / "c", "checkpoint_c", 4, train={"precision": "bf16"})
    ck.check_resume(z2, 2, 2, model, "deepspeed")  # ZeRO-2 bf16 was and is DeepSpeed's


def test_one_worker_runs_zero_1_and_2_as_zero_0():
    """Nothing to partition on one rank: ZeRO-1/2's hooks and bucket copies only cost time."""
    one = load_config("demo", ["train.num_workers=1", "train.zero_stage=2"])
    assert deepspeed_config(one)["zero_optimization"] == {"stage": 0}
    assert one.resolve()["zero_stage"] == 0 and one.train.zero_stage_at(2) == 2
    assert deepspeed_config(one, world_size=2)["zero_optimization"]["stage"] == 2
    kept = one.override({"train.zero_on_one_worker": True})
    assert deepspeed_config(kept)["zero_optimization"]["stage"] == 2
    offload = one.override({"train.offload_optimizer": True})  # CPU Adam needs ZeRO
    assert deepspeed_config(offload)["zero_optimization"]["stage"] == 2
    three = one.override({"train.zero_stage": 3})
    assert deepspeed_config(three)["zero_optimization"]["stage"] == 3


@pytest.mark.parametrize("written,flag,expect", [(2, False, True), (0, True, False),
                                                 (2, True, True), (0, False, False)])
def test_resume_on_one_worker_runs_the_stage_the_checkpoint_was_written_at(
        tmp_path, written, flag, expect):
    from mmdist.train.run import check_resumable

    run = tmp_path / "run"
    cfg = load_config("demo", ["train.num_workers=1", "train.zero_stage=2",
                               f"train.zero_on_one_worker={str(flag).lower()}"])
    _fake_checkpoint(run, "checkpoint_a", 4, world=1, stage=written, model=cfg.to_dict()["model"])
    got = check_resumable(cfg, run)
    assert got.train.zero_on_one_worker is expect and got.train.zero_stage_at() == written
    assert got.model == cfg.model


def test_undelivered_metrics_are_handed_over_and_delivered(tmp_path):
    """A logger that cannot reach its server keeps every value in pending(); another process
    delivers exactly those rows (same values, steps and timestamps) once the store answers."""
    import mlflow
    from mlflow.tracking import MlflowClient

    from mmdist.tracking import MetricsLogger, deliver_pending

    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    mlflow.set_tracking_uri(uri)
    with mlflow.start_run() as run:
        run_id = run.info.run_id
    (tmp_path / "file").write_text("")  # a store below a plain file can never open
    dead = MetricsLogger(f"sqlite:///{tmp_path / 'file' / 'x.db'}", run_id, flush_every_s=0)
    dead.log({"train_loss": 1.5}, step=1)
    dead.log({"train_loss": 1.25, "lr": 0.1}, step=2)
    assert dead.failed_flushes == 2
    rows = dead.pending()
    assert sorted((k, v, s) for k, v, _, s in rows) == [
        ("lr", 0.1, 2), ("train_loss", 1.25, 2), ("train_loss", 1.5, 1)]
    assert deliver_pending(uri, run_id, rows) == 3
    hist = MlflowClient(uri).get_metric_history(run_id, "train_loss")
    assert sorted((m.step, m.value, m.timestamp) for m in hist) == sorted(
        (s, v, ts) for k, v, ts, s in rows if k == "train_loss")
