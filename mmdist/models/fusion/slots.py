"""Align token sequences of different lengths to ``K`` slots, for element-wise fusion methods.

Each modality's tokens are split into ``K`` contiguous chunks and averaged over the real
(masked-in) tokens of each chunk; a chunk with no real token takes the modality's mean. The
element-wise methods (concat, add, mul, weighted, conv, recurrent) then combine slot ``k`` of
every modality.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from mmdist.models.blocks import masked_mean


def align_slots(tokens: list[Tensor], masks: list[Tensor], slots: int) -> Tensor:
    """``M`` sequences ``(B, T_m, D)`` with masks -> one tensor ``(B, M, K, D)``."""
    out = []
    for x, mask in zip(tokens, masks):
        w = mask.to(x.dtype).unsqueeze(-1)
        if x.shape[1] == slots:
            pooled = x
        else:
            k = min(slots, x.shape[1])
            num = F.adaptive_avg_pool1d((x * w).transpose(1, 2), k).transpose(1, 2)
            den = F.adaptive_avg_pool1d(w.transpose(1, 2), k).transpose(1, 2)
            mean = masked_mean(x, mask).unsqueeze(1)
            pooled = torch.where(den > 0, num / den.clamp_min(1e-6), mean)
            if k < slots:  # fewer tokens than slots: repeat the last
                pooled = torch.cat([pooled, pooled[:, -1:].expand(-1, slots - k, -1)], 1)
        out.append(pooled)
    return torch.stack(out, 1)


def slot_mask(x: Tensor) -> Tensor:
    """All-true mask ``(B, K)`` for slot output ``(B, K, D)``."""
    return torch.ones(x.shape[:2], dtype=torch.bool, device=x.device)
