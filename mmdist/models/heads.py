"""Task heads on the pooled fused vector (B, D): itm, classify, contrastive projections."""

from __future__ import annotations

import math

import torch
from torch import Tensor, nn


class MLPHead(nn.Module):
    """LayerNorm -> Linear -> GELU -> Linear: ``(B, D) -> (B, out)``.

    Args:
        dim: input width D.
        out: output features (1 for a binary logit).
    """

    def __init__(self, dim: int, out: int):
        super().__init__()
        self.net = nn.Sequential(nn.LayerNorm(dim), nn.Linear(dim, dim), nn.GELU(),
                                 nn.Linear(dim, out))

    def forward(self, x: Tensor) -> Tensor:
        return self.net(x)


class ContrastiveHead(nn.Module):
    """Projections of the text vector and the fused non-text vector into one embedding space,
    and a learned temperature (CLIP-style, initialised at 1/0.07).

    Args:
        dim: input width D.
        embed_dim: embedding width.
    """

    def __init__(self, dim: int, embed_dim: int):
        super().__init__()
        self.text = nn.Sequential(nn.LayerNorm(dim), nn.Linear(dim, embed_dim))
        self.other = nn.Sequential(nn.LayerNorm(dim), nn.Linear(dim, embed_dim))
        # shape (1,), not 0-dim: DeepSpeed ZeRO-3 cannot broadcast 0-dim bf16 parameters
        self.logit_scale = nn.Parameter(torch.full((1,), math.log(1 / 0.07)))

    def forward(self, text: Tensor, other: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """Unit-norm text and other embeddings (float32) and the logit scale."""
        t = nn.functional.normalize(self.text(text).float(), dim=-1)
        o = nn.functional.normalize(self.other(other).float(), dim=-1)
        return t, o, self.logit_scale.float().clamp(max=math.log(100.0)).exp()
