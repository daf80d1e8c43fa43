"""The warning for a loss that sits at what a constant prediction scores."""

import math

import pytest
import torch

from mmdist.config import load_config
from mmdist.train.collapse import ConstantWatch, constant_losses

LABELS = {"rows": 100, "max": 2, "counts": {"0": 50, "1": 25, "2": 25}}


def test_constant_losses_per_task():
    assert constant_losses(load_config("tiny"), None) == {"itm": pytest.approx(math.log(2))}
    classify = load_config("tiny", ["model.task=classify", "model.num_classes=3"])
    entropy = -(0.5 * math.log(0.5) + 2 * 0.25 * math.log(0.25))
    assert constant_losses(classify, LABELS) == {"classify": pytest.approx(entropy)}
    assert constant_losses(classify, None) == {}  # labels unknown: no claim
    multi = load_config("tiny", ["model.task=multitask",
                                 "model.task_weights={itm: 1, contrastive: 1, lm: 1}"])
    assert set(constant_losses(multi, None)) == {"itm", "contrastive"}  # lm: not known


def test_warns_for_an_epoch_at_the_constant_and_not_for_one_that_learns():
    said: list[str] = []
    watch = ConstantWatch({"itm": math.log(2)}, said.append)
    for loss in (0.6935, 0.6929, 0.6932):
        watch.add({"itm_loss": torch.tensor(loss), "loss": torch.tensor(loss)})
    assert watch.end_epoch(0) == ["itm"]
    assert "itm loss averaged 0.6932 over epoch 0" in said[0] and "0.6931" in said[0]
    for loss in (0.62, 0.55, 0.51):
        watch.add({"itm_loss": torch.tensor(loss), "loss": torch.tensor(loss)})
    assert watch.end_epoch(1) == [] and len(said) == 1
