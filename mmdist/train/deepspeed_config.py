"""The DeepSpeed config, generated from the train config: never edited by hand.

TrainConfig is the one source of learning rate, batch sizes, accumulation, ZeRO stage, offload,
precision and clipping. The optimizer and LR schedule are built in Python (see
``mmdist.train.optim``) and passed to ``deepspeed.initialize``, so this dict holds no lr.
"""

from __future__ import annotations

from typing import Any

from mmdist.config import Config, TrainConfig


def deepspeed_config(cfg: Config, world_size: int | None = None) -> dict[str, Any]:
    """DeepSpeed JSON config for ``cfg`` at ``world_size`` (default: train.num_workers).

    Raises:
        ValueError: the global batch is not divisible by micro batch x world size.
    """
    t = cfg.train
    if world_size and world_size != t.world_size:  # the batch plan at another world size
        t = t.model_copy(update={"num_workers": world_size})
    if t.train_batch_size % (t.micro_batch_size * t.world_size):
        raise ValueError(
            f"train.global_batch_size ({t.train_batch_size}) must be a multiple of "
            f"train.micro_batch_size ({t.micro_batch_size}) x world size ({t.world_size})")
    stage = t.zero_stage_at()
    zero: dict[str, Any] = {"stage": stage}
    if stage >= 1:
        zero.update(overlap_comm=False, contiguous_gradients=True)
    if stage == 3:
        zero.update(stage3_gather_16bit_weights_on_model_save=False,
                    stage3_param_persistence_threshold=1e4)
    if t.offload_optimizer:
        zero["offload_optimizer"] = {"device": "cpu", "pin_memory": t.use_gpu}
    # bf16 without ZeRO: torch.autocast over fp32 weights, as a plain PyTorch loop does it.
    # DeepSpeed's BF16 optimizer (its bf16 path) would keep bf16 weights plus an fp32 master
    # copy and copy every gradient and weight between them at each step: 8% of the demo's
    # step on 2 cores (`mmdist bench train train.precision=bf16`, docs/performance.md).
    autocast = t.precision == "bf16" and client_optimizer_steps(t)
    ds: dict[str, Any] = {
        "train_batch_size": t.train_batch_size,
        "train_micro_batch_size_per_gpu": t.micro_batch_size,
        "gradient_accumulation_steps": t.grad_accum_steps,
        # where the client optimizer takes the step, it clips (mmdist.train.optim.FiniteAdamW)
        "gradient_clipping": 0.0 if client_optimizer_steps(t) else t.grad_clip,
        "zero_optimization": zero,
        "bf16": {"enabled": t.precision == "bf16" and not autocast},
        "fp16": {"enabled": t.precision == "fp16", "initial_scale_power": 16},
        "steps_per_print": 10**9,  # mmdist logs its own metrics
        "wall_clock_breakdown": False,
    }
    if autocast:
        ds["torch_autocast"] = {"enabled": True, "dtype": "bfloat16"}
    if t.offload_optimizer:
        # Offload needs DeepSpeed's own (CPU) Adam; it is configured here, not built in Python.
        ds["optimizer"] = {"type": "AdamW", "params": {
            "lr": t.lr, "weight_decay": t.weight_decay, "betas": [0.9, 0.999]}}
    return ds


def client_optimizer_steps(t: TrainConfig, world_size: int | None = None) -> bool:
    """Whether DeepSpeed hands each step straight to mmdist's optimizer at ``world_size``
    (default: train.num_workers): ZeRO-0 in fp32, or in bf16 (autocast, above), without
    offload. Its ZeRO and fp16/bf16 optimizers clip and skip non-finite steps themselves."""
    return (t.zero_stage_at(world_size) == 0 and t.precision in ("fp32", "bf16")
            and not t.offload_optimizer)


def cpu_fp16_supported() -> bool:
    """Whether this machine's CPU computes float16 natively (oneDNN's AVX512-FP16 / AMX-FP16
    kernels): DeepSpeed's CPU accelerator refuses fp16 without them."""
    import torch  # heavy: not loaded for --help

    try:
        return bool(torch.ops.mkldnn._is_mkldnn_fp16_supported())
    except (AttributeError, RuntimeError):  # an older or newer torch without the op
        return True  # let DeepSpeed decide


def precision_problem(cfg: Config) -> str | None:
    """Why ``train.precision`` cannot run here (a CPU run asking for fp16 on a CPU without
    float16), else None."""
    t = cfg.train
    if t.precision != "fp16" or t.use_gpu or cpu_fp16_supported():
        return None
    return ("train.precision=fp16 needs a GPU or a CPU with native float16 (AVX512-FP16 / "
            "AMX-FP16), and this machine's CPU has none (DeepSpeed refuses fp16 here): set "
            "train.precision=bf16 (or fp32) for a CPU run, or train.use_gpu=true")

