"""`mmdist bench train`: what the Ray Train + DeepSpeed path costs against a plain PyTorch loop.

Same model (same seed), same batches (materialised once, identical content), same number of
threads; (a) a TorchTrainer with 1 worker running a DeepSpeed engine, (b) a single-process loop
with torch AdamW. Steady-state steps/s are timed after warm-up steps; setup (Ray worker start,
engine build) is reported separately. Both are measured in this one run.
"""

from __future__ import annotations

import argparse
import time
from typing import Any

import torch

from mmdist.config import Config, load_config


def configure_parser(parser: argparse.ArgumentParser) -> None:
    from mmdist.cli import add_config_arguments

    add_config_arguments(parser, default="demo")
    parser.add_argument("--steps", type=int, default=60, help="timed steps per side (default 60)")
    parser.add_argument("--warmup", type=int, default=10, help="untimed warm-up steps (default 10)")
    parser.add_argument("--threads", type=int, default=2,
                        help="torch threads on both sides (default 2: the cores here)")
    parser.add_argument("--vocab-size", type=int, default=2000, help="vocabulary size (default 2000)")


def _batches(cfg: Config, vocab: int, n: int) -> list[dict[str, torch.Tensor]]:
    from mmdist.data.schema import audio_frames, random_batch

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
    from mmdist.models import build_model
    from mmdist.train.optim import param_groups

    torch.set_num_threads(threads)
    t0 = time.perf_counter()
    torch.manual_seed(cfg.train.seed)
    model = build_model(cfg, vocab_size=vocab)
    model.train()
    opt = torch.optim.AdamW(param_groups(model, cfg.train.weight_decay), lr=cfg.train.lr)
    setup = time.perf_counter() - t0

    def step(i: int) -> None:
        loss = model(batches[i % len(batches)])["loss"]
        loss.backward()
        if cfg.train.grad_clip:
            torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.train.grad_clip)
        opt.step()
        opt.zero_grad(set_to_none=True)

    return {"steps_per_s": _timed(step, warmup, steps), "setup_s": setup}


def _ray_worker(config: dict[str, Any]) -> dict[str, float]:
    import deepspeed

    from mmdist.models import build_model
    from mmdist.train.deepspeed_config import deepspeed_config
    from mmdist.train.optim import param_groups

    torch.set_num_threads(config["threads"])
    t0 = time.perf_counter()
    cfg = Config.from_dict(config["cfg"])
    torch.manual_seed(cfg.train.seed)
    model = build_model(cfg, vocab_size=config["vocab"])
    opt = torch.optim.AdamW(param_groups(model, cfg.train.weight_decay), lr=cfg.train.lr)
    engine, _, _, _ = deepspeed.initialize(model=model, optimizer=opt,
                                           config=deepspeed_config(cfg, 1),
                                           dist_init_required=False)
    setup = time.perf_counter() - t0 + config["worker_start_s"]
    batches = config["batches"]

    def step(i: int) -> None:
        loss = engine(batches[i % len(batches)])["loss"]
        engine.backward(loss)
        engine.step()

    return {"steps_per_s": _timed(step, config["warmup"], config["steps"]), "setup_s": setup}


def ray_path(cfg: Config, vocab: int, batches: list, warmup: int, steps: int,
             threads: int) -> dict[str, float]:
    import tempfile

    from ray.train import RunConfig, ScalingConfig
    from ray.train.torch import TorchTrainer

    t0 = time.perf_counter()

    def fn(config):
        config["worker_start_s"] = time.time() - config["t_submit"]
        out = _ray_worker(config)
        return out

    with tempfile.TemporaryDirectory() as tmp:
        trainer = TorchTrainer(
            fn, train_loop_config={"cfg": cfg.to_dict(), "vocab": vocab, "batches": batches,
                                   "warmup": warmup, "steps": steps, "threads": threads,
                                   "t_submit": time.time()},
            scaling_config=ScalingConfig(num_workers=1, resources_per_worker={"CPU": threads}),
            run_config=RunConfig(name="bench-train", storage_path=tmp))
        result = trainer.fit()
    out = dict(result.return_value)
    out["wall_s"] = time.perf_counter() - t0
    return out


def run(args: argparse.Namespace) -> dict[str, Any]:
    from mmdist.train.run import init_ray

    cfg = load_config(args.config, [*args.overrides, "train.num_workers=1"])
    batches = _batches(cfg, args.vocab_size, 8)
    init_ray(num_cpus=args.threads)
    print(f"[bench train] model size={cfg.model.size} fusion={cfg.model.fusion} "
          f"batch={cfg.train.micro_batch_size} zero={cfg.train.zero_stage} "
          f"threads={args.threads}; {args.warmup} warm-up + {args.steps} timed steps per side",
          flush=True)
    ray_side = ray_path(cfg, args.vocab_size, batches, args.warmup, args.steps, args.threads)
    plain = plain_loop(cfg, args.vocab_size, batches, args.warmup, args.steps, args.threads)
    ratio = ray_side["steps_per_s"] / plain["steps_per_s"]
    print(f"TorchTrainer + DeepSpeed : {ray_side['steps_per_s']:.2f} steps/s  "
          f"(setup {ray_side['setup_s']:.1f} s)")
    print(f"plain PyTorch loop       : {plain['steps_per_s']:.2f} steps/s  "
          f"(setup {plain['setup_s']:.1f} s)")
    print(f"ratio (Ray path / plain) : {ratio:.3f}")
    return {"ray_steps_per_s": ray_side["steps_per_s"], "plain_steps_per_s": plain["steps_per_s"],
            "ratio": ratio, "ray_setup_s": ray_side["setup_s"], "plain_setup_s": plain["setup_s"],
            "steps": args.steps, "warmup": args.warmup, "threads": args.threads}
