"""A small training loop on synthetic batches, shared by the learnability tests."""

from __future__ import annotations

import torch

from mmdist.config import Config
from mmdist.models import build_model
from mmdist.tasks import compute_metrics
from tests.unit.synthetic_mm import VOCAB, make_batch


def train_and_eval(cfg: Config, steps: int = 300, batch_size: int = 32, lr: float = 2e-3,
                   n_classes: int = 4, seed: int = 0, n_train_batches: int = 64,
                   n_val_batches: int = 4, has: dict[str, bool] | None = None
                   ) -> dict[str, float]:
    """Train a fresh model for ``steps`` AdamW steps on a fixed pool of synthetic batches and
    return its validation metrics on unseen batches. ``has`` marks modalities absent in every
    batch (e.g. ``{"image": False, "audio": False}`` for a text-only model)."""
    torch.manual_seed(seed)
    model = build_model(cfg, VOCAB)
    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.01)
    train = [make_batch(cfg, batch_size, n_classes, seed=1000 + i, has=has) for i in range(n_train_batches)]
    val = [make_batch(cfg, batch_size, n_classes, seed=i, has=has) for i in range(n_val_batches)]
    model.train()
    for step in range(steps):
        warm = min(1.0, (step + 1) / 20)
        for group in opt.param_groups:
            group["lr"] = lr * warm
        loss = model(train[step % n_train_batches])["loss"]
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
    model.eval()
    with torch.no_grad():
        outs = [model.eval_outputs(b) for b in val]
    merged = {k: torch.cat([o[k] for o in outs]) for k in outs[0]}
    return compute_metrics(cfg, merged, model.vocab)
