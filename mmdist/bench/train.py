"""`mmdist bench train`: what the Ray Train + DeepSpeed path costs against a plain PyTorch loop.

Same model (same seed), same batches (materialised once, identical content), same optimizer
(``train.optim.build_optimizer``) and the same number of threads on three sides:

(a) training's Ray Train trainer with 1 worker running the DeepSpeed engine that training
    builds (``train.engine.build_engine``);
(b) that same engine in this process, on a 1-rank gloo group of its own, without Ray;
(c) a single-process loop: forward, backward, clipping, AdamW, LR schedule (under
    ``torch.autocast`` in bf16/fp16, PyTorch's own mixed precision).

Every side is built and warmed up once; then ``--repeat`` rounds each run ``--steps`` steps of
(a), (b) and (c), never two at once (the Ray worker waits, idle, while this process runs its
sides). Within a round the sides take turns in chunks of ``--chunk`` steps, in the order a b c,
then c b a, and so on, so that the machine's swings (seconds long on a shared host) hit every
side alike: each ratio is taken per round, and the median and spread over rounds are reported.

b / c is what DeepSpeed's engine costs, a / b what running it inside a Ray Train worker costs.
Where the time goes: every side times its forward, backward and optimizer step, and a short
``torch.profiler`` run of (b) and (c) lists the operators whose time differs most.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import statistics
import tempfile
import threading
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any

from mmdist.arguments import add_config_arguments
from mmdist.config import Config, load_config
from mmdist.data.schema import audio_frames, random_batch

if TYPE_CHECKING:
    import torch

PHASES = ("forward", "backward", "step")
SIDES = ("ray", "deepspeed", "plain")
POLL_S = 0.002  # the idle side's wait: a sleep, no CPU


def configure_parser(parser: argparse.ArgumentParser) -> None:
    add_config_arguments(parser, default="demo")
    parser.add_argument("--steps", type=int, default=60,
                        help="timed steps per side in each round (default 60)")
    parser.add_argument("--warmup", type=int, default=10,
                        help="untimed warm-up steps per side, once (default 10)")
    parser.add_argument("--threads", type=int, default=2,
                        help="torch threads on every side (default 2: the cores here)")
    parser.add_argument("--vocab-size", type=int, default=2000, help="vocabulary size (default 2000)")
    parser.add_argument("--repeat", type=int, default=5,
                        help="rounds of the three sides; ratios are per round, then median and "
                             "spread (default 5)")
    parser.add_argument("--chunk", type=int, default=5,
                        help="steps a side takes before the next side's turn; the order "
                             "alternates a-b-c / c-b-a (default 5)")
    parser.add_argument("--profile-steps", type=int, default=10,
                        help="steps of (b) and (c) under torch.profiler for the operator table "
                             "(default 10; 0: no table)")


def _batches(cfg: Config, vocab: int, n: int) -> list[dict[str, torch.Tensor]]:
    d = cfg.data
    frames = audio_frames(d.sample_rate, d.audio_seconds, d.hop_length)
    return [random_batch(cfg.train.micro_batch_size, vocab, d.max_text_len, d.image_size,
                         d.n_mels, frames, cfg.model.num_classes, seed=i) for i in range(n)]


class Side:
    """One side's step as three timed phases: ``forward(batch) -> loss``, ``backward(loss)``,
    ``step()``."""

    def __init__(self, forward, backward, step, setup_s: float):
        self.forward, self.backward, self.step, self.setup_s = forward, backward, step, setup_s
        self.done = 0  # steps taken, so every chunk continues the batch sequence

    def run(self, batches: list, n: int) -> dict[str, float]:
        """``n`` steps; wall seconds in all and per phase."""
        clock = time.perf_counter
        spent = dict.fromkeys(PHASES, 0.0)
        t0 = clock()
        for _ in range(n):
            batch = batches[self.done % len(batches)]
            a = clock()
            loss = self.forward(batch)
            b = clock()
            self.backward(loss)
            c = clock()
            self.step()
            d = clock()
            spent["forward"] += b - a
            spent["backward"] += c - b
            spent["step"] += d - c
            self.done += 1
        return {"seconds": clock() - t0, "steps": n, **spent}


def plain_side(cfg: Config, vocab: int, total_steps: int) -> Side:
    import torch  # heavy: `mmdist --help` imports this module to build its parser

    from mmdist.models import build_model  # torch, as above
    from mmdist.train.optim import build_optimizer

    t0 = time.perf_counter()
    torch.manual_seed(cfg.train.seed)
    model = build_model(cfg, vocab_size=vocab)
    model.train()
    opt, schedule = build_optimizer(model, cfg, total_steps)
    lr = schedule(opt)
    half = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(cfg.train.precision)
    autocast = (lambda: torch.autocast("cpu", dtype=half)) if half else contextlib.nullcontext

    def forward(batch):
        with autocast():
            return model(batch)["loss"]

    def step() -> None:
        if cfg.train.grad_clip:
            torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.train.grad_clip)
        opt.step()
        lr.step()
        opt.zero_grad(set_to_none=True)

    return Side(forward, lambda loss: loss.backward(), step, time.perf_counter() - t0)


def engine_side(cfg: Config, vocab: int, total_steps: int) -> Side:
    """Training's DeepSpeed engine at world size 1 (needs a torch process group: Ray Train's in
    a worker, ``bench.process_group.single_process_group`` in this process)."""
    from mmdist.train.engine import build_engine  # heavy: not for --help

    t0 = time.perf_counter()
    engine = build_engine(cfg, {"vocab_size": vocab}, 1, total_steps)
    return Side(lambda batch: engine(batch)["loss"], engine.backward, engine.step,
                time.perf_counter() - t0)


# ---- (a): the engine in a Ray Train worker, driven round by round through files ----------------


def _wait_for(path: Path, alive=lambda: True, timeout: float = 3600.0) -> None:
    deadline = time.monotonic() + timeout
    while not path.exists():
        if not alive() or time.monotonic() > deadline:
            raise RuntimeError(f"bench train: the other side stopped before writing {path.name}")
        time.sleep(POLL_S)


def _write(path: Path, value: Any) -> None:
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(value))
    tmp.rename(path)  # atomic: the reader never sees half a file


def ray_worker(config: dict[str, Any]) -> None:
    """In the Ray Train worker: build and warm up side (a), then run the number of steps each
    ``go<k>`` file the driver writes says, answering with ``done<k>``, until ``stop``."""
    import torch  # heavy: not for --help

    from mmdist.train.backend import init_process_group

    started = time.time()
    init_process_group()  # as training's workers do (mmdist.train.entry)
    ctrl = Path(config["ctrl"])
    torch.set_num_threads(config["threads"])
    side = engine_side(Config.from_dict(config["cfg"]), config["vocab"], config["total_steps"])
    side.run(config["batches"], config["warmup"])
    _write(ctrl / "ready", {"setup_s": side.setup_s, "worker_start_s": started - config["t_fit"]})
    k = 0
    while True:
        go = ctrl / f"go{k}"
        while not go.exists() and not (ctrl / "stop").exists():
            time.sleep(POLL_S)
        if not go.exists():
            return
        n = json.loads(go.read_text())
        _write(ctrl / f"done{k}", side.run(config["batches"], n))
        k += 1


@contextlib.contextmanager
def ray_side(cfg: Config, config: dict[str, Any]):
    """Start (a) in training's Ray Train trainer (:func:`mmdist.train.backend.trainer_and_backend`)
    on a thread; yields ``(setup, run_chunk)``: ``run_chunk(n)`` has the worker take ``n`` steps
    and returns their timings."""
    from ray.train import RunConfig, ScalingConfig  # heavy: not for --help

    from mmdist.train.backend import trainer_and_backend

    trainer_cls, backend = trainer_and_backend(use_gpu=False)  # training's trainer
    with tempfile.TemporaryDirectory() as tmp:
        ctrl = Path(tmp) / "ctrl"
        ctrl.mkdir()
        trainer = trainer_cls(
            ray_worker, **backend,
            train_loop_config={**config, "ctrl": str(ctrl), "t_fit": time.time()},
            scaling_config=ScalingConfig(num_workers=1,
                                         resources_per_worker={"CPU": config["threads"]}),
            run_config=RunConfig(name="bench-train", storage_path=tmp))
        failure: list[BaseException] = []

        def fit() -> None:
            try:
                trainer.fit()
            except BaseException as e:  # noqa: BLE001 - re-raised in the driver below
                failure.append(e)

        thread = threading.Thread(target=fit, daemon=True)
        t0 = time.perf_counter()
        thread.start()
        try:
            _wait_for(ctrl / "ready", thread.is_alive)
            ready = json.loads((ctrl / "ready").read_text())
            setup = {"until_ready_s": time.perf_counter() - t0, **ready}
            rounds = [0]

            def run_chunk(n: int) -> dict[str, float]:
                k = rounds[0]
                _write(ctrl / f"go{k}", n)
                _wait_for(ctrl / f"done{k}", thread.is_alive)
                rounds[0] += 1
                return json.loads((ctrl / f"done{k}").read_text())

            yield setup, run_chunk
        finally:
            (ctrl / "stop").write_text("")
            thread.join(timeout=600)
        if failure:
            raise failure[0]


# ---- the report ---------------------------------------------------------------------------


def _spread(values: list[float]) -> dict[str, Any]:
    return {"median": round(statistics.median(values), 4), "min": round(min(values), 4),
            "max": round(max(values), 4), "rounds": [round(v, 4) for v in values]}


def interleaved(run: dict[str, Any], steps: int, chunk: int) -> dict[str, dict[str, float]]:
    """One round: every side in ``run`` (name -> ``f(n) -> timings``) takes ``steps`` steps,
    ``chunk`` at a time, the order of sides reversed after every pass; timings summed by side."""
    names, done = list(run), 0
    out: dict[str, dict[str, float]] = {}
    while done < steps:
        n = min(max(1, chunk), steps - done)
        for name in names:
            r = run[name](n)
            out[name] = {k: out.get(name, {}).get(k, 0.0) + v for k, v in r.items()}
        names.reverse()
        done += n
    return out


def phase_table(results: dict[str, list[dict[str, float]]]) -> dict[str, dict[str, float]]:
    """Milliseconds per step by phase and side, over every round."""
    out: dict[str, dict[str, float]] = {}
    for side, rounds in results.items():
        steps = sum(r["steps"] for r in rounds)
        row = {p: 1000 * sum(r[p] for r in rounds) / steps for p in PHASES}
        row["total"] = 1000 * sum(r["seconds"] for r in rounds) / steps
        row["other"] = row["total"] - sum(row[p] for p in PHASES)
        out[side] = {k: round(v, 2) for k, v in row.items()}
    return out


def operator_table(sides: dict[str, Side], batches: list, steps: int, top: int = 12
                   ) -> list[dict[str, Any]]:
    """Self CPU milliseconds per step of the operators whose time differs most between the
    in-process engine (b) and the plain loop (c), from ``torch.profiler``."""
    from torch.profiler import ProfilerActivity, profile  # heavy: not for --help

    per_side: dict[str, dict[str, float]] = {}
    for name, side in sides.items():
        with profile(activities=[ProfilerActivity.CPU]) as prof:
            side.run(batches, steps)
        per_side[name] = {e.key: e.self_cpu_time_total / 1000 / steps
                          for e in prof.key_averages()}
    a, b = per_side["deepspeed"], per_side["plain"]
    rows = [{"op": k, "deepspeed_ms": round(a.get(k, 0.0), 3), "plain_ms": round(b.get(k, 0.0), 3),
             "extra_ms": round(a.get(k, 0.0) - b.get(k, 0.0), 3)} for k in set(a) | set(b)]
    rows.sort(key=lambda r: -abs(r["extra_ms"]))
    return rows[:top]


def run(args: argparse.Namespace) -> dict[str, Any]:
    # heavy (Ray/torch): `mmdist --help` imports this module to build its parser
    import torch

    from mmdist.bench.process_group import single_process_group
    from mmdist.ray_env import init_ray

    cfg = load_config(args.config, [*args.overrides, "train.num_workers=1"])
    batches = _batches(cfg, args.vocab_size, 8)
    rounds = max(1, args.repeat)
    total = args.warmup + rounds * args.steps + args.profile_steps
    init_ray(num_cpus=args.threads, dashboard=True)  # the Ray `mmdist train` starts
    print(f"[bench train] model size={cfg.model.size} fusion={cfg.model.fusion} "
          f"batch={cfg.train.micro_batch_size} zero={cfg.train.zero_stage_at()} "
          f"precision={cfg.train.precision} threads={args.threads}; {args.warmup} warm-up "
          f"steps, then {rounds} rounds of {args.steps} steps per side, {args.chunk} at a turn",
          flush=True)
    torch.set_num_threads(args.threads)
    config = {"cfg": cfg.to_dict(), "vocab": args.vocab_size, "batches": batches,
              "warmup": args.warmup, "steps": args.steps, "threads": args.threads,
              "total_steps": total}
    results: dict[str, list[dict[str, float]]] = {s: [] for s in SIDES}
    # (b)'s 1-rank group lives through every round; the Ray worker has a group of its own
    with single_process_group(torch.device("cpu")), ray_side(cfg, config) as (ray_setup,
                                                                             ray_chunk):
        local = {"deepspeed": engine_side(cfg, args.vocab_size, total),
                 "plain": plain_side(cfg, args.vocab_size, total)}
        for side in local.values():
            side.run(batches, args.warmup)
        take = {"ray": ray_chunk, **{n: (lambda k, s=s: s.run(batches, k))
                                    for n, s in local.items()}}
        for k in range(rounds):
            for s, r in interleaved(take, args.steps, args.chunk).items():
                results[s].append(r)
            print(f"  round {k + 1}/{rounds}: " + "  ".join(
                f"{s} {results[s][-1]['steps'] / results[s][-1]['seconds']:.2f}"
                for s in SIDES) + " steps/s", flush=True)
        ops = (operator_table(local, batches, args.profile_steps)
               if args.profile_steps > 0 else [])
    rate = {s: [r["steps"] / r["seconds"] for r in v] for s, v in results.items()}
    ratio = _spread([a / c for a, c in zip(rate["ray"], rate["plain"])])
    ds_ratio = _spread([b / c for b, c in zip(rate["deepspeed"], rate["plain"])])
    ray_over_ds = _spread([a / b for a, b in zip(rate["ray"], rate["deepspeed"])])
    phases = phase_table(results)
    setup = {"ray": ray_setup["worker_start_s"] + ray_setup["setup_s"], "deepspeed": local["deepspeed"].setup_s,
             "plain": local["plain"].setup_s}

    for s, label in zip(SIDES, ("Ray Train + DeepSpeed", "DeepSpeed in this process",
                                "plain PyTorch loop")):
        print(f"{label:<26}: {statistics.median(rate[s]):.2f} steps/s (median of {rounds}; "
              f"setup {setup[s]:.1f} s)")
    print(f"ratio Ray path / plain    : {ratio['median']:.3f} (median; rounds "
          f"{ratio['min']:.3f}-{ratio['max']:.3f})")
    print(f"  DeepSpeed / plain       : {ds_ratio['median']:.3f} ({ds_ratio['min']:.3f}-"
          f"{ds_ratio['max']:.3f})")
    print(f"  Ray worker / DeepSpeed  : {ray_over_ds['median']:.3f} ({ray_over_ds['min']:.3f}-"
          f"{ray_over_ds['max']:.3f})")
    print("ms per step      " + "".join(f"{p:>10}" for p in (*PHASES, "other", "total")))
    for s in SIDES:
        print(f"  {s:<15}" + "".join(f"{phases[s][p]:>10.2f}"
                                     for p in (*PHASES, "other", "total")))
    if ops:
        print(f"operators, self CPU ms per step ({args.profile_steps} profiled steps), "
              "largest differences:")
        print(f"  {'operator':<44}{'deepspeed':>10}{'plain':>10}{'extra':>10}")
        for r in ops:
            print(f"  {r['op'][:44]:<44}{r['deepspeed_ms']:>10.3f}{r['plain_ms']:>10.3f}"
                  f"{r['extra_ms']:>10.3f}")
    med = {s: statistics.median(v) for s, v in rate.items()}
    return {"ray_steps_per_s": med["ray"], "deepspeed_steps_per_s": med["deepspeed"],
            "plain_steps_per_s": med["plain"],
            "ratio": ratio["median"], "ratio_spread": ratio,
            "deepspeed_ratio": ds_ratio["median"], "deepspeed_ratio_spread": ds_ratio,
            "ray_over_deepspeed": ray_over_ds["median"], "ray_over_deepspeed_spread": ray_over_ds,
            "phases_ms": phases, "operators": ops,
            "ray_setup_s": setup["ray"], "ray_worker_start_s": ray_setup["worker_start_s"],
            "deepspeed_setup_s": setup["deepspeed"], "plain_setup_s": setup["plain"],
            "repeat": rounds, "steps": args.steps, "warmup": args.warmup,
            "threads": args.threads, "precision": cfg.train.precision}
