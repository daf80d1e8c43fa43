"""``weighted``: a learned, per-sample convex combination of the modalities.

Two modalities give ``alpha * I + (1 - alpha) * T`` with ``alpha = sigmoid(a + g(x))``; more
give softmax weights over the modalities. ``a`` is a learned per-modality bias (the global
alpha) and ``g`` a per-sample gate read from each modality's own features.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from mmdist.models.fusion.slots import align_slots, slot_mask


class Weighted(nn.Module):
    """Softmax-gated sum of aligned slots (sigmoid alpha for two modalities), then LayerNorm.

    Args:
        dim: width D.
        n_modalities: M.
        heads: unused (uniform constructor of the fusion registry).
        slots: aligned slots K.
        layers: unused.
    """

    def __init__(self, dim: int, n_modalities: int, heads: int = 1, slots: int = 1,
                 layers: int = 1):
        super().__init__()
        self.slots = slots
        self.alpha = nn.Parameter(torch.zeros(n_modalities))  # global weights (logits)
        self.gate = nn.Linear(dim, 1)  # per-sample, per-slot gate logit from each modality
        nn.init.zeros_(self.gate.weight)
        nn.init.zeros_(self.gate.bias)
        # each modality is projected before weighting so the weighted sum can keep them apart
        self.proj = nn.ModuleList(nn.Linear(dim, dim) for _ in range(n_modalities))
        for p in self.proj:  # identity at init: the weighted sum starts as add's sum
            nn.init.eye_(p.weight)
            nn.init.zeros_(p.bias)
        self.norm = nn.LayerNorm(dim)

    def weights(self, x: Tensor) -> Tensor:
        """Mixing weights ``(B, M, K, 1)`` that sum to one over the modalities."""
        logits = self.alpha.view(1, -1, 1, 1).to(x.dtype) + self.gate(x)
        return torch.softmax(logits.float(), dim=1).to(x.dtype)

    def forward(self, tokens: list[Tensor], masks: list[Tensor]) -> tuple[Tensor, Tensor]:
        x = align_slots(tokens, masks, self.slots)  # (B, M, K, D)
        w = self.weights(x)
        proj = torch.stack([p(x[:, i]) for i, p in enumerate(self.proj)], 1)
        # M * (weighted mean): at init (uniform weights) the scale matches a sum.
        out = self.norm((w * proj).sum(1) * x.shape[1])
        return out, slot_mask(out)
