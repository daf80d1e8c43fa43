"""Light input embeddings for ``early`` fusion: token, patch and frame embeddings.

Early fusion replaces the per-modality encoders with these and gives the depth to the shared
trunk after fusion, so modalities interact from the first layer.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from mmdist.models.audio_encoder import standardise_audio
from mmdist.models.image_encoder import normalise_image

GRID = 4  # image patches per side: 16 image tokens at any resolution
AUDIO_TOKENS = 16  # at most this many audio tokens


class TextEmbedding(nn.Module):
    """Token + learned position embedding.

    Args:
        vocab_size: tokenizer size.
        dim: width D.
        max_len: longest sequence.
        pad_id: padding id.
    """

    def __init__(self, vocab_size: int, dim: int, max_len: int, pad_id: int = 0):
        super().__init__()
        self.embed = nn.Embedding(vocab_size, dim, padding_idx=pad_id)
        self.pos = nn.Parameter(torch.randn(1, max_len, dim) * 0.02)
        self.norm = nn.LayerNorm(dim)

    def forward(self, input_ids: Tensor, attention_mask: Tensor) -> tuple[Tensor, Tensor]:
        x = self.embed(input_ids) + self.pos[:, : input_ids.shape[1]]
        return self.norm(x), attention_mask.bool()


class PatchEmbedding(nn.Module):
    """Non-overlapping ``S/4`` patches, linearly embedded, plus positions (16 tokens).

    Args:
        image_size: side S of the square input.
        dim: width D.
    """

    def __init__(self, image_size: int, dim: int):
        super().__init__()
        patch = max(1, image_size // GRID)
        self.proj = nn.Conv2d(3, dim, patch, stride=patch)
        n = (image_size // patch) ** 2
        self.pos = nn.Parameter(torch.randn(1, n, dim) * 0.02)
        self.norm = nn.LayerNorm(dim)

    def forward(self, image: Tensor) -> tuple[Tensor, Tensor]:
        x = self.proj(normalise_image(image, self.proj.weight.dtype)).flatten(2).transpose(1, 2)
        x = self.norm(x + self.pos)
        return x, torch.ones(x.shape[:2], dtype=torch.bool, device=x.device)


class FrameEmbedding(nn.Module):
    """Frames averaged into at most 16 groups, linearly embedded, plus positions.

    Args:
        n_mels: mel bins.
        frames: frames per clip.
        dim: width D.
    """

    def __init__(self, n_mels: int, frames: int, dim: int):
        super().__init__()
        self.stride = -(-frames // AUDIO_TOKENS)
        self.proj = nn.Linear(n_mels, dim)
        self.pos = nn.Parameter(torch.randn(1, -(-frames // self.stride), dim) * 0.02)
        self.norm = nn.LayerNorm(dim)

    def forward(self, audio: Tensor) -> tuple[Tensor, Tensor]:
        x = standardise_audio(audio, self.proj.weight.dtype)
        x = F.avg_pool1d(x, self.stride, self.stride, ceil_mode=True).transpose(1, 2)
        x = self.norm(self.proj(x) + self.pos[:, : x.shape[1]])
        return x, torch.ones(x.shape[:2], dtype=torch.bool, device=x.device)
