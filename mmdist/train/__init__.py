"""Training: the per-worker DeepSpeed loop, checkpoints, the TorchTrainer, the `train` command."""
