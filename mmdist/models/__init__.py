"""The fused multimodal model: encoders, fusion methods (``mmdist.models.fusion``), task heads,
decoder LMs, metrics and size/FLOPs accounting."""

from mmdist.models.fused import FusedModel, build_model, count_parameters

__all__ = ["FusedModel", "build_model", "count_parameters"]
