"""What a pretrained vision model's saved image processor says its input is: the square side
and the per-channel mean and std (JSON only, no torch or transformers: the config reads it to
set ``data.image_size``)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from mmdist.data.hf_audio import processor_json, read_json

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


def _side(size: Any, where: str) -> int:
    if isinstance(size, int):
        return size
    if isinstance(size, dict):
        if "height" in size and "width" in size:
            if size["height"] != size["width"]:
                raise ValueError(f"{where}: images of {size['height']}x{size['width']} pixels; "
                                 "mmdist's images are square")
            return int(size["height"])
        if "shortest_edge" in size:
            return int(size["shortest_edge"])
    raise ValueError(f"{where}: cannot read an image size from {size!r}")


def image_processor_facts(path: str) -> dict[str, Any]:
    """The input a vision model in a local directory expects: ``{"size": S, "mean": [3
    floats], "std": [3 floats]}`` (light: JSON only).

    Read from the saved image processor (``preprocessor_config.json``, or nested in
    ``processor_config.json``): the crop size when it centre-crops, else its size (an int,
    ``{"height", "width"}`` or ``{"shortest_edge"}``); mean/std ``image_mean``/``image_std``
    (0 and 1 when ``do_normalize`` is false). Without a saved processor: the model config's
    ``image_size`` (its vision config's for CLIP/SigLIP) and ImageNet's mean/std.

    Raises:
        FileNotFoundError: not a directory, or neither a processor nor a ``config.json``.
        ValueError: a non-square size, or no size to read.
    """
    d = Path(path)
    if not d.is_dir():
        raise FileNotFoundError(f"{path!r}: not a directory")
    facts = processor_json(d, "image_processor")
    if facts is None:
        if not (d / "config.json").is_file():
            raise FileNotFoundError(f"{path!r}: no preprocessor_config.json or config.json")
        config = read_json(d / "config.json")
        vision = config.get("vision_config") or config
        if "image_size" not in vision:
            raise ValueError(f"{path!r}: no saved image processor and no image_size in "
                             "config.json")
        return {"size": _side(vision["image_size"], path), "mean": list(IMAGENET_MEAN),
                "std": list(IMAGENET_STD)}
    where = f"{path!r} (image processor)"
    crop = facts.get("crop_size")
    if crop is not None and facts.get("do_center_crop", True):
        size = _side(crop, where)
    elif facts.get("size") is not None:
        size = _side(facts["size"], where)
    else:
        raise ValueError(f"{where}: no size or crop_size")
    if facts.get("do_normalize", True):
        mean = [float(m) for m in _three(facts.get("image_mean", IMAGENET_MEAN))]
        std = [float(s) for s in _three(facts.get("image_std", IMAGENET_STD))]
    else:
        mean, std = [0.0] * 3, [1.0] * 3
    return {"size": size, "mean": mean, "std": std}


def _three(v: Any) -> list[float]:
    return [float(v)] * 3 if isinstance(v, int | float) else list(v)
