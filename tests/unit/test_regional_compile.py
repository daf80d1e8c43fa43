"""``model.compile``: each repeated block compiled on its own (models/regional_compile.py). The LM
task loses its gradient when the whole model is compiled; block by block it trains exactly as
eager."""

import pytest
import torch
from torch import nn

from mmdist.bench.process_group import single_process_group
from mmdist.config import load_config
from mmdist.models.regional_compile import compile_blocks
from mmdist.train.engine import build_engine
from tests.unit.synthetic_mm import VOCAB, make_batch

pytestmark = pytest.mark.slow

VOCAB_IDS = {"vocab_size": VOCAB, "pad_id": 0, "bos_id": 2, "eos_id": 3}
TINY = ["model.size=tiny", "data.max_text_len=16", "data.n_mels=16", "data.audio_seconds=0.5",
        "data.image_size=32", "model.num_classes=8", "train.num_workers=1",
        "train.zero_on_one_worker=true", "train.micro_batch_size=4",
        "train.global_batch_size=0", "train.warmup_steps=0", "train.precision=fp32",
        "model.task=lm"]


def test_the_outermost_module_lists_are_compiled_block_by_block():
    inner = nn.ModuleList([nn.Linear(2, 2)])
    block = nn.Sequential(nn.Linear(2, 2), nn.Module())
    block[1].inner = inner  # a list inside a block: compiled with its block, not again
    model = nn.Module()
    model.embed = nn.Linear(2, 2)
    model.body = nn.Module()
    model.body.layers = nn.ModuleList([block, nn.Linear(2, 2)])
    assert compile_blocks(model) == ["body.layers.0", "body.layers.1"]
    assert model.body.layers[1]._compiled_call_impl is not None
    assert model.embed._compiled_call_impl is None and inner[0]._compiled_call_impl is None
    assert set(dict(model.named_parameters())) == {  # names (and checkpoints) unchanged
        "embed.weight", "embed.bias", "body.layers.0.0.weight", "body.layers.0.0.bias",
        "body.layers.0.1.inner.0.weight", "body.layers.0.1.inner.0.bias",
        "body.layers.1.weight", "body.layers.1.bias"}


@pytest.fixture(scope="module")
def process_group():
    with single_process_group(torch.device("cpu")):
        yield


def _losses(cfg, steps: int = 3) -> tuple[list[float], list[str]]:
    said: list[str] = []
    engine = build_engine(cfg, VOCAB_IDS, world_size=1, total_steps=steps, log=said.append)
    losses = []
    for i in range(steps):
        out = engine(make_batch(cfg, 4, seed=i))
        assert out["loss"].grad_fn is not None, f"step {i}: the loss has no gradient"
        engine.backward(out["loss"])
        engine.step()
        losses.append(float(out["loss"]))
    return losses, said


@pytest.mark.parametrize("decoder,zero", [("gpt2", 2), ("llama", 3)])
def test_a_compiled_lm_trains_as_the_eager_one(process_group, decoder, zero):
    cfg = load_config("tiny", [*TINY, f"model.decoder={decoder}", f"train.zero_stage={zero}"])
    eager, _ = _losses(cfg)
    torch._dynamo.reset()
    compiled, said = _losses(cfg.override({"model.compile": True}))
    assert any("torch.compile: " in s and "blocks" in s and "torch.compile: 0 " not in s
               for s in said), said
    assert compiled == pytest.approx(eager, abs=1e-4)
    assert compiled[-1] < compiled[0]
