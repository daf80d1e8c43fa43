"""Building transformers models from a config, also inside ``deepspeed.zero.Init``.

Under ZeRO-3 the trainer builds the whole fused model inside ``zero.Init``: every submodule's
parameters are partitioned (emptied) as soon as it is constructed, so the weight init that a
transformers model runs at the end of its constructor would index empty tensors. There the
model is built with its init switched off, then initialised by transformers' ZeRO-3 routine
that gathers each module's parameters first.
"""

from __future__ import annotations

import sys

from torch import nn
from transformers import initialization as hf_init
from transformers.integrations.deepspeed import initialize_weights_zero3


def inside_zero_init() -> bool:
    """True while a ``deepspeed.zero.Init`` context is open (without importing deepspeed)."""
    pp = sys.modules.get("deepspeed.runtime.zero.partition_parameters")
    return pp is not None and getattr(pp, "zero_init_context", 0) > 0


def build_transformers_model(cls: type, config, **kwargs) -> nn.Module:
    """``cls(config, **kwargs)`` with correct weight init inside or outside ``zero.Init``."""
    if not inside_zero_init():
        return cls(config, **kwargs)
    with hf_init.no_init_weights():
        model = cls(config, **kwargs)
    initialize_weights_zero3(model)
    model.tie_weights()
    return model
