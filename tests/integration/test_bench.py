"""The training benchmarks run for real (tiny sizes); figures are printed, never timed here."""

import argparse
import os

import torch.distributed as dist

from mmdist.bench import train as bench_train
from mmdist.bench import zero as bench_zero


def test_bench_zero_two_ranks_hold_less_than_one(ray_local):
    args = argparse.Namespace(config="tiny", overrides=["model.size=small"], vocab_size=500,
                              json=True)
    out = bench_zero.run(args)
    one, two = out["one_rank"], out["two_ranks"]
    assert one["total_bytes"] > 0 and two["total_bytes"] > 0
    # ZeRO-3 partitions gradients and optimizer state across the 2 ranks
    assert two["grad_bytes"] < one["grad_bytes"] and two["optimizer_bytes"] < one["optimizer_bytes"]
    assert out["ratio"] < 0.75


def test_bench_train_reports_the_three_sides(ray_local):
    args = argparse.Namespace(config="tiny", overrides=[], steps=4, warmup=2, threads=1,
                              vocab_size=200, repeat=2, chunk=3, profile_steps=2, json=True)
    env_before = {k: os.environ.get(k) for k in ("RANK", "WORLD_SIZE", "MASTER_PORT")}
    out = bench_train.run(args)
    assert out["ray_steps_per_s"] > 0 and out["plain_steps_per_s"] > 0
    assert out["deepspeed_steps_per_s"] > 0 and out["deepspeed_setup_s"] > 0
    assert out["ratio"] > 0 and out["ray_setup_s"] > 0
    # per-round ratios, two rounds; the headline is their median
    for key in ("ratio", "deepspeed_ratio", "ray_over_deepspeed"):
        spread = out[f"{key}_spread"]
        assert len(spread["rounds"]) == 2 and spread["median"] == out[key]
        assert spread["min"] <= out[key] <= spread["max"]
    # where the time goes: phases of every side add up to its step, operators of (b) and (c)
    for side in ("ray", "deepspeed", "plain"):
        ms = out["phases_ms"][side]
        assert ms["forward"] > 0 and ms["backward"] > 0 and ms["step"] > 0
        assert abs(ms["forward"] + ms["backward"] + ms["step"] + ms["other"] - ms["total"]) < 0.05
    assert out["operators"] and all(set(r) == {"op", "deepspeed_ms", "plain_ms", "extra_ms"}
                                    for r in out["operators"])
    # the 1-rank group made for the in-process engine is gone again, with its variables
    assert not dist.is_initialized()
    assert {k: os.environ.get(k) for k in env_before} == env_before
