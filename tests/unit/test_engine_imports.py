"""Building the DeepSpeed engine and training with it loads neither Inductor's compiler nor
TorchDynamo: DeepSpeed imports its Muon module from ``deepspeed.initialize`` whatever the
optimizer, and that module's ``torch.compile`` decorators would load both (2-4 s of every
worker's start-up); torch's AdamW imports TorchDynamo on its first step (1.1 CPU-s). mmdist
imports the module with its kernels eager and steps with ``optim.EagerAdamW``, and ZeRO-2 and
ZeRO-3 still build, step, save and load."""

import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
pytestmark = pytest.mark.slow


@pytest.mark.parametrize("stage", [2, 3])
def test_an_engine_builds_and_steps_without_inductor_or_dynamo(stage, tmp_path):
    code = textwrap.dedent(f'''
        import os, sys, torch
        from mmdist.bench.process_group import single_process_group
        from mmdist.config import load_config
        from mmdist.train.engine import build_engine
        from tests.unit.synthetic_mm import VOCAB, make_batch
        cfg = load_config("tiny", ["model.size=tiny", "train.num_workers=1",
                                   "train.zero_on_one_worker=true", "train.zero_stage={stage}",
                                   "train.micro_batch_size=4", "train.global_batch_size=0",
                                   "train.precision=fp32"])
        ids = {{"vocab_size": VOCAB, "pad_id": 0, "bos_id": 2, "eos_id": 3}}
        with single_process_group(torch.device("cpu")):
            engine = build_engine(cfg, ids, world_size=1, total_steps=2)
            for i in range(2):
                out = engine(make_batch(cfg, 4, seed=i))
                engine.backward(out["loss"])
                engine.step()
            engine.save_checkpoint(sys.argv[1], tag="t")
            engine.load_checkpoint(sys.argv[1], tag="t")
        print("DYNAMO", "torch._dynamo" in sys.modules)
        from deepspeed.runtime.zero.muon import original_muon
        print("INDUCTOR", "torch._inductor.compile_fx" in sys.modules)
        print("MUON_EAGER", not hasattr(original_muon.zeropower_via_newtonschulz5, "_torchdynamo_orig_callable"))
        print("ENV", os.environ.get("TORCHDYNAMO_DISABLE"))
        from deepspeed.runtime import compiler
        print("COMPILE_RESTORED", compiler.compile() is torch.compile)
        print("LOSS", float(out["loss"]))
    ''')
    r = subprocess.run([sys.executable, "-c", code, str(tmp_path)], cwd=ROOT, capture_output=True,
                       text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-3000:]
    assert "INDUCTOR False" in r.stdout, r.stdout
    # ZeRO-3 imports the model libraries before zero.Init (engine.preload), and torchvision
    # loads TorchDynamo itself; at ZeRO-2 nothing does
    assert f"DYNAMO {stage == 3}" in r.stdout, r.stdout
    assert "MUON_EAGER True" in r.stdout, r.stdout
    # the switches are off again after the import
    assert "ENV None" in r.stdout and "COMPILE_RESTORED True" in r.stdout, r.stdout
    loss = float(r.stdout.split("LOSS ")[1].split()[0])
    assert loss == loss and loss > 0
