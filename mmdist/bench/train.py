"""`mmdist bench train`: what the Ray Train + DeepSpeed path costs against a plain PyTorch loop.

Same model (same seed), same batches (materialised once, identical content), same optimizer
(``train.optim.build_optimizer``) and the same number of threads on three sides, measured in
this one run:

(a) a TorchTrainer with 1 worker running the DeepSpeed engine that training builds
    (``train.engine.build_engine``);
(b) that same engine in this process, on a 1-rank gloo group of its own, without Ray;
(c) a single-process loop: forward, backward, clipping, AdamW, LR schedule.

b / c is what DeepSpeed's engine costs, a / b what running it inside a Ray Train worker costs
(the worker shares the cores with Ray's own processes and with this driver waiting in
``fit()``). Steady-state steps/s are timed after warm-up steps; setup (Ray worker start, engine
build) is reported separately.
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from typing import TYPE_CHECKING, Any

from mmdist.arguments import add_config_arguments
from mmdist.config import Config, load_config
from mmdist.data.schema import audio_frames, random_batch

if TYPE_CHECKING:
    import torch


def configure_parser(parser: argparse.ArgumentParser) -> None:
    add_config_arguments(parser, default="demo")
    parser.add_argument("--steps", type=int, default=60, help="timed steps per side (default 60)")
    parser.add_argument("--warmup", type=int, default=10, help="untimed warm-up steps (default 10)")
    parser.add_argument("--threads", type=int, default=2,
                        help="torch threads on every side (default 2: the cores here)")
    parser.add_argument("--vocab-size", type=int, default=2000, help="vocabulary size (default 2000)")
    parser.add_argument("--repeat", type=int, default=1,
                        help="rounds of the three sides, one after the other; medians and "
                             "per-round ratios are reported (default 1)")


def _batches(cfg: Config, vocab: int, n: int) -> list[dict[str, torch.Tensor]]:
    d = cfg.data
    frames = audio_frames(d.sample_rate, d.audio_seconds, d.hop_length)
    return [random_batch(cfg.train.micro_batch_size, vocab, d.max_text_len, d.image_size,
                         d.n_mels, frames, cfg.model.num_classes, seed=i) for i in range(n)]


def _timed(step, warmup: int, steps: int) -> float:
    for i in range(warmup):
        step(i)
    t0 = time.perf_counter()
    for i in range(warmup, warmup + steps):
        step(i)
    return steps / (time.perf_counter() - t0)


def plain_loop(cfg: Config, vocab: int, batches: list, warmup: int, steps: int,
               threads: int) -> dict[str, float]:
    import torch  # heavy: `mmdist --help` imports this module to build its parser

    from mmdist.models import build_model  # torch, as above
    from mmdist.train.optim import build_optimizer

    torch.set_num_threads(threads)
    t0 = time.perf_counter()
    torch.manual_seed(cfg.train.seed)
    model = build_model(cfg, vocab_size=vocab)
    model.train()
    opt, schedule = build_optimizer(model, cfg, warmup + steps)
    lr = schedule(opt)
    setup = time.perf_counter() - t0

    def step(i: int) -> None:
        loss = model(batches[i % len(batches)])["loss"]
        loss.backward()
        if cfg.train.grad_clip:
            torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.train.grad_clip)
        opt.step()
        lr.step()
        opt.zero_grad(set_to_none=True)

    return {"steps_per_s": _timed(step, warmup, steps), "setup_s": setup}


def engine_steps(config: dict[str, Any]) -> dict[str, float]:
    """Build training's DeepSpeed engine at world size 1 and time its steps (needs a torch
    process group: Ray Train's in a worker, ``bench.process_group.single_process_group`` in
    this one)."""
    # heavy (Ray/torch): `mmdist --help` imports this module to build its parser
    import torch

    from mmdist.train.engine import build_engine

    torch.set_num_threads(config["threads"])
    t0 = time.perf_counter()
    cfg = Config.from_dict(config["cfg"])
    engine = build_engine(cfg, {"vocab_size": config["vocab"]}, 1,
                          config["warmup"] + config["steps"])
    setup = time.perf_counter() - t0
    batches = config["batches"]

    def step(i: int) -> None:
        loss = engine(batches[i % len(batches)])["loss"]
        engine.backward(loss)
        engine.step()

    return {"steps_per_s": _timed(step, config["warmup"], config["steps"]), "setup_s": setup}


def _engine_config(cfg: Config, vocab: int, batches: list, warmup: int, steps: int,
                   threads: int) -> dict[str, Any]:
    return {"cfg": cfg.to_dict(), "vocab": vocab, "batches": batches, "warmup": warmup,
            "steps": steps, "threads": threads}


def ray_path(cfg: Config, vocab: int, batches: list, warmup: int, steps: int,
             threads: int) -> dict[str, float]:
    # heavy (Ray/torch): `mmdist --help` imports this module to build its parser
    from ray.train import RunConfig, ScalingConfig
    from ray.train.torch import TorchTrainer

    t0 = time.perf_counter()

    def fn(config):
        worker_start_s = time.time() - config["t_submit"]
        out = engine_steps(config)
        out["setup_s"] += worker_start_s
        return out

    with tempfile.TemporaryDirectory() as tmp:
        trainer = TorchTrainer(
            fn, train_loop_config={**_engine_config(cfg, vocab, batches, warmup, steps, threads),
                                   "t_submit": time.time()},
            scaling_config=ScalingConfig(num_workers=1, resources_per_worker={"CPU": threads}),
            run_config=RunConfig(name="bench-train", storage_path=tmp))
        result = trainer.fit()
    out = dict(result.return_value)
    out["wall_s"] = time.perf_counter() - t0
    return out


def run(args: argparse.Namespace) -> dict[str, Any]:
    # heavy (Ray/torch): `mmdist --help` imports this module to build its parser
    import torch

    from mmdist.bench.process_group import single_process_group
    from mmdist.ray_env import init_ray

    cfg = load_config(args.config, [*args.overrides, "train.num_workers=1"])
    batches = _batches(cfg, args.vocab_size, 8)
    init_ray(num_cpus=args.threads, dashboard=True)  # the Ray `mmdist train` starts
    print(f"[bench train] model size={cfg.model.size} fusion={cfg.model.fusion} "
          f"batch={cfg.train.micro_batch_size} zero={cfg.train.zero_stage} "
          f"threads={args.threads}; {args.warmup} warm-up + {args.steps} timed steps per side",
          flush=True)
    sides = {"ray": [], "deepspeed": [], "plain": []}
    # (b)'s 1-rank group lives through every round; the Ray worker has a group of its own
    with single_process_group(torch.device("cpu")):
        for _ in range(max(1, args.repeat)):
            sides["ray"].append(ray_path(cfg, args.vocab_size, batches, args.warmup,
                                         args.steps, args.threads))
            sides["deepspeed"].append(engine_steps(_engine_config(
                cfg, args.vocab_size, batches, args.warmup, args.steps, args.threads)))
            sides["plain"].append(plain_loop(cfg, args.vocab_size, batches, args.warmup,
                                             args.steps, args.threads))
    rate = {k: statistics.median(r["steps_per_s"] for r in v) for k, v in sides.items()}
    setup = {k: statistics.median(r["setup_s"] for r in v) for k, v in sides.items()}
    ratio = rate["ray"] / rate["plain"]
    ds_ratio = rate["deepspeed"] / rate["plain"]
    ray_over_ds = rate["ray"] / rate["deepspeed"]
    # each round's sides ran minutes apart at most: the machine's slow swings hit a round alike
    by_round = [round(r["steps_per_s"] / p["steps_per_s"], 3)
                for r, p in zip(sides["ray"], sides["plain"])]
    ds_by_round = [round(d["steps_per_s"] / p["steps_per_s"], 3)
                   for d, p in zip(sides["deepspeed"], sides["plain"])]
    if args.repeat > 1:
        for k, v in sides.items():
            print(f"  rounds ({k}, steps/s): {[round(r['steps_per_s'], 2) for r in v]}")
    print(f"TorchTrainer + DeepSpeed      : {rate['ray']:.2f} steps/s  "
          f"(setup {setup['ray']:.1f} s)")
    print(f"DeepSpeed in this process     : {rate['deepspeed']:.2f} steps/s  "
          f"(setup {setup['deepspeed']:.1f} s)")
    print(f"plain PyTorch loop            : {rate['plain']:.2f} steps/s  "
          f"(setup {setup['plain']:.1f} s)")
    print(f"ratio (Ray path / plain)      : {ratio:.3f} = DeepSpeed / plain {ds_ratio:.3f} "
          f"x Ray Train worker / DeepSpeed alone {ray_over_ds:.3f}")
    if args.repeat > 1:
        print(f"  round by round: Ray path / plain {by_round}, DeepSpeed / plain {ds_by_round}")
    return {"ray_steps_per_s": rate["ray"], "plain_steps_per_s": rate["plain"],
            "deepspeed_steps_per_s": rate["deepspeed"],
            "ratio": ratio, "deepspeed_ratio": ds_ratio, "ray_over_deepspeed": ray_over_ds,
            "ratio_by_round": by_round, "deepspeed_ratio_by_round": ds_by_round,
            "ray_setup_s": setup["ray"], "deepspeed_setup_s": setup["deepspeed"],
            "plain_setup_s": setup["plain"], "repeat": max(1, args.repeat),
            "steps": args.steps, "warmup": args.warmup, "threads": args.threads}
