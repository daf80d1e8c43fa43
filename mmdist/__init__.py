"""mmdist: fused multimodal LMs trained as Ray jobs."""
__version__ = "0.1.0"
