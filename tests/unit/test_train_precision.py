"""Half precision through the real DeepSpeed engine (``train.engine.build_engine``), in-process on
a 1-rank gloo group (Ray adds nothing to what is tested here).

- A covering set: every encoder, every task and every ZeRO stage trains a few steps in bf16 and
  in fp16 at tiny size at least once (``test_covering_set_is_complete`` proves the set covers).
- Every shipped preset trains as shipped, its own precision and ZeRO stage, at tiny size.
"""

from __future__ import annotations

import itertools
from pathlib import Path

import pytest
import torch

from mmdist.bench.process_group import single_process_group
from mmdist.config import (
    AUDIO_ENCODERS,
    DECODERS,
    IMAGE_ENCODERS,
    TASKS,
    TEXT_ENCODERS,
    Config,
    list_presets,
    load_config,
)
from mmdist.models import build_model
from mmdist.train.deepspeed_config import precision_problem
from mmdist.train.engine import build_engine
from tests.conftest import pretrained_overrides
from tests.unit.synthetic_mm import VOCAB, make_batch

pytestmark = pytest.mark.slow

VOCAB_IDS = {"vocab_size": VOCAB, "pad_id": 0, "bos_id": 2, "eos_id": 3}
# tiny inputs (32 px suits every image encoder: vit patch 16, resnet stride 32); one rank runs
# the ZeRO stage asked for (by default one worker runs ZeRO-1/2 as ZeRO-0)
TINY = ["model.size=tiny", "data.max_text_len=16", "data.n_mels=16", "data.audio_seconds=0.5",
        "data.image_size=32", "model.num_classes=8", "train.num_workers=1",
        "train.zero_on_one_worker=true",
        "train.micro_batch_size=4",
        "train.global_batch_size=0", "train.warmup_steps=0"]

# One case per row; each runs in bf16 and in fp16. Together they hold every text, image and audio
# encoder, every early-fusion input embedding, every decoder, every task and every ZeRO stage.
CASES: dict[str, list[str]] = {
    "itm-bert-resnet50-conv-z0": [
        "model.task=itm", "model.text_encoder=bert", "model.image_encoder=resnet50",
        "model.audio_encoder=conv", "train.zero_stage=0"],
    "contrastive-lstm-resnet18-transformer-z1": [
        "model.task=contrastive", "model.text_encoder=lstm", "model.image_encoder=resnet18",
        "model.audio_encoder=transformer", "train.zero_stage=1"],
    "classify-gru-vit-conv-z2": [
        "model.task=classify", "model.text_encoder=gru", "model.image_encoder=vit_b_16",
        "model.audio_encoder=conv", "train.zero_stage=2"],
    "lm-cnn-transformer-llama-z3": [
        "model.task=lm", "model.image_encoder=cnn", "model.audio_encoder=transformer",
        "model.decoder=llama", "train.zero_stage=3"],
    "vqa-early-gpt2-xattn-z2": [
        "model.task=vqa", "model.fusion_stage=early", "model.decoder=gpt2",
        "model.lm_conditioning=cross_attention", "train.zero_stage=2"],
    "multitask-gru-resnet18-lstmdec-z3": [
        "model.task=multitask", "model.text_encoder=gru", "model.image_encoder=resnet18",
        "model.audio_encoder=conv", "model.decoder=lstm",
        "model.task_weights={itm: 1, contrastive: 1, classify: 1, lm: 1}", "train.zero_stage=3"],
    # pretrained parts (tiny models saved with save_pretrained; @name: a directory of them)
    "prompted-siglip-whisper-llama-lora-z3": [
        "model.task=prompted", "model.decoder_pretrained=@llama", "model.image_pretrained=@siglip",
        "model.audio_pretrained=@whisper", "model.freeze=[image_encoder]", "model.lora={r: 2}",
        "train.zero_stage=3"],
    "itm-hfbert-clip-wav2vec2-z1": [
        "model.task=itm", "model.text_pretrained=@bert", "model.image_pretrained=@clip",
        "model.audio_pretrained=@wav2vec2", "model.freeze=[text_encoder]", "train.zero_stage=1"],
}
PRECISIONS = ("bf16", "fp16")
STEPS = 3


def with_dirs(overrides: list[str], dirs: dict[str, Path]) -> list[str]:
    """``key=@name`` -> ``key=<directory>``."""
    out = []
    for o in overrides:
        key, _, value = o.partition("=")
        out.append(f"{key}={dirs[value]}" if value in dirs else o)
    return out


@pytest.fixture(scope="module")
def process_group():
    with single_process_group(torch.device("cpu")):
        yield


def train_steps(cfg: Config, steps: int = STEPS) -> list[float]:
    """Build the engine training builds, take ``steps`` optimizer steps, evaluate once."""
    engine = build_engine(cfg, VOCAB_IDS, world_size=1, total_steps=steps)
    dtype = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}
    # bf16 without ZeRO is torch.autocast over fp32 weights (deepspeed_config); otherwise the
    # engine casts the model
    autocast = cfg.train.precision == "bf16" and cfg.train.zero_stage == 0
    assert engine.torch_autocast_enabled() == autocast
    assert engine.module.dtype == (torch.float32 if autocast else dtype[cfg.train.precision])
    assert engine.zero_optimization_stage() == cfg.train.zero_stage  # the stage asked for
    losses = []
    engine.train()
    for i in range(steps):
        out = engine(features_for(cfg, make_batch(cfg, cfg.train.micro_batch_size, seed=i)))
        engine.backward(out["loss"])
        engine.step()
        losses.append(float(out["loss"].detach()))
    assert engine.global_steps == steps
    engine.eval()
    with torch.no_grad():
        ev = engine(features_for(cfg, make_batch(cfg, cfg.train.micro_batch_size, seed=99)),
                    mode="eval")
    assert ev["loss"].shape == (cfg.train.micro_batch_size,)
    assert torch.isfinite(ev["loss"].float()).all(), ev["loss"]
    assert all(loss == loss and abs(loss) < 1e3 for loss in losses), losses
    return losses


def features_for(cfg: Config, batch: dict) -> dict:
    """A pretrained audio encoder's own features in place of the batch's log-mel (what
    preprocessing makes for it: ``data.preprocess``)."""
    m, d = cfg.model, cfg.data
    if m.audio_pretrained and "audio" in m.modalities and m.fusion_stage != "early":
        from mmdist.data.hf_audio import AudioFeatures

        n = int(round(d.sample_rate * d.audio_seconds))
        waves = torch.randn(len(batch["audio"]), n, generator=torch.Generator().manual_seed(0))
        batch["audio"] = torch.from_numpy(AudioFeatures(m.audio_pretrained)(waves.numpy()))
    return batch


def _case_config(overrides: list[str], precision: str) -> Config:
    return load_config("tiny", [*TINY, *overrides, f"train.precision={precision}"])


def test_covering_set_is_complete():
    """Every registry entry appears in the set; a new encoder, task or stage must join it."""
    seen: dict[str, set] = {k: set() for k in ("text", "image", "audio", "decoder", "task",
                                                "zero", "stage")}
    for overrides in CASES.values():
        m = _case_config(overrides, "bf16")
        seen["task"].add(m.model.task)
        seen["zero"].add(m.train.zero_stage)
        seen["stage"].add(m.model.fusion_stage)
        if m.model.fusion_stage != "early":  # early fusion replaces encoders by embeddings
            seen["text"].add(m.model.text_encoder)
            seen["image"].add(m.model.image_encoder)
            seen["audio"].add(m.model.audio_encoder)
        if m.model.task in ("lm", "vqa", "multitask") and not m.model.decoder_pretrained:
            seen["decoder"].add(m.model.decoder)
    assert seen["text"] == set(TEXT_ENCODERS)
    assert seen["image"] == set(IMAGE_ENCODERS)
    assert seen["audio"] == set(AUDIO_ENCODERS)
    assert seen["decoder"] == set(DECODERS)
    assert seen["task"] == set(TASKS)
    assert seen["zero"] == {0, 1, 2, 3}
    assert "early" in seen["stage"]


@pytest.mark.parametrize("case,precision", list(itertools.product(CASES, PRECISIONS)))
def test_trains_in_half_precision(process_group, pretrained_dirs, case, precision):
    cfg = _case_config(with_dirs(CASES[case], pretrained_dirs), precision)
    if precision_problem(cfg) is None:
        train_steps(cfg)
        return
    # A CPU without float16 (no AVX512-FP16 / AMX-FP16: DeepSpeed refuses fp16 there): the
    # engine refuses with mmdist's own message naming the key, and the model's own fp16 numerics
    # (what a GPU run relies on) still hold.
    with pytest.raises(ValueError, match=r"train\.precision=fp16 .* train\.precision=bf16"):
        build_engine(cfg, VOCAB_IDS, world_size=1, total_steps=STEPS)
    half_steps(cfg)


def half_steps(cfg: Config) -> None:
    """The model in float16 without DeepSpeed: forward gives a finite loss, and backward gives
    finite gradients at some loss scale, found as DeepSpeed's dynamic scaler finds it (from
    2^16 down)."""
    torch.manual_seed(cfg.train.seed)
    model = build_model(cfg, **VOCAB_IDS).to(torch.float16)
    model.train()
    out = model(features_for(cfg, make_batch(cfg, cfg.train.micro_batch_size, seed=0)))
    loss = out["loss"]
    assert torch.isfinite(loss), loss
    params = [p for p in model.parameters() if p.requires_grad]
    for power in range(16, -1, -2):
        model.zero_grad(set_to_none=True)
        (loss.float() * 2.0**power).backward(retain_graph=True)
        grads = [p.grad for p in params if p.grad is not None]
        assert grads
        if all(torch.isfinite(g).all() for g in grads):
            return
    raise AssertionError("float16 gradients overflow even without loss scaling")


# Shipped presets as shipped, at tiny size. On this CPU machine a GPU preset runs on CPU with
# its own precision and ZeRO stage (use_gpu is the one key changed; one rank runs that stage).
PRESET_TINY = ["model.size=tiny", "data.max_text_len=16", "data.n_mels=16",
               "data.audio_seconds=0.5", "data.image_size=32", "train.num_workers=1",
               "train.zero_on_one_worker=true",
               "train.micro_batch_size=4", "train.global_batch_size=0", "train.use_gpu=false"]


@pytest.mark.parametrize("name", list_presets())
def test_every_preset_trains_as_shipped(process_group, pretrained_dirs, name):
    shipped = load_config(name)
    # presets of pretrained parts: their keys point at tiny saved models, as a user's would
    cfg = load_config(name, [*PRESET_TINY, *pretrained_overrides(name, pretrained_dirs)])
    assert (cfg.train.precision, cfg.train.zero_stage) == (shipped.train.precision,
                                                           shipped.train.zero_stage)
    train_steps(cfg)


@pytest.mark.parametrize("zero,precision", [(0, "fp32"), (0, "bf16"), (2, "fp32"), (2, "bf16"),
                                            (3, "fp32"), (3, "bf16")])
def test_a_non_finite_step_is_skipped_by_the_engine(process_group, zero, precision):
    """The training loop relies on it (no host sync of its own): at every ZeRO stage and
    precision, a NaN loss leaves every weight as it was and counts in ``skipped_steps``."""
    from deepspeed.utils import safe_get_full_fp32_param

    cfg = load_config("tiny", [*TINY, f"train.zero_stage={zero}", f"train.precision={precision}"])
    engine = build_engine(cfg, VOCAB_IDS, world_size=1, total_steps=4)
    engine.train()

    def weights() -> list[torch.Tensor]:
        return [(safe_get_full_fp32_param(p) if hasattr(p, "ds_id") else p.detach()).float().clone()
                for p in engine.module.parameters()]

    for i, nan in enumerate((False, True, False)):
        loss = engine(make_batch(cfg, cfg.train.micro_batch_size, seed=i))["loss"]
        before = weights()
        engine.backward(loss * float("nan") if nan else loss)
        engine.step()
        after = weights()
        changed = sum(not torch.equal(a, b) for a, b in zip(before, after))
        assert (changed == 0) if nan else (changed > 0), (i, changed)
        assert all(bool(w.isfinite().all()) for w in after)
    assert (engine.global_steps, engine.skipped_steps) == (3, 1)
