"""`mmdist bench mfu`: model-FLOPs utilisation (MFU) of the real training step on one device.

The step is the one ``mmdist train`` runs on every worker (``mmdist.train.loop``): the same
``build_model``, ``build_optimizer`` and ``deepspeed.initialize`` with ``deepspeed_config(cfg,
1)``, then ``engine(batch)["loss"]``, ``engine.backward``, ``engine.step``. It runs in a plain
process without Ray: when no process group exists it creates a 1-rank group itself (gloo on
CPU, NCCL on CUDA; MASTER_ADDR=127.0.0.1 and a free port; :mod:`mmdist.bench.process_group`).
``torchrun`` works too, and sets the rendezvous variables itself::

    mmdist bench mfu --config mfu_lm_1b
    torchrun --standalone --nproc-per-node=1 -m mmdist.cli bench mfu --config mfu_lm_1b

Two passes over the same engine, each with warm-up steps first, are timed in one run:

* on-device: synthetic batches (``schema.random_batch``) made on the device before timing, so
  the step waits on nothing but compute. Throughput, TFLOP/s and MFU come from this pass.
* real preprocessing: synthetic shards (``prepare_synthetic``, cached under
  ``.cache/bench_mfu/``, or ``data.path``) read through ``ShardBatches`` in a torch
  ``DataLoader`` (the same ``preprocess_batch`` as every other path), copied to the device in
  the step. ``data-stall ratio = real-data step time / on-device step time`` (1.0: the input
  pipeline keeps up; 2.0: the device idles half the time). ``mmdist train`` reads through Ray
  Data instead; ``mmdist bench ingest`` compares the two readers.

Definitions:

* FLOPs: ``mmdist.models.accounting.flops_per_sample`` (analytic, matrix multiplies and
  attention scores, training = 3 x forward), on padded lengths: FLOPs spent on padding count,
  as the device executes them. A model with pretrained parts (``model.*_pretrained``: their
  shapes are in their directories) has its FLOPs counted instead, by torch's
  ``FlopCounterMode`` over the first step (the same operations, forward and backward as run:
  a frozen part's backward is not counted); ``flops_source`` says which.
* tokens per sample: the positions the model runs on: ``data.max_text_len`` text positions
  (padded; the text encoder and/or the decoder run on all of them) plus the image tokens and
  audio tokens the image/audio encoders hand to fusion (measured with hooks on the first
  step). For ``task=lm`` the decoder additionally runs on the few fused memory tokens; those
  are not counted.
* MFU: achieved FLOP/s / the device's dense bf16 peak (:data:`PEAK_BF16_TFLOPS`, looked up by
  device name; ``--peak-tflops`` overrides). On CPU no peak is known: MFU is null.
* peak memory: ``torch.cuda.max_memory_allocated`` on CUDA; the process's peak RSS on CPU.
"""

from __future__ import annotations

import argparse
import math
import os
import re
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any

from mmdist.arguments import add_config_arguments
from mmdist.bench.mfu_measure import (
    count_tokens,
    cycle_batches,
    peak_memory,
    profile_steps,
    real_batches,
    timed_steps,
)
from mmdist.bench.process_group import single_process_group
from mmdist.config import Config, load_config, task_class
from mmdist.data.prepare import prepare_synthetic
from mmdist.data.schema import audio_frames, random_batch
from mmdist.errors import CommandError

# torch and DeepSpeed (and the mmdist modules that import them) are imported inside the
# functions that use them: `mmdist bench --help` imports this module to build its parser.
if TYPE_CHECKING:
    import torch

# Dense (no sparsity) bf16 tensor-core peaks in TFLOP/s from the vendor datasheets, matched in
# order against torch.cuda.get_device_name(): the first pattern that matches wins, so the
# specific variants (H100 PCIe / NVL) come before the generic name (H100 SXM reports itself
# as "NVIDIA H100 80GB HBM3"). A list you can read; --peak-tflops overrides it.
PEAK_BF16_TFLOPS: list[tuple[str, str, float]] = [
    # (regex, searched case-insensitively, what it is, TFLOP/s)
    (r"\bGH200\b", "GH200", 989.0),
    (r"\bH200\b", "H200 (SXM / NVL)", 989.0),
    (r"\bH100\b.*\bPCIe\b", "H100 PCIe", 756.0),
    (r"\bH100\b.*\bNVL\b", "H100 NVL", 835.0),
    (r"\bH100\b", "H100 SXM", 989.0),
    (r"\bH800\b", "H800 SXM", 989.0),
    (r"\bB200\b", "B200", 2250.0),
    (r"\bA100\b", "A100", 312.0),
    (r"\bA800\b", "A800", 312.0),
    (r"\bL40S\b", "L40S", 362.0),
    (r"\bL4\b", "L4", 121.0),
    (r"\bA10\b", "A10", 125.0),
]
CACHE_DIR = Path(".cache/bench_mfu")
MAX_SYNTHETIC_ROWS = 4999  # below prepare's Ray threshold: the bench never starts Ray
DISTINCT_SYNTHETIC_BATCHES = 4


def configure_parser(parser: argparse.ArgumentParser) -> None:
    add_config_arguments(parser, default="tiny")
    parser.add_argument("--steps", type=int, default=20, help="timed steps per pass (default 20)")
    parser.add_argument("--warmup", type=int, default=5,
                        help="untimed warm-up steps before each pass (default 5)")
    parser.add_argument("--batch-size", type=int, default=None,
                        help="micro batch per step (overrides train.micro_batch_size)")
    parser.add_argument("--peak-tflops", type=float, default=None,
                        help="device peak in TFLOP/s for the MFU (default: looked up from the "
                             "device name, dense bf16; none on CPU)")
    parser.add_argument("--profile", action="store_true",
                        help="after timing, profile a few on-device steps with torch.profiler "
                             "and print the top ops by self time (where the time goes)")
    parser.add_argument("--profile-rows", type=int, default=25,
                        help="rows of the profiler table (default 25)")
    parser.add_argument("--compile", action="store_true",
                        help="torch.compile each repeated block of the model, as "
                             "model.compile=true does in training")
    parser.add_argument("--activation-checkpointing", action="store_true",
                        help="recompute activations in backward (sets "
                             "model.activation_checkpointing=true)")
    parser.add_argument("--data-workers", type=int, default=None,
                        help="DataLoader workers of the real-preprocessing pass (default: half "
                             "the CPU cores, 1 to 8)")
    parser.add_argument("--threads", type=int, default=None,
                        help="torch intra-op threads (default: torch's choice)")


# ---- peak lookup ------------------------------------------------------------------------------


def lookup_peak_tflops(device_name: str) -> tuple[float | None, str | None]:
    """Dense bf16 peak (TFLOP/s) of a device from its name, and which entry matched.

    Returns ``(None, None)`` for an unknown device and for ``"cpu"``.
    """
    for pattern, label, tflops in PEAK_BF16_TFLOPS:
        if re.search(pattern, device_name, flags=re.IGNORECASE):
            return tflops, label
    return None, None


def resolve_peak(device_name: str, override_tflops: float | None) -> tuple[float | None, str]:
    """The peak to divide by (TFLOP/s) and a line saying where it came from."""
    if override_tflops is not None:
        return float(override_tflops), f"--peak-tflops {override_tflops:g}"
    if device_name == "cpu":
        return None, ("no bf16 peak is known for a CPU (it depends on cores, clocks and vector "
                      "units); pass --peak-tflops to compare against a figure you trust")
    tflops, label = lookup_peak_tflops(device_name)
    if tflops is None:
        return None, (f"no bf16 peak is known for {device_name!r}; pass --peak-tflops "
                      "(known: " + ", ".join(label for _, label, _ in PEAK_BF16_TFLOPS) + ")")
    return tflops, f"{label} dense bf16 peak, from the table in mmdist/bench/mfu.py"


# ---- setup --------------------------------------------------------------------------------------


def _config(args: argparse.Namespace) -> Config:
    problems = []
    if args.steps < 1:
        problems.append(f"--steps={args.steps}: must be >= 1")
    if args.warmup < 1:
        problems.append(f"--warmup={args.warmup}: must be >= 1 (the first step builds kernels "
                        "and counts tokens)")
    if args.compile and args.warmup < 2:
        problems.append(f"--warmup={args.warmup}: --compile needs >= 2 (compilation happens in "
                        "the warm-up)")
    if args.batch_size is not None and args.batch_size < 1:
        problems.append(f"--batch-size={args.batch_size}: must be >= 1")
    if args.peak_tflops is not None and not args.peak_tflops > 0:
        problems.append(f"--peak-tflops={args.peak_tflops}: must be > 0")
    if args.data_workers is not None and args.data_workers < 0:
        problems.append(f"--data-workers={args.data_workers}: must be >= 0")
    if problems:
        raise CommandError("; ".join(problems))
    overrides = [*args.overrides, "train.num_workers=1", "train.global_batch_size=0"]
    if args.batch_size:
        overrides.append(f"train.micro_batch_size={args.batch_size}")
    if args.compile:
        overrides.append("model.compile=true")
    if args.activation_checkpointing:
        overrides.append("model.activation_checkpointing=true")
    return load_config(args.config, overrides)


def _device(cfg: Config) -> torch.device:
    import torch  # heavy: not for --help

    if not cfg.train.use_gpu:
        return torch.device("cpu")
    if not torch.cuda.is_available():
        raise CommandError("train.use_gpu=true but torch sees no CUDA device; run on a GPU "
                           "host or pass train.use_gpu=false")
    return torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))


def ensure_shards(cfg: Config, rows_needed: int, workers: int) -> tuple[Path, Config]:
    """A shard directory for the real-preprocessing pass: ``data.path``, or synthetic shards
    for ``cfg`` sized to ``rows_needed`` train rows, split in at least ``workers`` files
    (cached under ``.cache/bench_mfu/``; reused when the parameters match)."""
    d = cfg.data
    if d.path:
        return Path(d.path).resolve(), cfg
    rows = min(MAX_SYNTHETIC_ROWS,
               max(d.synthetic_samples, math.ceil(1.25 * rows_needed / (1.0 - d.val_fraction))))
    shard_rows = max(cfg.train.micro_batch_size,
                     math.ceil(rows * (1.0 - d.val_fraction) / max(1, workers)))
    cfg = cfg.override({"data.synthetic_samples": rows, "data.shard_rows": shard_rows})
    key = (f"synthetic-n{rows}-s{cfg.train.seed}-img{d.image_size}-sr{d.sample_rate}"
           f"-a{d.audio_seconds}-v{d.vocab_size}-val{d.val_fraction}-r{shard_rows}")
    out = (CACHE_DIR / key).resolve()
    prepare_synthetic(out, cfg, seed=cfg.train.seed)
    return out, cfg


def build_engine(cfg: Config, vocab: dict[str, int], device: torch.device, total_steps: int):
    """The DeepSpeed engine exactly as ``train_fn_per_worker`` builds it, at world size 1.

    Compilation is left to the caller, after the first (eager) step has counted the tokens.
    """
    from mmdist.train.engine import build_engine as build_training_engine  # heavy: torch

    return build_training_engine(cfg.override({"model.compile": False}), vocab, 1, total_steps,
                                 log=lambda m: print(f"[bench mfu] {m}", flush=True))


def _fmt_bytes(n: int) -> str:
    return f"{n / 2**30:.2f} GiB" if n >= 2**30 else f"{n / 2**20:.0f} MiB"


def run(args: argparse.Namespace) -> dict[str, Any]:
    # heavy (Ray/torch): `mmdist --help` imports this module to build its parser
    import torch

    from mmdist.data.shards import load_tokenizer
    from mmdist.models.accounting import flops_per_sample

    cfg = _config(args)
    if args.threads:
        torch.set_num_threads(args.threads)
    device = _device(cfg)
    device_name = torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"
    workers = (args.data_workers if args.data_workers is not None
               else max(1, min(8, (os.cpu_count() or 2) // 2)))
    b, t = cfg.train.micro_batch_size, cfg.train
    m = cfg.model

    t0 = time.perf_counter()
    data_dir, cfg = ensure_shards(cfg, (args.warmup + args.steps) * b, workers)
    tokenizer = load_tokenizer(data_dir)
    vocab = tokenizer.model_vocab()
    data_s = time.perf_counter() - t0
    try:
        flops: float | None = flops_per_sample(cfg, vocab["vocab_size"])
        flops_source = "analytic fwd+bwd"
    except ValueError:  # pretrained parts: their shapes are in their directories
        flops, flops_source = None, "counted on the first step (FlopCounterMode), fwd+bwd"

    with single_process_group(device):
        t0 = time.perf_counter()
        engine = build_engine(cfg, vocab, device, total_steps=2 * (args.warmup + args.steps)
                              + (5 if args.profile else 0))
        setup_s = time.perf_counter() - t0
        params = sum(getattr(p, "ds_numel", p.numel()) for p in engine.module.parameters())
        has_decoder = any(task_class(t).uses_decoder(m)
                          for t in task_class(m.task).components(m))
        decoder = (f"{m.decoder_pretrained} (pretrained)" if m.decoder_pretrained else m.decoder)
        print(f"[bench mfu] config={args.config} task={m.task} size={m.size} "
              f"decoder={decoder if has_decoder else '-'} "
              f"params={params / 1e6:.2f}M vocab={vocab['vocab_size']} batch={b} "
              f"zero={t.zero_stage} precision={t.precision} device={device_name} "
              f"compile={m.compile} activation_checkpointing={m.activation_checkpointing}; "
              f"{args.warmup} warm-up + {args.steps} timed steps per pass "
              f"(data {data_s:.1f} s, engine {setup_s:.1f} s)", flush=True)

        last_loss: list[torch.Tensor] = []

        def step(batch: dict) -> None:
            loss = engine(batch)["loss"]
            engine.backward(loss)
            engine.step()
            last_loss[:] = [loss.detach()]

        d = cfg.data
        frames = audio_frames(d.sample_rate, d.audio_seconds, d.hop_length)
        synthetic = cycle_batches([random_batch(b, vocab["vocab_size"], d.max_text_len,
                                                 d.image_size, d.n_mels, frames, m.num_classes,
                                                 seed=i, device=str(device))
                                    for i in range(DISTINCT_SYNTHETIC_BATCHES)])
        # The first step (eager, hooks on the encoders) measures tokens per sample, and the
        # FLOPs where no analytic count covers the model: torch counts the same operations
        # (matrix multiplies, convolutions, attention) as they run, forward and backward.
        if flops is None:
            from torch.utils.flop_counter import FlopCounterMode

            with FlopCounterMode(display=False) as counter:
                tokens = count_tokens(engine, step, next(synthetic), cfg)
            flops = counter.get_total_flops() / b
        else:
            tokens = count_tokens(engine, step, next(synthetic), cfg)
        if m.compile:  # as training compiles it: block by block
            from mmdist.models.regional_compile import compile_blocks

            compile_blocks(engine.module)
        tokens_per_sample = sum(tokens.values())

        step_s = timed_steps(step, synthetic, args.warmup - 1, args.steps, device)
        real_s = timed_steps(step, real_batches(data_dir, cfg, workers, device), args.warmup,
                             args.steps, device)
        loss = float(last_loss[0]) if last_loss else float("nan")
        profile_top = (profile_steps(step, synthetic, min(5, args.steps), device,
                                     args.profile_rows) if args.profile else None)
        peak_mem, mem_kind = peak_memory(device)

    samples_per_s = b / step_s
    achieved = samples_per_s * flops
    peak_tflops, peak_source = resolve_peak(device_name, args.peak_tflops)
    mfu = achieved / (peak_tflops * 1e12) if peak_tflops else None
    stall = real_s / step_s
    token_parts = " + ".join(f"{k} {v}" for k, v in tokens.items())
    print(f"on-device batches    : {step_s * 1e3:.1f} ms/step  {samples_per_s:.1f} samples/s  "
          f"{samples_per_s * tokens_per_sample:,.0f} tokens/s  "
          f"({tokens_per_sample} tokens/sample: {token_parts})")
    print(f"real preprocessing   : {real_s * 1e3:.1f} ms/step  {b / real_s:.1f} samples/s  "
          f"(DataLoader, {workers} worker(s), {data_dir})")
    print(f"achieved             : {achieved / 1e12:.4g} TFLOP/s  "
          f"({flops / 1e9:.4g} GFLOP/sample, {flops_source})")
    if mfu is None:
        print(f"MFU                  : n/a: {peak_source}")
    else:
        print(f"MFU                  : {100 * mfu:.1f}% of {peak_tflops:g} TFLOP/s "
              f"({peak_source})")
    print(f"peak memory          : {_fmt_bytes(peak_mem)} ({mem_kind})")
    print(f"data-stall ratio     : {stall:.3f} (real-data step time / on-device step time)")
    print(f"last loss            : {loss:.4f}", flush=True)
    summary = {
        "tokens_per_s": samples_per_s * tokens_per_sample, "samples_per_s": samples_per_s,
        "tflops": achieved / 1e12, "mfu": mfu, "peak_tflops": peak_tflops,
        "device": device_name, "peak_memory_bytes": peak_mem, "data_stall_ratio": stall,
        "params": params, "flops_per_sample": flops, "flops_source": flops_source,
        "tokens_per_sample": tokens_per_sample, "tokens_by_modality": tokens,
        "step_s": step_s, "real_step_s": real_s, "real_samples_per_s": b / real_s,
        "peak_source": peak_source, "peak_memory_kind": mem_kind, "batch_size": b,
        "steps": args.steps, "warmup": args.warmup, "zero_stage": t.zero_stage,
        "precision": t.precision, "compile": m.compile,
        "activation_checkpointing": m.activation_checkpointing, "data_workers": workers,
        "config": args.config, "overrides": list(args.overrides), "loss": loss,
        "setup_s": setup_s, "torch": torch.__version__,
        "ok": math.isfinite(loss),
    }
    if profile_top is not None:
        summary["profile_top"] = profile_top
    return summary
