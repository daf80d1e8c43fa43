"""The parts of the fused multimodal model: encoders, fusion methods (``mmdist.models.fusion``),
heads, decoder LMs, the model itself (``fused``), its builder, its files on disk
(``model_files``), torchmetrics-based metrics and size/FLOPs accounting. Tasks live in
``mmdist.tasks``."""

from mmdist.models.accounting import flops_per_sample, forward_flops_per_sample, parameter_count
from mmdist.models.builder import build_model, count_parameters
from mmdist.models.fused import FusedModel
from mmdist.models.model_files import load_model, save_model

__all__ = ["FusedModel", "build_model", "count_parameters", "flops_per_sample",
           "forward_flops_per_sample", "load_model", "parameter_count", "save_model"]
