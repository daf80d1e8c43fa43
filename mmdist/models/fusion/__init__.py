"""Fusion methods, one file each. Every method maps M token sequences ``(B, T_m, D)`` with
masks to one fused sequence ``(B, T, D)`` with a mask, and shares one constructor signature
``(dim, n_modalities, heads, slots, layers)``.

``FUSIONS`` is the registry: a dict literal, no import-time registration.
"""

from __future__ import annotations

from torch import nn

from mmdist.models.fusion.add import Add
from mmdist.models.fusion.attention import CrossAttention
from mmdist.models.fusion.concat import Concat
from mmdist.models.fusion.conv import ModalityConv
from mmdist.models.fusion.mul import Mul
from mmdist.models.fusion.recurrent import Recurrent
from mmdist.models.fusion.transformer import JointTransformer
from mmdist.models.fusion.weighted import Weighted

FUSIONS = {
    "concat": Concat,
    "add": Add,
    "mul": Mul,
    "weighted": Weighted,
    "attention": CrossAttention,
    "transformer": JointTransformer,
    "conv": ModalityConv,
    "recurrent": Recurrent,
}

# Methods that combine token sequences directly; the others combine K aligned slots.
SEQUENCE_FUSIONS = ("attention", "transformer")


def build_fusion(name: str, dim: int, n_modalities: int, heads: int, slots: int,
                 layers: int) -> nn.Module:
    """The fusion method ``name`` for ``n_modalities`` inputs of width ``dim``.

    Raises:
        ValueError: unknown name (the message lists the choices).
    """
    if name not in FUSIONS:
        raise ValueError(f"unknown fusion {name!r}; choose from {sorted(FUSIONS)}")
    return FUSIONS[name](dim, n_modalities, heads=heads, slots=slots, layers=layers)


__all__ = ["FUSIONS", "SEQUENCE_FUSIONS", "build_fusion"]
