"""``recurrent``: a GRU reads the modalities of each slot as a sequence."""

from __future__ import annotations

from torch import Tensor, nn

from mmdist.models.fusion.slots import align_slots, slot_mask


class Recurrent(nn.Module):
    """Per slot, a GRU over the M modality vectors (in config order); its last state, projected
    and normalised, is the fused slot.

    Args:
        dim: width D.
        n_modalities: unused (uniform constructor of the fusion registry).
        heads: unused.
        slots: aligned slots K.
        layers: GRU layers.
    """

    def __init__(self, dim: int, n_modalities: int = 1, heads: int = 1, slots: int = 1,
                 layers: int = 1):
        super().__init__()
        self.slots = slots
        self.gru = nn.GRU(dim, dim, num_layers=layers, batch_first=True)
        self.proj = nn.Linear(dim, dim)
        self.norm = nn.LayerNorm(dim)

    def forward(self, tokens: list[Tensor], masks: list[Tensor]) -> tuple[Tensor, Tensor]:
        x = align_slots(tokens, masks, self.slots)  # (B, M, K, D)
        b, m, k, d = x.shape
        seq = x.permute(0, 2, 1, 3).reshape(b * k, m, d)
        out, _ = self.gru(seq)
        y = self.norm(self.proj(out[:, -1]).view(b, k, d))
        return y, slot_mask(y)
