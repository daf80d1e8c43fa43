"""transformers and torchvision are imported on first use, not with mmdist.models (~6 s of
start-up per training worker of a model that does not use them), and a build inside
deepspeed.zero.Init that would import them there stops with an error naming the fix."""

import subprocess
import sys
import textwrap
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def _run(code: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-c", textwrap.dedent(code)], cwd=ROOT,
                          capture_output=True, text=True, timeout=300)


def test_lstm_cnn_model_builds_without_transformers_or_torchvision():
    r = _run('''
        import sys
        from tests.unit.synthetic_mm import VOCAB, tiny_config
        from mmdist.models import build_model
        model = build_model(tiny_config("model.text_encoder=lstm", "model.image_encoder=cnn"),
                            VOCAB)
        assert sum(p.numel() for p in model.parameters()) > 0
        loaded = sorted(m for m in ("transformers", "torchvision") if m in sys.modules)
        print("LOADED", loaded)
    ''')
    assert r.returncode == 0, r.stderr[-3000:]
    assert "LOADED []" in r.stdout


def test_a_build_inside_zero_init_without_preload_names_the_fix():
    # stands in for an open zero.Init: what inside_zero_init() reads, without DeepSpeed
    r = _run('''
        import sys, types
        sys.modules["deepspeed.runtime.zero.partition_parameters"] = types.SimpleNamespace(
            zero_init_context=1)
        from tests.unit.synthetic_mm import VOCAB, tiny_config
        from mmdist.models import build_model
        for over in ("model.text_encoder=bert", "model.image_encoder=resnet18"):
            try:
                build_model(tiny_config(over), VOCAB)
            except RuntimeError as e:
                print("REFUSED", over, e)
    ''')
    assert r.returncode == 0, r.stderr[-3000:]
    assert r.stdout.count("call mmdist.models.transformers_init.preload()") == 2, r.stdout
    assert "REFUSED model.text_encoder=bert transformers.models.bert" in r.stdout
    assert "REFUSED model.image_encoder=resnet18 torchvision.models" in r.stdout
