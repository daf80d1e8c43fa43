"""Activation checkpointing (``model.activation_checkpointing``): recompute activations in the
backward pass instead of keeping them, trading about one extra forward for memory.

It is applied to the transformers parts of a built model (the gpt2 / llama decoder, a bert text
encoder): they carry their own per-layer checkpointing, used here non-reentrant (works with
ZeRO-3's parameter gathering and with inputs that need no gradient). For the decoder LMs these
layers hold almost all of the FLOPs and activation memory; mmdist's own small encoders,
fusion and trunk are left as they are.

    model = build_model(cfg, vocab_size)
    if cfg.model.activation_checkpointing:
        enable_activation_checkpointing(model)   # before deepspeed.initialize
"""

from __future__ import annotations

from torch import nn


def enable_activation_checkpointing(model: nn.Module) -> list[str]:
    """Turn on per-layer activation checkpointing in every transformers model inside ``model``.

    Returns:
        The qualified names of the parts it was turned on for (empty: nothing supports it).
    """
    from transformers import PreTrainedModel  # heavy: on first use (transformers_init)

    done: list[str] = []
    for name, module in model.named_modules():
        if any(name.startswith(f"{d}.") for d in done):
            continue  # the outer transformers model already covers its inner one
        if isinstance(module, PreTrainedModel) and module.supports_gradient_checkpointing:
            kwargs = {"use_reentrant": False}
            if hasattr(module, "activation_checkpointing_enable"):  # transformers >= 5
                module.activation_checkpointing_enable(activation_checkpointing_kwargs=kwargs)
            else:
                module.gradient_checkpointing_enable(gradient_checkpointing_kwargs=kwargs)
            done.append(name)
    return done
