"""The analytic FLOPs function against torch's FlopCounterMode."""

import pytest
import torch
from torch.utils.flop_counter import FlopCounterMode

from mmdist.models import build_model
from mmdist.models.accounting import flops_per_sample, forward_flops_per_sample
from tests.unit.synthetic_mm import VOCAB, make_batch, tiny_config


def _measure(cfg, batch_size: int = 4) -> tuple[float, float]:
    torch.manual_seed(0)
    model = build_model(cfg, VOCAB)
    batch = make_batch(cfg, batch_size)
    with FlopCounterMode(display=False) as fwd:
        model(batch)
    with FlopCounterMode(display=False) as train:
        model(batch)["loss"].backward()
    return fwd.get_total_flops() / batch_size, train.get_total_flops() / batch_size


def test_training_flops_match_the_flop_counter_within_10_percent():
    # FlopCounterMode does not count LSTM/GRU kernels, so this config uses BERT text.
    cfg = tiny_config("model.hidden_size=64", "model.text_encoder=bert", "model.fusion=concat")
    fwd, train = _measure(cfg, 2)
    assert flops_per_sample(cfg, VOCAB) == pytest.approx(train, rel=0.10)
    assert forward_flops_per_sample(cfg, VOCAB) == pytest.approx(fwd, rel=0.01)


@pytest.mark.parametrize("overrides", [
    ["model.fusion=transformer", "model.audio_encoder=transformer"],
    ["model.fusion=attention", "model.fusion_stage=early", "model.task=classify"],
    ["model.task=lm", "model.decoder=gpt2", "model.lm_conditioning=cross_attention"],
    ["model.task=lm", "model.decoder=llama"],
    ["model.image_encoder=resnet18"],
])
def test_forward_flops_match_for_other_parts(overrides):
    cfg = tiny_config("model.text_encoder=bert", *overrides)
    fwd, train = _measure(cfg, 2)
    assert forward_flops_per_sample(cfg, VOCAB) == pytest.approx(fwd, rel=0.02)
    assert flops_per_sample(cfg, VOCAB) == pytest.approx(train, rel=0.10)
