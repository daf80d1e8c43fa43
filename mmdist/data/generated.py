"""The generated sources: rows that are a pure function of ``(seed, index)``, nothing read.

One place builds them, for `mmdist prepare --source NAME` and for `mmdist train` without
``data.path`` (which prepares ``data.synthetic_source``, :func:`synthetic_source_name`):

    synthetic        colour/shape images, tones, captions    (mmdist.data.synthetic)
    digits           handwritten and spoken digits           (mmdist.data.digits)
    mmt              translation where the image resolves words  (mmdist.data.mmt)
    synthetic_video  moving shapes with a tone; the motion is the answer  (synthetic_video)
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from mmdist.config import SYNTHETIC_SOURCES, task_class
from mmdist.data.digits import DigitsSource
from mmdist.data.mmt import MMTSource
from mmdist.data.sources import SyntheticSource
from mmdist.data.synthetic_video import SyntheticVideoSource
from mmdist.data.video import VideoSpec

if TYPE_CHECKING:
    from mmdist.config import Config, DataConfig


def generated_source(name: str, data: DataConfig, seed: int, *, video_captions: str = "text",
                     digits_caption: str = "both", digits_label: str = "written") -> Any:
    """The generated source ``name`` of ``data.synthetic_samples`` rows at ``data``'s sizes.

    Args:
        name: one of ``SYNTHETIC_SOURCES``.
        data: the data config (sample count, image size, audio, video frames).
        seed: the dataset seed.
        video_captions: synthetic_video: the caption is the row's text or its target.
        digits_caption, digits_label: digits: what the caption names and the label is.

    Raises:
        ValueError: an unknown name.
    """
    n = data.synthetic_samples
    if name == "synthetic":
        return SyntheticSource(num_samples=n, seed=seed, image_size=data.image_size,
                               sample_rate=data.sample_rate, audio_seconds=data.audio_seconds)
    if name == "mmt":
        return MMTSource(num_samples=n, seed=seed, image_size=data.image_size)
    if name == "digits":
        return DigitsSource(num_samples=n, seed=seed, image_size=data.image_size,
                            audio_seconds=data.audio_seconds, caption=digits_caption,
                            label=digits_label)
    if name == "synthetic_video":
        return SyntheticVideoSource(num_samples=n, seed=seed,
                                    video_spec=VideoSpec.from_config(data),
                                    captions=video_captions)
    raise ValueError(f"unknown generated source {name!r}; choose from {list(SYNTHETIC_SOURCES)}")


def synthetic_source_name(cfg: Config) -> str:
    """What `mmdist train` prepares without ``data.path``: ``data.synthetic_source``, else
    synthetic_video when the model reads video, else synthetic."""
    if cfg.data.synthetic_source:
        return cfg.data.synthetic_source
    return "synthetic_video" if "video" in cfg.model.modalities else "synthetic"


def synthetic_source_for(cfg: Config, data: DataConfig, seed: int) -> Any:
    """The source of :func:`synthetic_source_name` for ``cfg``, at ``data``'s sizes. Video
    captions are the targets (subtitles as text) when the task writes text."""
    writes = task_class(cfg.model.task).uses_decoder(cfg.model)
    return generated_source(synthetic_source_name(cfg), data, seed,
                            video_captions="target" if writes else "text")
