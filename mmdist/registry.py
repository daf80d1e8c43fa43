"""Every pluggable part by name: where it lives, as ``"module:attribute"``, imported on first use.

Adding a task or a fusion method is one new file plus one entry here. The config reads these
names (its choices, its messages, ``--help``) without importing torch; the model builder and the
config's task rules import the part itself through :func:`load`, as torchtune's ``_component_``
does. Encoders and decoders are chosen by name inside their builder modules.
"""

from __future__ import annotations

import importlib
from typing import Any

TASKS = {
    "itm": "mmdist.tasks.itm:ITM",
    "contrastive": "mmdist.tasks.contrastive:Contrastive",
    "classify": "mmdist.tasks.classify:Classify",
    "lm": "mmdist.tasks.lm:LM",
    "prompted": "mmdist.tasks.prompted:Prompted",
    "vqa": "mmdist.tasks.vqa:VQA",
    "multitask": "mmdist.tasks.multitask:Multitask",
}

FUSIONS = {
    "concat": "mmdist.models.fusion.concat:Concat",
    "add": "mmdist.models.fusion.add:Add",
    "mul": "mmdist.models.fusion.mul:Mul",
    "weighted": "mmdist.models.fusion.weighted:Weighted",
    "attention": "mmdist.models.fusion.attention:CrossAttention",
    "transformer": "mmdist.models.fusion.transformer:JointTransformer",
    "conv": "mmdist.models.fusion.conv:ModalityConv",
    "recurrent": "mmdist.models.fusion.recurrent:Recurrent",
}

TEXT_ENCODERS = ("bert", "lstm", "gru")
IMAGE_ENCODERS = ("cnn", "resnet18", "resnet50", "vit_b_16")
AUDIO_ENCODERS = ("conv", "transformer")
VIDEO_TEMPORALS = ("mean", "transformer", "tokens")  # across frames (models/video_encoder.py)
DECODERS = ("gpt2", "llama", "lstm")


def load(registry: dict[str, str], name: str, what: str) -> Any:
    """The object registered as ``name``.

    Raises:
        ValueError: ``name`` is not registered (the message lists the choices).
    """
    if name not in registry:
        raise ValueError(f"unknown {what} {name!r}; choose from {sorted(registry)}")
    module, _, attr = registry[name].partition(":")
    return getattr(importlib.import_module(module), attr)
