"""``attention``: text tokens (queries) cross-attend to the tokens of the other modalities."""

from __future__ import annotations

import torch
from torch import Tensor, nn

from mmdist.models.blocks import TransformerBlock


class CrossAttention(nn.Module):
    """``layers`` pre-LN cross-attention blocks: queries are the first input (text), keys and
    values the other inputs' tokens concatenated (the first input itself when it is alone).

    Args:
        dim: width D.
        n_modalities: unused (uniform constructor of the fusion registry).
        heads: attention heads.
        slots: unused.
        layers: cross-attention blocks.
    """

    # Stages it can run at, and why not at the others (read by the config's rules).
    refused_stages = {"late": "late fusion combines one pooled output per modality, so "
                      "cross-attention has no token sequence to attend over; use stage "
                      "early/mid or fusion transformer/weighted/concat"}

    def __init__(self, dim: int, n_modalities: int = 1, heads: int = 1, slots: int = 1,
                 layers: int = 1):
        super().__init__()
        self.blocks = nn.ModuleList(TransformerBlock(dim, heads) for _ in range(layers))
        self.norm = nn.LayerNorm(dim)
        self.context_norm = nn.LayerNorm(dim)

    def forward(self, tokens: list[Tensor], masks: list[Tensor]) -> tuple[Tensor, Tensor]:
        x, mask = tokens[0], masks[0]
        if len(tokens) > 1:
            context, context_mask = torch.cat(tokens[1:], 1), torch.cat(masks[1:], 1)
        else:
            context, context_mask = x, mask
        context = self.context_norm(context)
        for block in self.blocks:
            x = block(x, mask, context, context_mask)
        return self.norm(x), mask
