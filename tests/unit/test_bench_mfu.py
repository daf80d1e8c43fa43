"""`mmdist bench mfu` on CPU: the real DeepSpeed step in a plain process, honest about MFU."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from mmdist.bench.mfu import PEAK_BF16_TFLOPS, lookup_peak_tflops, resolve_peak

ROOT = Path(__file__).resolve().parents[2]
KEYS = {"tokens_per_s", "samples_per_s", "tflops", "mfu", "peak_tflops", "device",
        "peak_memory_bytes", "data_stall_ratio", "params", "flops_per_sample"}


@pytest.mark.parametrize("name, tflops", [
    ("NVIDIA H200", 989.0),
    ("NVIDIA H200 NVL", 989.0),
    ("NVIDIA GH200 480GB", 989.0),
    ("NVIDIA H100 80GB HBM3", 989.0),  # what an H100 SXM reports
    ("NVIDIA H100 PCIe", 756.0),
    ("NVIDIA H100 NVL", 835.0),
    ("NVIDIA A100-SXM4-80GB", 312.0),
    ("NVIDIA A100 80GB PCIe", 312.0),
    ("NVIDIA L4", 121.0),
    ("NVIDIA L40S", 362.0),
    ("NVIDIA A10", 125.0),
    ("Tesla V100-SXM2-16GB", None),  # no bf16 tensor cores
    ("cpu", None),
])
def test_peak_lookup_by_device_name(name, tflops):
    assert lookup_peak_tflops(name)[0] == tflops


def test_peak_table_entries_are_distinct_and_positive():
    assert len({pattern for pattern, _, _ in PEAK_BF16_TFLOPS}) == len(PEAK_BF16_TFLOPS)
    assert all(t > 0 for _, _, t in PEAK_BF16_TFLOPS)


def test_peak_override_wins_and_cpu_says_why():
    assert resolve_peak("NVIDIA H200", None)[0] == 989.0
    assert resolve_peak("NVIDIA H200", 500.0) == (500.0, "--peak-tflops 500")
    assert resolve_peak("cpu", 2.5)[0] == 2.5
    peak, why = resolve_peak("cpu", None)
    assert peak is None and "--peak-tflops" in why
    peak, why = resolve_peak("Some Future GPU", None)
    assert peak is None and "Some Future GPU" in why


# GPU hosts often have torch, transformers and DeepSpeed but not Ray or MLflow (the H200 the
# README's figures come from had neither): the bench must run there as it is.
WITHOUT_RAY = """
import sys
for absent in ("ray", "mlflow", "av"):  # `import ray` fails, find_spec("ray") is None: as if
    sys.modules[absent] = None          # not installed (transformers probes for mlflow)
from mmdist.cli import main
sys.exit(main())
"""


def test_bench_mfu_runs_the_real_step_on_cpu_without_ray(tmp_path):
    env = {**os.environ, "CUDA_VISIBLE_DEVICES": ""}
    # A separate process: the bench creates (and destroys) a torch process group.
    proc = subprocess.run(
        [sys.executable, "-c", WITHOUT_RAY, "bench", "mfu", "--config", "tiny", "--steps", "3",
         "--warmup", "1", "--batch-size", "8", "--data-workers", "0", "--json"],
        cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    out = json.loads(proc.stdout.strip().splitlines()[-1])
    assert KEYS <= set(out)
    assert out["device"] == "cpu"
    assert out["mfu"] is None and out["peak_tflops"] is None
    assert "MFU                  : n/a: no bf16 peak is known" in proc.stdout
    assert out["samples_per_s"] > 0 and out["tokens_per_s"] > 0 and out["tflops"] > 0
    assert out["tokens_per_s"] == pytest.approx(out["samples_per_s"] * out["tokens_per_sample"])
    assert out["tokens_by_modality"]["text"] == 16  # tiny: data.max_text_len
    assert out["data_stall_ratio"] > 0
    assert out["params"] > 0 and out["flops_per_sample"] > 0 and out["peak_memory_bytes"] > 0
    assert out["batch_size"] == 8


def test_activation_checkpointing_keeps_loss_and_gradients():
    import torch

    from mmdist.config import load_config
    from mmdist.models import build_model
    from mmdist.models.activation_checkpointing import enable_activation_checkpointing
    from tests.unit.synthetic_mm import VOCAB, make_batch

    cfg = load_config("tiny", ["model.task=lm", "model.decoder=llama"])
    grads = []
    for checkpointing in (False, True):
        torch.manual_seed(0)
        model = build_model(cfg, VOCAB)
        model.train()
        if checkpointing:
            assert enable_activation_checkpointing(model) == ["tasks.lm.decoder.lm"]
        torch.manual_seed(1)
        loss = model(make_batch(cfg, 4))["loss"]
        loss.backward()
        grads.append((float(loss.detach()), [p.grad.clone() for p in model.parameters()
                                    if p.grad is not None]))
    (loss_a, grads_a), (loss_b, grads_b) = grads
    assert loss_a == pytest.approx(loss_b)
    assert len(grads_a) == len(grads_b)
    assert all(torch.allclose(a, b, atol=1e-6) for a, b in zip(grads_a, grads_b))


def test_a_pretrained_lm_has_its_flops_counted(tmp_path, pretrained_dirs):
    """No analytic count covers a pretrained LM: its FLOPs are counted on the first step."""
    env = {**os.environ, "CUDA_VISIBLE_DEVICES": ""}
    proc = subprocess.run(
        [sys.executable, "-c", WITHOUT_RAY, "bench", "mfu", "--config", "tiny", "--steps", "2",
         "--warmup", "1", "--batch-size", "4", "--data-workers", "0", "--json",
         "model.task=lm", f"model.decoder_pretrained={pretrained_dirs['@llama']}",
         f"train.storage_path={tmp_path}"],
        cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    out = json.loads(proc.stdout.strip().splitlines()[-1])
    assert out["flops_source"].startswith("counted on the first step"), out
    # at least the forward matrix multiplies of the LM's linear layers over its 16 positions
    # (2 x its weights x 16; the embedding table is a lookup), and achieved = rate x FLOPs
    assert out["flops_per_sample"] > 2 * 16 * (out["params"] - 160 * 32) / 2, out
    assert out["tflops"] == pytest.approx(out["samples_per_s"] * out["flops_per_sample"] / 1e12)
