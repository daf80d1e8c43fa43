"""One worker's side of a run's checkpoints: save, restore, and the consolidated final model.

What a checkpoint holds and when it is complete: :mod:`mmdist.train.checkpoint`.
"""

from __future__ import annotations

import json
import shutil
import tempfile
from pathlib import Path
from typing import Any

import torch

from mmdist.config import Config
from mmdist.models.adapt import lora_layers, merge_lora, save_adapters
from mmdist.models.model_files import copy_processors, save_state_dict
from mmdist.train import checkpoint as ckpt_lib
from mmdist.train import elastic
from mmdist.train.checkpoint import TrainState
from mmdist.train.deepspeed_config import client_optimizer_steps
from mmdist.train.elastic import ResumePlan
from mmdist.train.job import Job
from mmdist.train.reporter import Reporter, at_step


class Checkpointer:
    """Saves and restores this rank's part of the run's checkpoints.

    Every rank calls every method at the same point of training: saving the DeepSpeed engine
    and consolidating ZeRO-partitioned weights are collectives.

    Args:
        engine: the DeepSpeed engine.
        cfg: the run's config.
        job: what the driver resolved (:class:`mmdist.train.job.Job`).
        rank: this worker's rank.
        world: the number of workers.
        reporter: where progress lines, MLflow values and Ray reports go.
    """

    def __init__(self, engine: Any, cfg: Config, job: Job, rank: int, world: int,
                 reporter: Reporter):
        self.engine, self.cfg, self.job = engine, cfg, job
        self.rank, self.world, self.reporter = rank, world, reporter

    def restore(self, plan: ResumePlan) -> TrainState:
        """Load the checkpoint ``plan`` chose (:func:`mmdist.train.elastic.plan_resume`: the newest
        complete one of the run folder), if any, into the engine; the MLflow values it kept back
        are queued for MLflow again.

        Ray's ``get_checkpoint()`` names the newest checkpoint Ray registered; a checkpoint can
        still be incomplete on storage (a node died while uploading, a file was truncated), so
        the run folder is searched for the newest complete one instead and every newer one
        skipped is named with its reason. All ranks read the same folder and so pick the same
        checkpoint. One written at another world size is loaded through a universal checkpoint.
        """
        say = self.reporter.say
        for note in plan.skipped:
            say(f"WARNING: skipping incomplete checkpoint {note}")
        if plan.checkpoint is None:
            if plan.skipped:
                say("WARNING: no complete checkpoint to resume from; starting from step 0")
            state = TrainState()
        else:
            state = self._load(plan)
        self.reporter.resend(state.mlflow_pending)  # what the crashed attempt did not deliver
        return state

    def _load(self, plan: ResumePlan) -> TrainState:
        chosen, stage = plan.checkpoint, self.cfg.train.zero_stage_at(self.world)
        assert chosen is not None
        ckpt_lib.check_resume(chosen, self.world, stage, self.cfg.to_dict()["model"],
                              self.optimizer_steps())
        how = ""
        if plan.universal:  # another world size: DeepSpeed re-partitions a universal checkpoint
            if self.rank == 0:
                elastic.convert(chosen, self.job.storage, log=self.reporter.note)
            if torch.distributed.is_initialized():
                torch.distributed.barrier()  # the others wait for rank 0's conversion
            self.engine.load_checkpoint(str(elastic.universal_dir(self.job.storage)),
                                        tag=chosen.name, load_module_strict=True)
            elastic.restore_buffers(self.engine.module, chosen)  # the universal load skips them
            how = (f"; written by {plan.saved_world} worker(s), its ZeRO-{plan.saved_stage} "
                   f"optimizer state re-partitioned for {self.world} at ZeRO-{stage} through a "
                   "DeepSpeed universal checkpoint")
        else:
            self.engine.load_checkpoint(str(chosen), tag=ckpt_lib.DS_TAG,
                                        load_module_strict=True)
            if plan.saved_world != self.world:
                how = f"; written by {plan.saved_world} worker(s), ZeRO-0 state loaded as it is"
        state = ckpt_lib.read_state(chosen, self.rank)
        if self.engine.global_steps != state.global_step:
            raise RuntimeError(f"checkpoint mismatch in {chosen}: DeepSpeed is at step "
                               f"{self.engine.global_steps}, mmdist state at {state.global_step}")
        state.resumes.append({"from_step": state.global_step, "checkpoint": chosen.name,
                              "skipped": plan.skipped, "from_world": plan.saved_world,
                              "world": self.world})
        self.reporter.say(
            f"resumed from {chosen.name} at step {state.global_step} (epoch {state.epoch}, "
            f"{len(state.consumed)} samples of this epoch already consumed{how})")
        return state

    def save(self, state: TrainState, ledger: list[int], metrics: dict[str, float],
             final: bool = False) -> None:
        """Write this rank's part of a checkpoint at ``state`` and report it to Ray Train with
        ``metrics``.

        Every rank writes its DeepSpeed shards and its ledger (``ledger``: the sample ids it
        consumed in this epoch); rank 0 adds the state (with the MLflow values not delivered
        by now), the resolved config and the tokenizer; ``final`` adds the consolidated model.
        The rank's file list is written last: its presence marks the rank's part complete.
        """
        metrics = at_step(metrics, state)
        with tempfile.TemporaryDirectory(prefix="mmdist-ckpt-") as tmp:
            try:
                self.engine.save_checkpoint(tmp, tag=ckpt_lib.DS_TAG)
                ckpt_lib.write_ledger(tmp, self.rank, state.epoch, ledger, state.order_hash)
            except (OSError, RuntimeError) as e:  # torch's zip writer reports a short write so
                free = shutil.disk_usage(tmp).free
                raise OSError(
                    f"rank {self.rank} could not write the checkpoint of step "
                    f"{state.global_step} into {tmp} ({type(e).__name__}: {str(e)[:200]}); "
                    f"{free / 2**20:.0f} MiB free there. The previous complete checkpoint "
                    "stays the newest; a full disk or a file-size limit looks like this"
                ) from e
            if final:  # a collective: its errors are not write errors
                self.consolidate(Path(tmp) / ckpt_lib.MODEL_DIR)
            if self.rank == 0:
                self.reporter.hand_over(state)
                t = self.cfg.train
                ckpt_lib.write_state(tmp, state, {
                    "run_name": self.job.run_name, "world_size": self.world,
                    "zero_stage": t.zero_stage_at(self.world), "config": self.cfg.to_dict(),
                    "optimizer_steps": self.optimizer_steps(),
                    "metrics": metrics})
                shutil.copytree(Path(self.job.data_dir) / "tokenizer", Path(tmp) / "tokenizer")
            ckpt_lib.write_file_list(tmp, self.rank)  # last: marks this rank complete
            self.reporter.report(metrics, tmp)

    def optimizer_steps(self) -> str:
        """Who takes this run's optimizer steps (a key of ``checkpoint.OPTIMIZER_STEPS``)."""
        return ("mmdist" if client_optimizer_steps(self.cfg.train, self.world)
                else "deepspeed")

    def consolidate(self, out_dir: Path) -> None:
        """Consolidate the ZeRO-partitioned fp32 master weights into one safetensors model in
        ``out_dir``, with the tokenizer, the data manifest and where the model comes from.

        Every rank takes part (gathering a ZeRO-3 parameter is a collective); rank 0 writes.
        """
        # heavy: loaded where a checkpoint is written (a worker), as in engine.build_engine
        import deepspeed
        from deepspeed.utils import safe_get_full_fp32_param

        module = self.engine.module
        weights: dict[str, torch.Tensor] = {}
        for name, p in module.named_parameters():
            full = safe_get_full_fp32_param(p)
            if full is None and hasattr(p, "ds_id"):  # frozen under ZeRO-3: no master copy
                with deepspeed.zero.GatheredParameters([p]):
                    full = p.detach().clone()
            elif full is None:  # no partitioned master copy (ZeRO-0 fp32, frozen params)
                full = p.detach()
            if self.rank == 0:
                weights[name] = full.detach().float().cpu().clone()
        for name, b in module.named_buffers():
            if self.rank == 0:
                weights[name] = b.detach().cpu().clone()
        if self.rank != 0:
            return
        data_dir = Path(self.job.data_dir)
        out_dir.mkdir(parents=True, exist_ok=True)
        cfg = self.cfg
        if cfg.model.lora is not None:  # plain weights that load without peft + the adapter
            layers = lora_layers(module)
            save_adapters(weights, cfg, out_dir / "adapter")
            weights = merge_lora(weights, layers)
            cfg = cfg.override({"model.lora": None})
        save_state_dict(weights, cfg, self.job.vocab, out_dir, extra=module.extra)
        copy_processors(cfg, out_dir)
        shutil.copytree(data_dir / "tokenizer", out_dir / "tokenizer", dirs_exist_ok=True)
        manifest = data_dir / "manifest.json"
        if manifest.exists():
            (out_dir / "data_manifest.json").write_text(manifest.read_text())
        (out_dir / "training.json").write_text(json.dumps(
            {"run_name": self.job.run_name, "mlflow_run_id": self.job.mlflow_run_id,
             "global_step": self.engine.global_steps}, indent=1))
