"""`mmdist bench adapt` as users run it: no flags (random stand-ins of the stage-1 preset's
parts), and with local pretrained directories given (tiny saved models, used as they are)."""

from __future__ import annotations

import argparse
import os

import pytest
import torch

from mmdist.bench import adapt

os.environ["HF_HUB_OFFLINE"] = "1"
pytestmark = pytest.mark.slow


def _args(*overrides, **kw):
    parser = argparse.ArgumentParser()
    adapt.configure_parser(parser)
    return parser.parse_args([*(f"--{k.replace('_', '-')}={v}" for k, v in kw.items()),
                              *overrides])


def _check(out):
    v = out["variants"]
    assert out["ratios"]["lora"] < out["ratios"]["frozen"] < out["ratios"]["full"] == 1.0
    assert v["lora"]["trainable_params"] < v["frozen"]["trainable_params"] \
        < v["full"]["trainable_params"]
    # all trains but Whisper's fixed sinusoidal positions
    assert v["full"]["trainable_params"] > 0.98 * v["full"]["params"]
    for r in v.values():  # bf16: 2-byte gradients; fp32 master copy + two Adam moments
        assert r["grad_bytes"] == pytest.approx(2 * r["trainable_params"], rel=0.02)
        assert r["optimizer_bytes"] == pytest.approx(12 * r["trainable_params"], rel=0.02)
        assert r["model_bytes"] >= 2 * r["params"] * 0.98  # frozen parts are still held


def test_default_path_measures_stand_ins(capsys):
    out = adapt.run(_args())
    _check(out)
    printed = capsys.readouterr().out
    assert "random stand-ins" in printed and "vs full" in printed


def test_given_directories_are_used(tmp_path):
    from tests.tiny_hf import MODELS, tiny_lm

    torch.manual_seed(0)
    lm = tiny_lm(tmp_path / "lm", "gpt2")
    for name in ("siglip", "whisper"):
        MODELS[name][0](tmp_path / name)
    out = adapt.run(_args(f"model.decoder_pretrained={lm}",
                          f"model.image_pretrained={tmp_path / 'siglip'}",
                          f"model.audio_pretrained={tmp_path / 'whisper'}",
                          "model.modality_tokens={image: 4, audio: 4}"))
    _check(out)
