"""The DeepSpeed engine of a training step: one builder for the training loop and benchmarks."""

from __future__ import annotations

from typing import Any

import torch

from mmdist.config import Config
from mmdist.models import build_model
from mmdist.models.activation_checkpointing import enable_activation_checkpointing
from mmdist.models.adapt import trainable_summary
from mmdist.models.builder import preload_pretrained
from mmdist.models.model_files import init_weights
from mmdist.models.regional_compile import compile_blocks
from mmdist.models.transformers_init import preload
from mmdist.train.deepspeed_config import deepspeed_config, precision_problem
from mmdist.train.optim import build_optimizer


def import_deepspeed():
    """``import deepspeed`` without MLflow: DeepSpeed's autotuner imports MLflow, when it is
    installed, only to log autotuning runs (which mmdist never starts): 1.3-3 s of every
    worker's start-up. A process that already has MLflow keeps it. DeepSpeed's Muon module is
    imported here too, eagerly (:func:`_import_muon_uncompiled`)."""
    import sys

    use_environment_ninja()
    if "deepspeed" in sys.modules or "mlflow" in sys.modules:
        import deepspeed
    else:
        sys.modules["mlflow"] = None  # type: ignore[assignment]  # `import mlflow` -> ImportError
        try:
            import deepspeed  # heavy: the driver imports this module and never needs DeepSpeed
        finally:
            del sys.modules["mlflow"]
    _import_muon_uncompiled()
    return deepspeed


def use_environment_ninja() -> None:
    """Put this Python environment's ``bin`` first on ``PATH`` when it holds ``ninja``.

    torch builds DeepSpeed's CPU ops with the first ``ninja`` on ``PATH``, and ninja 1.11 (a
    system package) and 1.13 (the ``ninja`` wheel DeepSpeed depends on) read each other's build
    log as changed commands: a machine with both rebuilt the shm op (~50 s) every time the
    other one had last built it: at every ``make setup`` (whose ``PATH`` lacks ``.venv/bin``)
    after a job on the local cluster (whose ``PATH`` has it), and back.
    """
    import os
    import sys

    env_bin = os.path.dirname(sys.executable)
    path = os.environ.get("PATH", "")
    if os.access(os.path.join(env_bin, "ninja"), os.X_OK) and path.split(os.pathsep)[0] != env_bin:
        os.environ["PATH"] = os.pathsep.join([env_bin, path]) if path else env_bin


def _import_muon_uncompiled() -> None:
    """Import DeepSpeed's Muon optimizer module with its kernels left uncompiled.

    ``deepspeed.initialize`` imports that module whatever the optimizer (ZeRO's optimizer check,
    ZeRO-3, the bf16 optimizer), and its kernels are decorated with ``torch.compile``, which loads
    Inductor's compiler at import (2-4 s of every worker's engine build) and TorchDynamo even
    when told not to compile (1.1 CPU-s). mmdist never builds a Muon optimizer
    (:func:`mmdist.train.optim.build_optimizer`), so its kernels may stay eager: for this import
    only, DeepSpeed's ``compiler.compile()`` (what the module decorates with) hands out
    DeepSpeed's own no-op decorator, as it does on a torch without ``torch.compile``, and
    ``TORCHDYNAMO_DISABLE=1`` is set, which makes ``torch.compile`` return the function
    undecorated on a DeepSpeed without that decorator (``model.compile`` compiles the model
    afterwards).
    """
    import os

    from deepspeed.runtime import compiler

    before = os.environ.get("TORCHDYNAMO_DISABLE")
    os.environ["TORCHDYNAMO_DISABLE"] = "1"
    compile_fn, no_op = compiler.compile, getattr(compiler, "dummy_decorator", None)
    if no_op is not None:
        compiler.compile = lambda: no_op
    try:
        import deepspeed.runtime.zero.muon.muon_optimizer  # noqa: F401
    except ImportError:  # a DeepSpeed without Muon
        pass
    finally:
        compiler.compile = compile_fn
        if before is None:
            del os.environ["TORCHDYNAMO_DISABLE"]
        else:
            os.environ["TORCHDYNAMO_DISABLE"] = before


def _zero_accepts_eager_adamw() -> bool:
    """Add :class:`mmdist.train.optim.EagerAdamW` (torch's AdamW, its methods undecorated) to
    the optimizers DeepSpeed's ZeRO takes without ``zero_allow_untested_optimizer``, as
    DeepSpeed adds its own Muon; False on a DeepSpeed without that list (the caller then sets
    the flag)."""
    from mmdist.train.optim import EagerAdamW

    try:
        from deepspeed.runtime.zero.utils import ZERO_SUPPORTED_OPTIMIZERS
    except ImportError:
        return False
    if EagerAdamW not in ZERO_SUPPORTED_OPTIMIZERS:
        ZERO_SUPPORTED_OPTIMIZERS.append(EagerAdamW)
    return True


def build_engine(cfg: Config, vocab: dict[str, int], world_size: int, total_steps: int,
                 log=None, init_dir: str | None = None, load_universal: bool = False) -> Any:
    """Model + optimizer + LR schedule -> ``deepspeed.initialize``, as every rank does it.

    Expects a torch process group (Ray Train's, or one the caller made); DeepSpeed's comm layer
    wraps it. Under ZeRO-3 parameters are partitioned as they are created (``zero.Init``) so a
    model larger than one device fits; ``HfDeepSpeedConfig`` must exist first or transformers
    skips its weight init. Applies ``model.activation_checkpointing`` and ``model.compile``
    (:func:`mmdist.models.regional_compile.compile_blocks`);
    ``init_dir`` (an mmdist model directory, ``model.init_from``) gives the starting weights;
    ``load_universal``: the checkpoint to resume is a universal one (:mod:`mmdist.train.elastic`).

    Raises:
        ValueError: ``train.precision`` this machine cannot run (fp16 on a CPU without it).
    """
    problem = precision_problem(cfg)
    if problem:
        raise ValueError(problem)
    deepspeed = import_deepspeed()

    t = cfg.train
    torch.manual_seed(t.seed)  # identical initial weights on every rank
    ds_config = deepspeed_config(cfg, world_size)
    if load_universal:  # a ZeRO checkpoint of another world size, converted
        ds_config["checkpoint"] = {"load_universal": True}
    if not _zero_accepts_eager_adamw():
        ds_config["zero_allow_untested_optimizer"] = True
    deepspeed.init_distributed(dist_backend="nccl" if t.use_gpu else "gloo",
                               auto_mpi_discovery=False)
    if t.zero_stage == 3:
        from transformers.integrations import HfDeepSpeedConfig  # heavy: see transformers_init

        preload()  # model libraries cannot be imported inside zero.Init
        preload_pretrained(cfg)
        hf_ds = HfDeepSpeedConfig(ds_config)  # must stay alive while the model is built
        with deepspeed.zero.Init(config_dict_or_path=ds_config):
            model = build_model(cfg, **vocab)
        del hf_ds
        # parts made outside zero.Init (pretrained encoders, LoRA adapters) join the others'
        # dtype: ZeRO-3 flattens each group into one buffer of one dtype
        dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(t.precision)
        for p in model.parameters():
            if dtype is not None and not hasattr(p, "ds_id") and p.is_floating_point():
                p.data = p.data.to(dtype)
    else:
        model = build_model(cfg, **vocab)
    if init_dir:
        n = init_weights(model, init_dir)
        if log:
            log(f"initialised {n} tensors from {cfg.model.init_from} ({init_dir})")
    if log and (cfg.model.freeze or cfg.model.lora):
        log("trainable parameters: " + ", ".join(
            f"{c} {v['trainable']:,}/{v['total']:,}" for c, v in trainable_summary(model).items()))
    if cfg.model.activation_checkpointing:
        parts = enable_activation_checkpointing(model)
        if log:
            log(f"activation checkpointing on: {', '.join(parts) or 'no part'}")
    optimizer, schedule = build_optimizer(model, cfg, total_steps, world_size)
    engine, _, _, _ = deepspeed.initialize(model=model, optimizer=optimizer, lr_scheduler=schedule,
                                           config=ds_config, dist_init_required=False)
    if cfg.model.compile:  # block by block: whole, the LM task loses its gradient
        blocks = compile_blocks(engine.module)
        if log:
            log(f"torch.compile: {len(blocks)} blocks, one by one (regional compilation)")
    return engine
