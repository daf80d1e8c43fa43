"""Optimizer and learning-rate schedule, built in Python from TrainConfig."""

from __future__ import annotations

import math

import torch

from mmdist.config import Config


def param_groups(model: torch.nn.Module, weight_decay: float) -> list[dict]:
    """AdamW groups: no weight decay on biases, norms and embeddings (1-D tensors)."""
    decay, no_decay = [], []
    for _, p in model.named_parameters():
        if not p.requires_grad:
            continue
        (decay if p.ndim >= 2 else no_decay).append(p)
    return [{"params": decay, "weight_decay": weight_decay},
            {"params": no_decay, "weight_decay": 0.0}]


def warmup_cosine(step: int, warmup_steps: int, total_steps: int, min_ratio: float = 0.1) -> float:
    """LR multiplier: linear warm-up to 1, then cosine down to ``min_ratio`` at ``total_steps``."""
    if warmup_steps and step < warmup_steps:
        return (step + 1) / warmup_steps
    span = max(1, total_steps - warmup_steps)
    progress = min(1.0, (step - warmup_steps) / span)
    return min_ratio + (1 - min_ratio) * 0.5 * (1 + math.cos(math.pi * progress))


class FiniteAdamW(torch.optim.AdamW):
    """AdamW that skips a step whose gradients are not all finite and says so in ``overflow``,
    the flag DeepSpeed's engine reads to count ``skipped_steps``.

    DeepSpeed's own optimizers (ZeRO 1-3, its fp16 and bf16 wrappers) already skip such a step;
    only ZeRO-0 in fp32 hands the step straight to the client optimizer, so only there is this
    class used (:func:`build_optimizer`). The check reads one flag from the device per step,
    inside the optimizer step as DeepSpeed's own check does.
    """

    overflow = False

    @torch.no_grad()
    def step(self, closure=None):
        grads = [p.grad for g in self.param_groups for p in g["params"] if p.grad is not None]
        # a NaN or Inf anywhere makes the total norm non-finite (DeepSpeed's test too)
        self.overflow = bool(grads) and not bool(
            torch.isfinite(torch.nn.utils.get_total_norm(grads)))
        if self.overflow:
            return None
        return super().step(closure)


def build_optimizer(model: torch.nn.Module, cfg: Config, total_steps: int,
                    world_size: int | None = None):
    """AdamW (:class:`FiniteAdamW` where DeepSpeed runs ZeRO-0 in fp32 at ``world_size``) and a
    factory for the warm-up/cosine LambdaLR.

    The schedule is returned as a factory that ``deepspeed.initialize`` calls with the optimizer
    it ends up with: ZeRO-3 regroups the parameters, so a scheduler built on the client
    optimizer beforehand would hold the wrong number of groups. With optimizer offload
    DeepSpeed builds its own CPU Adam from the generated config and the optimizer is None.
    """
    t = cfg.train
    warmup = min(t.warmup_steps, max(0, total_steps // 5))

    def schedule(opt: torch.optim.Optimizer) -> torch.optim.lr_scheduler.LambdaLR:
        return torch.optim.lr_scheduler.LambdaLR(
            opt, lambda s: warmup_cosine(s, warmup, total_steps))

    if t.offload_optimizer:
        return None, schedule
    # ZeRO-0 in fp32 is the one configuration where DeepSpeed does not skip non-finite steps
    plain = t.zero_stage_at(world_size) == 0 and t.precision == "fp32"
    cls = FiniteAdamW if plain else torch.optim.AdamW
    opt = cls(param_groups(model, t.weight_decay), lr=t.lr, betas=(0.9, 0.999), fused=t.use_gpu)
    return opt, schedule
