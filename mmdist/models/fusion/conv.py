"""``conv``: a 1-D convolution across the modality axis of the aligned slots."""

from __future__ import annotations

from torch import Tensor, nn

from mmdist.models.fusion.slots import align_slots, slot_mask


class ModalityConv(nn.Module):
    """Per slot, the M modality vectors form a length-M sequence with D channels; a
    zero-padded Conv1d (kernel 3) mixes neighbouring modalities, then the
    positions are flattened and projected back to D.

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
        self.conv = nn.Conv1d(dim, dim, kernel_size=3, padding=1)
        self.act = nn.GELU()
        self.proj = nn.Linear(n_modalities * dim, dim)
        self.norm = nn.LayerNorm(dim)

    def forward(self, tokens: list[Tensor], masks: list[Tensor]) -> tuple[Tensor, Tensor]:
        x = align_slots(tokens, masks, self.slots)  # (B, M, K, D)
        b, m, k, d = x.shape
        seq = x.permute(0, 2, 3, 1).reshape(b * k, d, m)  # channels D, length M
        y = self.act(self.conv(seq)) + seq
        y = self.norm(self.proj(y.transpose(1, 2).reshape(b, k, m * d)))
        return y, slot_mask(y)
