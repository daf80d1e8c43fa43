"""Optimizer and learning-rate schedule, built in Python from TrainConfig."""

from __future__ import annotations

import inspect
import math

import torch

from mmdist.config import Config
from mmdist.train.deepspeed_config import client_optimizer_steps


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


# The torch (major.minor) whose optimizer decorators :class:`EagerAdamW` was read against;
# another torch gets torch's own methods.
EAGER_TORCH = "2.15"
# torch.optim.AdamW's methods whose decorators import TorchDynamo, and the functions under them
_UNDECORATED = {"step": "Adam.step", "add_param_group": "Optimizer.add_param_group",
                "zero_grad": "Optimizer.zero_grad", "state_dict": "Optimizer.state_dict",
                "load_state_dict": "Optimizer.load_state_dict"}


def _undecorated() -> dict:
    """``{method: torch's function under its decorators}``, or {} where this torch is not the
    one read (:data:`EAGER_TORCH`) or a function is not the one expected."""
    if ".".join(torch.__version__.split(".")[:2]) != EAGER_TORCH:
        return {}
    found = {name: inspect.unwrap(getattr(torch.optim.AdamW, name)) for name in _UNDECORATED}
    if any(f.__qualname__ != _UNDECORATED[n] for n, f in found.items()):
        return {}
    return found


_RAW = _undecorated()


class EagerAdamW(torch.optim.AdamW):
    """``torch.optim.AdamW`` that never imports TorchDynamo: the same update, state, hooks
    and checkpoints.

    torch's optimizers wrap these methods in decorators that keep ``torch.compile`` from
    tracing into them, and the wrappers import ``torch._dynamo`` on first call (``step`` on
    every call): about 1.1 CPU-s of every training worker's start, on the path to its first
    step, although no optimizer is ever compiled (``model.compile`` compiles model blocks).
    Its methods are the functions under the decorators, ``step`` in the grad mode its wrapper
    sets (off, unless ``differentiable``); on another torch than :data:`EAGER_TORCH` they are
    torch's own.
    """


def _eager_step(self, closure=None):
    with torch.set_grad_enabled(self.defaults["differentiable"]):
        return _RAW["step"](self, closure)


if _RAW:
    EagerAdamW.step = _eager_step
    for _name in ("add_param_group", "zero_grad", "state_dict", "load_state_dict"):
        setattr(EagerAdamW, _name, _RAW[_name])


class FiniteAdamW(EagerAdamW):
    """AdamW that clips the gradients to ``max_norm`` and skips a step whose gradients are not
    all finite, saying so in ``overflow``, the flag DeepSpeed's engine reads to count
    ``skipped_steps``.

    DeepSpeed's own optimizers (ZeRO 1-3, its fp16 and bf16 wrappers) already clip and skip;
    only ZeRO-0 in fp32 or bf16 (autocast) hands the step straight to the client optimizer
    (:func:`mmdist.train.deepspeed_config.client_optimizer_steps`), so only there is this class
    used. One norm serves both (as in a plain loop): DeepSpeed's own clipping there would take a
    norm per parameter in a Python loop and an all-reduce per step, and the finite check a
    second norm. The check reads one flag from the device per step, inside the optimizer step as
    DeepSpeed's own check does. Every rank holds the same averaged gradients (the engine
    all-reduces them before the step), so every rank clips and skips alike.
    """

    overflow = False

    def __init__(self, params, max_norm: float = 0.0, **kwargs):
        super().__init__(params, **kwargs)
        self.max_norm = max_norm

    @torch.no_grad()
    def step(self, closure=None):
        params = [p for g in self.param_groups for p in g["params"] if p.grad is not None]
        if not params:
            self.overflow = False
            return super().step(closure)
        # a NaN or Inf anywhere makes the total norm non-finite (DeepSpeed's test too)
        norm = torch.nn.utils.get_total_norm([p.grad for p in params])
        self.overflow = not bool(torch.isfinite(norm))
        if self.overflow:
            return None
        if self.max_norm > 0:
            torch.nn.utils.clip_grads_with_norm_(params, self.max_norm, norm)
        return super().step(closure)


def build_optimizer(model: torch.nn.Module, cfg: Config, total_steps: int,
                    world_size: int | None = None):
    """AdamW (:class:`EagerAdamW`; :class:`FiniteAdamW`, clipping itself, where DeepSpeed runs
    ZeRO-0 in fp32/bf16 at ``world_size``) and a factory for the warm-up/cosine LambdaLR.

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
    groups = param_groups(model, t.weight_decay)
    if client_optimizer_steps(t, world_size):  # DeepSpeed neither clips nor skips there
        opt = FiniteAdamW(groups, max_norm=t.grad_clip, lr=t.lr, betas=(0.9, 0.999),
                          fused=t.use_gpu)
    else:
        opt = EagerAdamW(groups, lr=t.lr, betas=(0.9, 0.999), fused=t.use_gpu)
    return opt, schedule
