"""Every fusion x stage x task builds at tiny size, trains a step, and sends gradients to every
encoder that was given input; sizes, registry and config rules."""

import pytest
import torch

from mmdist.config import FUSION_STAGES, FUSIONS, TASKS, ConfigError
from mmdist.models import build_model, count_parameters
from mmdist.models.accounting import parameter_count
from mmdist.models.fusion import build_fusion
from mmdist.registry import FUSIONS as FUSION_REGISTRY
from tests.unit.synthetic_mm import VOCAB, make_batch, tiny_config

# Small inputs keep the 138 combinations fast; the shapes still exercise every code path.
SMALL_INPUTS = ("data.image_size=16", "data.max_text_len=8", "data.audio_seconds=0.25")
# prompted needs a pretrained LM directory: tests/unit/test_pretrained.py covers it
COMBOS = [(t, f, s) for t in TASKS if t != "prompted" for f in FUSIONS for s in FUSION_STAGES
          if not (f == "attention" and s == "late")]


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    """One intra-op thread: tiny ops are faster so on a shared 2-core machine."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


def _encoder_grads(model) -> dict[str, float]:
    return {name: sum(float(p.grad.abs().sum()) for p in enc.parameters() if p.grad is not None)
            for name, enc in model.encoders.items()}


@pytest.mark.parametrize("task,fusion,stage", COMBOS)
def test_every_combination_trains_a_step(task, fusion, stage):
    torch.manual_seed(0)
    cfg = tiny_config(f"model.task={task}", f"model.fusion={fusion}",
                      f"model.fusion_stage={stage}", *SMALL_INPUTS)
    model = build_model(cfg, VOCAB)
    out = model(make_batch(cfg, 3))
    assert out["loss"].dtype == torch.float32 and out["loss"].ndim == 0
    assert torch.isfinite(out["loss"])
    out["loss"].backward()
    grads = _encoder_grads(model)
    assert set(grads) >= {"image", "audio"}
    assert all(g > 0 for g in grads.values()), grads
    assert count_parameters(model) == parameter_count(cfg, VOCAB)


def test_attention_late_is_rejected_with_a_reason():
    with pytest.raises(ConfigError, match="late fusion combines one pooled"):
        tiny_config("model.fusion=attention", "model.fusion_stage=late")


@pytest.mark.parametrize("overrides,match", [
    (["model.decoder=llama", "model.lm_conditioning=cross_attention", "model.task=lm"],
     "Llama has no cross-attention"),
    (["model.fusion_stage=early", "model.text_encoder=bert", "model.text_pretrained=/x"],
     "pretrained weights would be unused"),
    (["model.image_encoder=vit_b_16", "data.image_size=40"], "multiple of 16"),
    (["model.task=multitask", "model.task_weights={vqa: 1.0}"], "model.task_weights.vqa"),
    (["model.vqa_answer=guess"], "model.vqa_answer"),
])
def test_config_rejects_meaningless_model_combinations(overrides, match):
    with pytest.raises(ConfigError, match=match):
        tiny_config(*overrides)


def test_registry_is_a_dict_of_every_config_choice():
    assert tuple(FUSION_REGISTRY) == FUSIONS
    with pytest.raises(ValueError, match=r"unknown fusion 'sum'; choose from \['add'"):
        build_fusion("sum", 8, 2, 2, 1, 1)


@pytest.mark.parametrize("overrides", [
    ["model.text_encoder=bert", "model.audio_encoder=transformer"],
    ["model.text_encoder=gru", "model.task=lm", "model.decoder=llama"],
    ["model.task=lm", "model.decoder=lstm", "model.lm_conditioning=cross_attention"],
    ["model.task=lm", "model.lm_conditioning=cross_attention", "model.fusion=attention"],
    ["model.task=vqa", "model.vqa_answer=classify"],
    ["model.task=contrastive", "model.modalities=[text, audio]"],
    ["model.task=lm", "model.modalities=[text]"],
    ["model.task=classify", "model.modalities=[image]", "model.num_classes=2"],
    ["model.image_encoder=resnet18"],
    ["model.image_encoder=vit_b_16"],
    ["model.task=multitask", "model.task_weights={itm: 1, contrastive: 1, classify: 1, lm: 1}"],
])
def test_encoder_decoder_variants_train_a_step(overrides):
    torch.manual_seed(0)
    cfg = tiny_config(*overrides)
    model = build_model(cfg, VOCAB)
    out = model(make_batch(cfg, 4))
    out["loss"].backward()
    assert torch.isfinite(out["loss"])
    assert all(g > 0 for g in _encoder_grads(model).values())
    assert count_parameters(model) == parameter_count(cfg, VOCAB)


def test_size_presets():
    counts = {size: parameter_count(tiny_config(f"model.size={size}"), 2000)
              for size in ("tiny", "small", "base", "1b", "7b")}
    assert counts["tiny"] < 1_000_000
    assert counts["tiny"] < counts["small"] < counts["base"] < counts["1b"] < counts["7b"]
    # the decoder sizes are what the names promise (analytic: never built here)
    lm = {size: parameter_count(tiny_config(f"model.size={size}", "model.task=lm",
                                            "model.decoder=llama"), 32000)
          for size in ("1b", "7b")}
    assert 0.9e9 < lm["1b"] < 1.6e9 and 6e9 < lm["7b"] < 8e9, lm
    # the built tiny and small models match the analytic count exactly
    for size in ("tiny", "small"):
        cfg = tiny_config(f"model.size={size}")
        assert count_parameters(build_model(cfg, 2000)) == counts[size]


def test_hidden_size_override_picks_a_dividing_head_count():
    cfg = tiny_config("model.hidden_size=36", "model.fusion=transformer")
    model = build_model(cfg, VOCAB)
    model(make_batch(cfg, 2))["loss"].backward()


def test_bf16_parameters_take_fp32_and_uint8_batches():
    torch.manual_seed(0)
    cfg = tiny_config("model.task=multitask", "model.text_encoder=bert")
    model = build_model(cfg, VOCAB).to(torch.bfloat16)
    out = model(make_batch(cfg, 4))
    assert out["loss"].dtype == torch.float32 and torch.isfinite(out["loss"])
    out["loss"].backward()


def test_activation_checkpointing_gives_the_same_gradients():
    grads = []
    for flag in ("false", "true"):
        torch.manual_seed(0)
        cfg = tiny_config("model.task=lm", "model.fusion=transformer",
                          f"model.activation_checkpointing={flag}", *SMALL_INPUTS)
        model = build_model(cfg, VOCAB)
        model(make_batch(cfg, 3))["loss"].backward()
        grads.append(torch.cat([p.grad.flatten() for p in model.parameters()
                                if p.grad is not None]))
    torch.testing.assert_close(grads[0], grads[1])


def test_auxiliary_per_modality_heads_train_the_encoders_on_their_own_labels():
    cfg = tiny_config("model.task=classify", "model.num_classes=4",
                      "model.modalities=[image, audio]", "model.aux_classes={image: 4, audio: 4}")
    torch.manual_seed(0)
    model = build_model(cfg, VOCAB)
    assert count_parameters(model) == parameter_count(cfg, VOCAB)
    batch = make_batch(cfg, 6)
    out = model(batch)
    assert out["aux_image_loss"] > 0 and out["aux_audio_loss"] > 0
    out["loss"].backward()
    assert model.aux["image"].weight.grad.abs().sum() > 0
    unlabelled = dict(batch, label_image=torch.full((6,), -1), label_audio=torch.full((6,), -1))
    out = model(unlabelled)
    assert out["aux_image_loss"] == 0 and out["aux_audio_loss"] == 0
    off = build_model(cfg.override(["model.aux_weight=0"]), VOCAB)
    assert len(off.aux) == 0 and "aux_image_loss" not in off(batch)


@pytest.mark.parametrize("task", ["itm", "contrastive"])
def test_matching_between_two_non_text_modalities(task):
    cfg = tiny_config(f"model.task={task}", "model.modalities=[image, audio]",
                      "model.match=[image, audio]")
    torch.manual_seed(0)
    model = build_model(cfg, VOCAB)
    assert count_parameters(model) == parameter_count(cfg, VOCAB)
    batch = make_batch(cfg, 6)
    out = model(batch)
    out["loss"].backward()
    grads = _encoder_grads(model)
    assert grads["image"] > 0 and grads["audio"] > 0
    with torch.no_grad():
        ev = model.eval_outputs(batch)
    if task == "itm":  # negatives roll the audio only: the image stays with its sample
        assert ev["itm.logit_pos"].shape == (6,)
    else:
        assert ev["contrastive.text_emb"].shape == ev["contrastive.other_emb"].shape


def test_match_names_two_modalities_of_the_model():
    with pytest.raises(ConfigError, match=r"model.match=\['image'\]: two different"):
        tiny_config("model.match=[image]")
    with pytest.raises(ConfigError, match="model.match"):
        tiny_config("model.modalities=[text, image]", "model.match=[image, audio]")
