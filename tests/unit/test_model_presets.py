"""Every shipped preset builds at tiny size and trains a step, here and inside a Ray task."""

import pytest
import torch

from mmdist.config import list_presets, load_config
from mmdist.models import build_model
from tests.conftest import pretrained_overrides
from tests.unit.synthetic_mm import VOCAB, make_batch

REF_PRESETS = ["ref_transformer_fusion", "ref_crossmodal_lm", "ref_itm_resnet_bert",
               "ref_cnn_lstm_weighted", "ref_multitask_mmlm", "ref_mmt",
               "ref_video_summary"]
# tiny inputs for speed (32 px suits every image encoder: vit patch 16, resnet stride 32)
TINY = ["model.size=tiny", "data.max_text_len=16", "data.n_mels=16", "data.audio_seconds=0.5",
        "data.image_size=32"]


def build_and_step(name: str, dirs: dict) -> float:
    torch.manual_seed(0)
    cfg = load_config(name, [*TINY, *pretrained_overrides(name, dirs)])
    model = build_model(cfg, VOCAB)
    loss = model(make_batch(cfg, 4))["loss"]
    loss.backward()
    return float(loss.detach())


def test_reference_presets_ship():
    assert set(REF_PRESETS) <= set(list_presets())


@pytest.mark.parametrize("name", sorted(set(list_presets()) | set(REF_PRESETS)))
def test_preset_builds_at_tiny_size(name, pretrained_dirs):
    assert torch.isfinite(torch.tensor(build_and_step(name, pretrained_dirs)))


def test_presets_build_inside_a_ray_task(ray_local, pretrained_dirs):
    ray = ray_local

    @ray.remote(num_cpus=1)
    def remote_build(names: list[str], dirs: dict) -> list[float]:
        from tests.unit.test_model_presets import build_and_step

        return [build_and_step(n, dirs) for n in names]

    names = sorted(set(list_presets()) | set(REF_PRESETS))
    losses = ray.get(remote_build.remote(names, pretrained_dirs), timeout=600)
    assert len(losses) == len(names) and all(loss == loss for loss in losses)
