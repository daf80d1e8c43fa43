"""The video encoder: an image encoder applied to every frame, then temporal fusion.

Input uint8 ``(B, K, 3, S, S)`` (``schema.py``); the frame encoder is whatever image encoder the
config names (``model.image_encoder``, a pretrained ``model.image_pretrained``, or the early
stage's patch embedding), so a video model reuses every image backbone. Across time
(``model.video_temporal``):

    mean         the frames' token grids averaged over time: T tokens; blind to order (a
                 baseline, and cheap)
    transformer  each frame pooled to one vector + a learned time embedding, a transformer
                 over the K vectors: K tokens
    tokens       every frame's tokens + a learned time embedding: K x T tokens (cap them with
                 model.modality_tokens.video; pooling keeps time order)

The output is tokens ``(B, T', D)`` with a mask, the contract every fusion method and stage
takes.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from mmdist.models.blocks import TransformerStack, masked_mean


class VideoEncoder(nn.Module):
    """Per-frame encoder + temporal fusion.

    Args:
        frame: an image encoder, ``uint8 (N, 3, S, S) -> (tokens (N, T, D), mask (N, T))``.
        temporal: ``mean``, ``transformer`` or ``tokens`` (``registry.VIDEO_TEMPORALS``).
        frames: K, frames per clip (sizes the time embedding).
        dim: width D.
        heads: attention heads of the temporal transformer.
        layers: its blocks.
    """

    def __init__(self, frame: nn.Module, temporal: str, frames: int, dim: int, heads: int,
                 layers: int):
        super().__init__()
        if temporal not in ("mean", "transformer", "tokens"):
            raise ValueError(f"unknown video temporal fusion {temporal!r}; choose from "
                             "['mean', 'tokens', 'transformer']")
        self.frame = frame
        self.temporal = temporal
        self.frames = frames
        self.time = (nn.Parameter(torch.randn(1, frames, 1, dim))
                     if temporal != "mean" else None)
        self.mixer = (TransformerStack(dim, heads, max(1, layers)) if temporal == "transformer"
                      else None)

    def forward(self, video: Tensor) -> tuple[Tensor, Tensor]:
        """uint8 ``(B, K, 3, S, S)`` -> tokens ``(B, T', D)`` and mask ``(B, T')``."""
        b, k = video.shape[:2]
        if k != self.frames:
            raise ValueError(f"video of {k} frames; this encoder was built for {self.frames} "
                             "(data.video_frames)")
        tokens, mask = self.frame(video.flatten(0, 1))
        t, d = tokens.shape[1:]
        tokens, mask = tokens.view(b, k, t, d), mask.view(b, k, t)
        if self.temporal == "mean":
            w = mask.to(tokens.dtype).unsqueeze(-1)
            out = (tokens * w).sum(1) / w.sum(1).clamp_min(1.0)
            return out, mask.any(1)
        time = self.time.to(tokens.dtype)
        if self.temporal == "tokens":
            return (tokens + time).reshape(b, k * t, d), mask.reshape(b, k * t)
        per_frame = masked_mean(tokens.flatten(0, 1), mask.flatten(0, 1)).view(b, k, d)
        frame_mask = mask.any(2)
        return self.mixer(per_frame + time[:, :, 0], frame_mask), frame_mask
