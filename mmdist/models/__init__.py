"""The fused multimodal model: encoders, fusion methods (``mmdist.models.fusion``), task heads,
decoder LMs, metrics (``mmdist.models.metrics``) and size/FLOPs accounting."""

from mmdist.models.accounting import flops_per_sample, forward_flops_per_sample, parameter_count
from mmdist.models.fused import FusedModel, build_model, count_parameters

__all__ = ["FusedModel", "build_model", "count_parameters", "flops_per_sample",
           "forward_flops_per_sample", "parameter_count"]
