"""``model.compile``: torch.compile each repeated block of a built model, one by one (regional
compilation), the way torchtune and the PyTorch regional-compilation recipe do it.

The blocks are the members of the outermost ``nn.ModuleList`` of every part: the decoder's
layers (``tasks.lm.decoder.lm.transformer.h`` for gpt2), a BERT encoder's layers, the fusion
blocks and trunk. A transformer's matrix multiplies and element-wise kernels (norms,
activations, residual adds: what compiling fuses) are in them; what lies between them
(embeddings, the fusion glue, the heads and losses) stays eager.

Compiling the whole model instead loses the gradient of the LM task's loss: torch 2.15's
inductor returns a loss without ``grad_fn`` on CPU and torch 2.11's fails in the first backward
on CUDA (docs/performance.md). Compiled block by block, the same model trains with the losses
of the eager one. ``nn.Module.compile`` compiles in place, so parameter names, checkpoints and
the registered model are unchanged.

    engine = deepspeed.initialize(...)
    if cfg.model.compile:
        compile_blocks(engine.module)
"""

from __future__ import annotations

from torch import nn


def compile_blocks(model: nn.Module, **compile_kwargs) -> list[str]:
    """Compile every member of the outermost ``nn.ModuleList`` inside ``model`` in place.

    Returns:
        The qualified names of the compiled blocks (empty: the model has no repeated block).
    """
    done: list[str] = []

    def walk(module: nn.Module, prefix: str) -> None:
        for name, child in module.named_children():
            path = f"{prefix}{name}"
            if isinstance(child, nn.ModuleList):
                for i, block in enumerate(child):
                    block.compile(**compile_kwargs)
                    done.append(f"{path}.{i}")
            else:
                walk(child, f"{path}.")

    walk(model, "")
    return done
