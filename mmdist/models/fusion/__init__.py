"""Fusion methods, one file each. Every method maps M token sequences ``(B, T_m, D)`` with
masks to one fused sequence ``(B, T, D)`` with a mask, and shares one constructor signature
``(dim, n_modalities, heads, slots, layers)``.

``mmdist.registry.FUSIONS`` lists them by name. A method that cannot run at a stage says so in
its class attribute ``refused_stages`` (stage -> reason), which the config's rules read.
"""

from __future__ import annotations

from torch import nn

from mmdist import registry

# Methods that combine token sequences directly; the others combine K aligned slots.
SEQUENCE_FUSIONS = ("attention", "transformer")


def build_fusion(name: str, dim: int, n_modalities: int, heads: int, slots: int,
                 layers: int) -> nn.Module:
    """The fusion method ``name`` (``mmdist.registry.FUSIONS``) for ``n_modalities`` inputs of
    width ``dim``.

    Raises:
        ValueError: unknown name (the message lists the choices).
    """
    cls = registry.load(registry.FUSIONS, name, "fusion")
    return cls(dim, n_modalities, heads=heads, slots=slots, layers=layers)


__all__ = ["SEQUENCE_FUSIONS", "build_fusion"]
