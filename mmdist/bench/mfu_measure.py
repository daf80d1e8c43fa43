"""Measuring training steps on one device for `mmdist bench mfu`: seconds per step, tokens
per sample, peak memory, a torch.profiler table, and the real-preprocessing batches."""

from __future__ import annotations

import resource
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any

from mmdist.data.preprocess import PreprocessSpec

# torch (and the mmdist modules that import it) is imported inside the functions:
# `mmdist bench --help` imports `bench.mfu`, and with it this module, to build its parser.
if TYPE_CHECKING:
    import torch

    from mmdist.config import Config


def synchronize(device: torch.device) -> None:
    """Wait for the work queued on ``device`` (CUDA; nothing to wait for on CPU)."""
    import torch  # heavy: not loaded for --help

    if device.type == "cuda":
        torch.cuda.synchronize(device)


def timed_steps(step: Callable[[dict], None], batches: Iterator[dict], warmup: int, steps: int,
                device: torch.device) -> float:
    """Seconds per step over ``steps`` steps after ``warmup`` untimed ones."""
    for _ in range(warmup):
        step(next(batches))
    synchronize(device)
    t0 = time.perf_counter()
    for _ in range(steps):
        step(next(batches))
    synchronize(device)
    return (time.perf_counter() - t0) / steps


def cycle_batches(batches: list[dict]) -> Iterator[dict]:
    """The same batches over and over."""
    while True:
        yield from batches


def real_batches(data_dir: Path, cfg: Config, workers: int,
                 device: torch.device) -> Iterator[dict]:
    """Full micro batches from the shards through a DataLoader, moved to ``device`` (as the
    training loop does); starts a new epoch when the shards run out."""
    from torch.utils.data import DataLoader  # heavy: not loaded for --help

    from mmdist.data.schema import to_device
    from mmdist.data.shard_batches import ShardBatches  # loads torch: not for --help

    b = cfg.train.micro_batch_size
    spec = PreprocessSpec.from_config(cfg.data, augment=cfg.data.augment)
    ds = ShardBatches(data_dir, "train", spec, batch_size=b, shuffle_seed=cfg.train.seed)
    loader = DataLoader(ds, batch_size=None, num_workers=workers,
                        pin_memory=device.type == "cuda", persistent_workers=workers > 0,
                        prefetch_factor=4 if workers else None)
    while True:
        n = 0
        for batch in loader:
            if batch["input_ids"].shape[0] != b:
                continue  # the last partial batch of a shard file
            n += 1
            yield to_device(batch, device)
        if n == 0:
            raise RuntimeError(f"{data_dir}: no full batch of {b} rows in the train shards")


def count_tokens(engine, step: Callable[[dict], None], batch: dict, cfg: Config) -> dict[str, int]:
    """Run one step with hooks on the encoders: tokens per sample by modality."""
    module = engine.module
    seen: dict[str, int] = {}
    handles = []
    for name, enc in getattr(module, "encoders", {}).items():
        def hook(_mod, _inp, out, name=name):
            seen[name] = int(out[0].shape[1])
        handles.append(enc.register_forward_hook(hook))
    try:
        step(batch)
    finally:
        for h in handles:
            h.remove()
    tokens = {"text": cfg.data.max_text_len} if "text" in cfg.model.modalities else {}
    tokens.update({m: n for m, n in seen.items() if m != "text"})
    return tokens


def peak_memory(device: torch.device) -> tuple[int, str]:
    """Peak bytes so far and how they were measured: ``torch.cuda.max_memory_allocated`` on
    CUDA, the process's peak RSS on CPU."""
    import torch  # heavy: not loaded for --help

    if device.type == "cuda":
        return int(torch.cuda.max_memory_allocated(device)), "torch.cuda.max_memory_allocated"
    return int(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss) * 1024, "peak RSS"


def profile_steps(step: Callable[[dict], None], batches: Iterator[dict], n: int,
                  device: torch.device, rows: int) -> list[dict[str, Any]]:
    """Run ``n`` steps under torch.profiler, print the top ``rows`` ops by self time and
    return them with their share of the total."""
    from torch.profiler import ProfilerActivity, profile  # heavy: not loaded for --help

    activities = [ProfilerActivity.CPU]
    if device.type == "cuda":
        activities.append(ProfilerActivity.CUDA)
    with profile(activities=activities) as prof:
        for _ in range(n):
            step(next(batches))
        synchronize(device)
    key = "self_device_time_total" if device.type == "cuda" else "self_cpu_time_total"
    averages = prof.key_averages()
    print(f"\nwhere the time goes: torch.profiler over {n} on-device steps, top ops by "
          f"{key.replace('_', ' ')}")
    print(averages.table(sort_by=key, row_limit=rows), flush=True)
    total = sum(getattr(e, key) for e in averages) or 1.0
    top = sorted(averages, key=lambda e: getattr(e, key), reverse=True)[:rows]
    return [{"op": e.key, "self_us": float(getattr(e, key)), "calls": int(e.count),
             "share": float(getattr(e, key)) / total} for e in top]
