"""``concat``: per slot, the modalities' features concatenated and projected back to D."""

from __future__ import annotations

from torch import Tensor, nn

from mmdist.models.fusion.slots import align_slots, slot_mask


class Concat(nn.Module):
    """Feature concatenation of aligned slots -> Linear(M*D, D) -> GELU -> LayerNorm.

    Args:
        dim: width D.
        n_modalities: M, the number of inputs.
        heads: unused (uniform constructor of the fusion registry).
        slots: aligned slots K.
        layers: unused.
    """

    def __init__(self, dim: int, n_modalities: int, heads: int = 1, slots: int = 1,
                 layers: int = 1):
        super().__init__()
        self.slots = slots
        self.proj = nn.Linear(n_modalities * dim, dim)
        self.act = nn.GELU()
        self.norm = nn.LayerNorm(dim)

    def forward(self, tokens: list[Tensor], masks: list[Tensor]) -> tuple[Tensor, Tensor]:
        x = align_slots(tokens, masks, self.slots)  # (B, M, K, D)
        b, m, k, d = x.shape
        x = x.permute(0, 2, 1, 3).reshape(b, k, m * d)
        x = self.norm(self.act(self.proj(x)))
        return x, slot_mask(x)
