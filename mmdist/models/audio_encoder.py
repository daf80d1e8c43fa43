"""Audio encoders over log-mel spectrograms ``(B, n_mels, F)``: ``conv`` or ``transformer``."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from mmdist.models.blocks import TransformerStack


def standardise_audio(audio: Tensor, dtype: torch.dtype) -> Tensor:
    """Cast to ``dtype`` and standardise each clip (log-mel scales differ between sources)."""
    x = audio.to(dtype)
    mean = x.mean(dim=(1, 2), keepdim=True)
    std = x.std(dim=(1, 2), keepdim=True) if x[0].numel() > 1 else torch.ones_like(mean)
    return (x - mean) / (std + 1e-3)


class ConvAudioEncoder(nn.Module):
    """1-D conv stack over time (mel bins as channels), each stage halving the frames.

    Args:
        n_mels: mel bins.
        channels: output channels per stage.
        dim: output width D.
    """

    def __init__(self, n_mels: int, channels: tuple[int, ...], dim: int):
        super().__init__()
        layers: list[nn.Module] = []
        c_in = n_mels
        for c in channels:
            layers += [nn.Conv1d(c_in, c, 3, stride=2, padding=1), nn.GroupNorm(min(8, c), c),
                       nn.GELU()]
            c_in = c
        self.features = nn.Sequential(*layers)
        self.proj = nn.Linear(c_in, dim)
        self.norm = nn.LayerNorm(dim)

    def forward(self, audio: Tensor) -> tuple[Tensor, Tensor]:
        """log-mel ``(B, n_mels, F)`` -> tokens ``(B, F', D)`` and an all-true mask."""
        x = self.features(standardise_audio(audio, self.proj.weight.dtype))
        tokens = self.norm(self.proj(x.transpose(1, 2)))
        return tokens, torch.ones(tokens.shape[:2], dtype=torch.bool, device=tokens.device)


class TransformerAudioEncoder(nn.Module):
    """Frames averaged in groups of ``stride``, embedded, then a transformer over time.

    Args:
        n_mels: mel bins.
        frames: frames per clip (sets the position table).
        dim: width D.
        heads: attention heads.
        layers: transformer layers.
        stride: frames per token.
    """

    def __init__(self, n_mels: int, frames: int, dim: int, heads: int, layers: int,
                 stride: int = 4):
        super().__init__()
        self.stride = stride
        self.embed = nn.Linear(n_mels, dim)
        self.pos = nn.Parameter(torch.randn(1, -(-frames // stride), dim) * 0.02)
        self.encoder = TransformerStack(dim, heads, layers)

    def forward(self, audio: Tensor) -> tuple[Tensor, Tensor]:
        x = standardise_audio(audio, self.embed.weight.dtype)
        x = F.avg_pool1d(x, self.stride, self.stride, ceil_mode=True).transpose(1, 2)
        x = self.embed(x) + self.pos[:, : x.shape[1]]
        mask = torch.ones(x.shape[:2], dtype=torch.bool, device=x.device)
        return self.encoder(x, mask), mask


def build_audio_encoder(kind: str, n_mels: int, frames: int, dim: int, heads: int, layers: int,
                        channels: tuple[int, ...]) -> nn.Module:
    """The audio encoder named ``kind`` (``conv``, ``transformer``) at width ``dim``."""
    if kind == "conv":
        return ConvAudioEncoder(n_mels, channels, dim)
    if kind == "transformer":
        return TransformerAudioEncoder(n_mels, frames, dim, heads, layers)
    raise ValueError(f"unknown audio encoder {kind!r}; choose from ['conv', 'transformer']")
