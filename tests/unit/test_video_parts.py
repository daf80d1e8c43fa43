"""The video encoder's parts in `model.freeze` (video_encoder = video_frame_encoder +
video_temporal) and in the analytic parameter / FLOPs accounting."""

import pytest
import torch
from torch.utils.flop_counter import FlopCounterMode

from mmdist.config import ConfigError
from mmdist.models import build_model, count_parameters
from mmdist.models.accounting import flops_per_sample, forward_flops_per_sample, parameter_count
from mmdist.models.adapt import component_of, trainable_summary
from tests.unit.synthetic_mm import VOCAB, make_batch, tiny_config

VIDEO = ["model.modalities=[text,image,video]", "data.video_frames=3",
         "model.task=classify", "model.num_classes=4"]


def _parts(model) -> dict[str, str]:
    return {n: component_of(n) for n, _ in model.named_parameters()}


def test_every_video_parameter_has_one_part_and_the_frame_encoder_is_not_the_image_one():
    model = build_model(tiny_config(*VIDEO, "model.video_temporal=transformer"), VOCAB)
    parts = _parts(model)
    assert parts["encoders.video.time"] == "video_temporal"
    assert parts["encoders.video.mixer.norm.weight"] == "video_temporal"
    assert parts["encoders.video.frame.pos"] == "video_frame_encoder"
    assert parts["encoders.video.frame.proj.weight"] == "projectors"  # as an image encoder's
    assert parts["encoders.image.pos"] == "image_encoder"
    video = {c for n, c in parts.items() if n.startswith("encoders.video.")}
    assert video == {"video_temporal", "video_frame_encoder", "projectors"}
    summary = trainable_summary(model)
    assert summary["video_frame_encoder"]["total"] > 0 < summary["video_temporal"]["total"]


@pytest.mark.parametrize(("freeze", "frozen"), [
    ("video_encoder", {"video_frame_encoder", "video_temporal"}),
    ("video_frame_encoder", {"video_frame_encoder"}),
    ("video_temporal", {"video_temporal"}),
    ("image_encoder", {"image_encoder"}),  # the image modality's encoder only, not the frames'
])
def test_freeze_stops_exactly_the_named_parts_from_training(freeze, frozen):
    cfg = tiny_config(*VIDEO, f"model.freeze=[{freeze}]", "model.modality_dropout=0")
    torch.manual_seed(0)
    model = build_model(cfg, VOCAB)
    for name, p in model.named_parameters():
        assert p.requires_grad == (component_of(name) not in frozen), name
    summary = trainable_summary(model)
    assert all(summary[c]["trainable"] == 0 < summary[c]["total"] for c in frozen)
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    opt = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.1)
    model(make_batch(cfg, 4))["loss"].backward()
    opt.step()
    for name, p in model.named_parameters():
        moved = not torch.equal(p.detach(), before[name])
        if component_of(name) in frozen:
            assert not moved, name
    assert any(not torch.equal(p.detach(), before[n]) for n, p in model.named_parameters()
               if n.startswith("encoders.video.") and component_of(n) not in frozen)


def test_freeze_names_a_video_part_the_model_lacks_with_the_reason():
    with pytest.raises(ConfigError, match=r"model.freeze: 'video_temporal' has no parameters "
                                          r"with model.video_temporal=mean"):
        tiny_config(*VIDEO, "model.video_temporal=mean", "model.freeze=[video_temporal]")
    with pytest.raises(ConfigError, match=r"'image_encoder' is not part of this model.*"
                                          r"video_frame_encoder"):
        tiny_config("model.modalities=[text,video]", "model.task=classify",
                    "model.freeze=[image_encoder]")
    with pytest.raises(ConfigError, match=r"'video_encoder' is not part of this model"):
        tiny_config("model.freeze=[video_encoder]")


@pytest.mark.parametrize("temporal", ["mean", "transformer", "tokens"])
@pytest.mark.parametrize("stage", ["early", "mid", "late"])
def test_parameter_count_covers_the_video_encoder(temporal, stage):
    cfg = tiny_config(*VIDEO, f"model.video_temporal={temporal}", f"model.fusion_stage={stage}",
                      "model.fusion=concat", "model.aux_classes={video: 4}")
    assert count_parameters(build_model(cfg, VOCAB)) == parameter_count(cfg, VOCAB)


@pytest.mark.parametrize("overrides", [
    ["model.video_temporal=transformer", "model.fusion=transformer"],
    ["model.video_temporal=tokens", "model.fusion=transformer",
     "model.modality_tokens={video: 8}"],  # pooled to 8 of its 3 x 16 tokens before fusion
    ["model.video_temporal=mean", "model.fusion_stage=early", "model.fusion=attention"],
])
def test_video_flops_match_the_flop_counter(overrides):
    cfg = tiny_config(*VIDEO, "model.text_encoder=bert", *overrides)
    torch.manual_seed(0)
    model = build_model(cfg, VOCAB)
    batch = make_batch(cfg, 2)
    with FlopCounterMode(display=False) as fwd:
        model(batch)
    with FlopCounterMode(display=False) as train:
        model(batch)["loss"].backward()
    assert forward_flops_per_sample(cfg, VOCAB) == pytest.approx(fwd.get_total_flops() / 2,
                                                                 rel=0.02)
    assert flops_per_sample(cfg, VOCAB) == pytest.approx(train.get_total_flops() / 2, rel=0.10)
    # the frames are counted: K frames cost about K times one
    one = cfg.override({"data.video_frames": 1})
    assert forward_flops_per_sample(cfg, VOCAB) > forward_flops_per_sample(one, VOCAB)
