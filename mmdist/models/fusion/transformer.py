"""``transformer``: joint self-attention over all modalities' tokens with type embeddings."""

from __future__ import annotations

import torch
from torch import Tensor, nn

from mmdist.models.blocks import TransformerBlock


class JointTransformer(nn.Module):
    """Tokens of all modalities concatenated, a learned modality-type embedding added to each,
    then ``layers`` pre-LN self-attention blocks.

    Args:
        dim: width D.
        n_modalities: M (one type embedding each).
        heads: attention heads.
        slots: unused (uniform constructor of the fusion registry).
        layers: self-attention blocks.
    """

    def __init__(self, dim: int, n_modalities: int, heads: int = 1, slots: int = 1,
                 layers: int = 1):
        super().__init__()
        self.types = nn.Parameter(torch.randn(n_modalities, dim) * 0.02)
        self.blocks = nn.ModuleList(TransformerBlock(dim, heads) for _ in range(layers))
        self.norm = nn.LayerNorm(dim)

    def forward(self, tokens: list[Tensor], masks: list[Tensor]) -> tuple[Tensor, Tensor]:
        x = torch.cat([t + self.types[i].to(t.dtype) for i, t in enumerate(tokens)], 1)
        mask = torch.cat(masks, 1)
        for block in self.blocks:
            x = block(x, mask)
        return self.norm(x), mask
