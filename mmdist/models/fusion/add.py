"""``add``: the aligned slots of all modalities summed."""

from __future__ import annotations

from torch import Tensor, nn

from mmdist.models.fusion.slots import align_slots, slot_mask


class Add(nn.Module):
    """Sum of aligned slots, then LayerNorm (the sum of M unit-scale inputs is rescaled).

    Args:
        dim: width D.
        n_modalities: unused (uniform constructor of the fusion registry).
        heads: unused.
        slots: aligned slots K.
        layers: unused.
    """

    def __init__(self, dim: int, n_modalities: int = 1, heads: int = 1, slots: int = 1,
                 layers: int = 1):
        super().__init__()
        self.slots = slots
        self.norm = nn.LayerNorm(dim)

    def forward(self, tokens: list[Tensor], masks: list[Tensor]) -> tuple[Tensor, Tensor]:
        x = self.norm(align_slots(tokens, masks, self.slots).sum(1))
        return x, slot_mask(x)
