"""Training: the per-worker DeepSpeed loop, checkpoints, the Ray Train trainer and its backend, the `train` command."""
