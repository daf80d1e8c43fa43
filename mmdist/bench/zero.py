"""`mmdist bench zero`: bytes of model + gradients + optimizer state held per rank under ZeRO-3,
2 ranks (Ray Train workers) against 1 (this process), gloo on CPU, measured in one run after
one real optimizer step of training's engine.

What is counted per rank (DeepSpeed's ZeRO-3 optimizer buffers): the rank's parameter partitions,
its gradient partition buffer, its fp32 master partitions and the Adam moments of them.
Ideal ZeRO-3 scaling is 1/world, so the 2-rank/1-rank ratio approaches 0.5 from above
(small tensors below the persistence threshold are kept whole on every rank).
"""

from __future__ import annotations

import argparse
import tempfile
from typing import Any

from mmdist.arguments import add_config_arguments
from mmdist.config import Config, load_config
from mmdist.data.schema import audio_frames, random_batch
from mmdist.ray_env import init_ray


def configure_parser(parser: argparse.ArgumentParser) -> None:
    add_config_arguments(parser, default="demo")
    parser.add_argument("--vocab-size", type=int, default=2000, help="vocabulary size (default 2000)")


def _bytes(tensors) -> int:
    import torch  # heavy: not loaded for --help

    return int(sum(t.numel() * t.element_size() for t in tensors if torch.is_tensor(t)))


def zero3_bytes(engine) -> dict[str, int]:
    """Per-rank bytes of a ZeRO-3 engine's parameter, gradient and optimizer partitions."""
    opt = engine.optimizer
    # every parameter's partition on this rank, frozen ones included (they are in no group)
    model = _bytes(p.ds_tensor for p in engine.module.parameters())
    # parameters kept whole on every rank (below stage3_param_persistence_threshold)
    model += _bytes(p.data for p in engine.module.parameters()
                    if getattr(p, "ds_persist", False))
    grads = _bytes([opt.grad_partitions_flat_buffer])
    states = [v for s in opt.optimizer.state.values() for v in s.values()]
    optim = _bytes(opt.fp32_partitioned_groups_flat) + _bytes(states)
    return {"model_bytes": model, "grad_bytes": grads, "optimizer_bytes": optim,
            "total_bytes": model + grads + optim}


def _worker(config: dict[str, Any]) -> dict[str, int]:
    import ray.train  # heavy: not loaded for --help

    from mmdist.train.backend import init_process_group

    init_process_group()  # as training's workers do (mmdist.train.entry)
    return one_step_bytes(Config.from_dict(config["cfg"]), config["vocab"],
                          ray.train.get_context().get_world_size())


def one_step_bytes(cfg: Config, vocab: int, world: int) -> dict[str, int]:
    """Build training's engine on this rank, take one optimizer step, count its bytes."""
    from mmdist.train.engine import build_engine  # loads torch, deepspeed: not for --help

    engine = build_engine(cfg, {"vocab_size": vocab}, world, total_steps=10)
    d = cfg.data
    batch = random_batch(cfg.train.micro_batch_size, vocab, d.max_text_len,
                         d.image_size, d.n_mels, audio_frames(d.sample_rate, d.audio_seconds,
                                                              d.hop_length),
                         cfg.model.num_classes)
    loss = engine(batch)["loss"]
    engine.backward(loss)
    engine.step()
    out = zero3_bytes(engine)
    engine.destroy()
    return out


def measure(cfg: Config, world: int, vocab: int) -> dict[str, int]:
    """Bytes per rank at ``world`` ranks: Ray Train workers, or for one rank this process on a
    1-rank gloo group (the same engine; Ray adds nothing to the bytes)."""
    from ray.train import RunConfig, ScalingConfig  # heavy: not loaded for --help

    from mmdist.train.backend import trainer_and_backend

    cfg = cfg.override({"train.num_workers": world, "train.zero_stage": 3,
                        "train.global_batch_size": 0})
    if world == 1:
        import torch  # heavy: not loaded for --help

        from mmdist.bench.process_group import single_process_group

        with single_process_group(torch.device("cpu")):
            return one_step_bytes(cfg, vocab, 1)
    with tempfile.TemporaryDirectory() as tmp:
        trainer_cls, backend = trainer_and_backend(use_gpu=False)  # training's trainer
        trainer = trainer_cls(
            _worker, **backend, train_loop_config={"cfg": cfg.to_dict(), "vocab": vocab},
            scaling_config=ScalingConfig(num_workers=world, resources_per_worker={"CPU": 0.5}),
            run_config=RunConfig(name=f"bench-zero-{world}", storage_path=tmp))
        return dict(trainer.fit().return_value)


def run(args: argparse.Namespace) -> dict[str, Any]:
    cfg = load_config(args.config, args.overrides)
    init_ray(dashboard=True)  # the Ray `mmdist train` starts (Ray Train wants its state API)
    one = measure(cfg, 1, args.vocab_size)
    two = measure(cfg, 2, args.vocab_size)
    ratio = two["total_bytes"] / one["total_bytes"]
    mib = 2**20
    print(f"{'ZeRO-3 bytes per rank':<24}{'1 rank':>12}{'2 ranks':>12}")
    for k in ("model_bytes", "grad_bytes", "optimizer_bytes", "total_bytes"):
        print(f"{k:<24}{one[k] / mib:>10.2f}Mi{two[k] / mib:>10.2f}Mi")
    print(f"ratio (2 ranks / 1 rank): {ratio:.3f}  (ideal 0.5)")
    return {"one_rank": one, "two_ranks": two, "ratio": ratio}
