"""``mul``: element-wise (Hadamard) product of the aligned slots of all modalities."""

from __future__ import annotations

from torch import Tensor, nn

from mmdist.models.fusion.slots import align_slots, slot_mask


class Mul(nn.Module):
    """Product of per-modality projections of the aligned slots, then LayerNorm.

    Each modality is projected as ``1 + W_m x`` before the product: at initialisation the
    product is close to the sum of the projections (a plain product of unit-scale features has
    vanishing gradients wherever one factor is near zero), and the multiplicative interaction
    grows as the projections learn.

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
        self.proj = nn.ModuleList(nn.Linear(dim, dim) for _ in range(n_modalities))
        self.norm = nn.LayerNorm(dim)

    def forward(self, tokens: list[Tensor], masks: list[Tensor]) -> tuple[Tensor, Tensor]:
        x = align_slots(tokens, masks, self.slots)
        out = None
        for i, proj in enumerate(self.proj):
            f = 1.0 + proj(x[:, i])
            out = f if out is None else out * f
        x = self.norm(out)
        return x, slot_mask(x)
