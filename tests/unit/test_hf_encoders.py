"""Pretrained Hugging Face encoders from local directories (mmdist.models.hf_encoders) and their
audio features (mmdist.data.hf_audio): tiny random models saved with save_pretrained, loaded
back through load_backbone + the wrappers; weights, shapes, rebuilds without files, errors."""

import json
import os
import pickle
import re
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

os.environ["HF_HUB_OFFLINE"] = "1"  # never the hub, whatever the caller's environment

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from mmdist.data.hf_audio import AudioFeatures, feature_kind, feature_shape
from mmdist.data.image_processor import image_processor_facts
from mmdist.models.hf_encoders import (
    HFAudioEncoder,
    HFImageEncoder,
    HFTextEncoder,
    audio_kind,
    backbone_config,
    load_backbone,
)
from tests.tiny_hf import AUDIO, IMAGE, MEAN, MODELS, STD, TEXT, TINY  # noqa: F401

ROOT = Path(__file__).resolve().parents[2]
DIM = 12


@pytest.fixture(autouse=True)
def _offline(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    """name -> directory of that tiny model, saved on first use."""
    root = tmp_path_factory.mktemp("hf")
    dirs: dict[str, Path] = {}

    def get(name: str) -> Path:
        if name not in dirs:
            d = root / name
            torch.manual_seed(0)
            MODELS[name][0](d)
            dirs[name] = d
        return dirs[name]

    return get


@pytest.fixture(scope="module")
def loaded(saved):
    """name -> (directory, backbone loaded through load_backbone), loaded once."""
    cache: dict[str, tuple[Path, torch.nn.Module]] = {}

    def get(name: str):
        if name not in cache:
            d = saved(name)
            cache[name] = d, load_backbone(str(d), MODELS[name][1])
        return cache[name]

    return get


# transformers 5 renames some modules in memory and writes the published names back on save;
# both sides are brought to one spelling (written out here, not taken from transformers)
_SPELLING = [
    (r"^encoder\.layer\.(\d+)\.", r"layers.\1."),
    (r"attention\.attention\.query\.", "attention.q_proj."),
    (r"attention\.attention\.key\.", "attention.k_proj."),
    (r"attention\.attention\.value\.", "attention.v_proj."),
    (r"attention\.output\.dense\.", "attention.o_proj."),
    (r"intermediate\.dense\.", "mlp.fc1."),
    (r"^layers\.(\d+)\.output\.dense\.", r"layers.\1.mlp.fc2."),
    (r"parametrizations\.weight\.original0$", "weight_g"),  # weight norm (wav2vec2 pos conv)
    (r"parametrizations\.weight\.original1$", "weight_v"),
]


def _spelling(key: str) -> str:
    for pattern, repl in _SPELLING:
        key = re.sub(pattern, repl, key)
    return key


def _saved_tensors(path: Path, prefix: str) -> dict[str, torch.Tensor]:
    """The saved file's tensors under the backbone's key spelling, ``prefix`` stripped."""
    out = {}
    for k, v in load_file(str(path)).items():
        if k.startswith(prefix):
            name = _spelling(k[len(prefix):])
            assert name not in out, name
            out[name] = v
    return out


# ---- (a) weights, (c) rebuild without files -------------------------------------------------


@pytest.mark.parametrize("name", list(MODELS))
def test_weights_load_and_rebuild_without_files(name, loaded):
    d, backbone = loaded(name)
    prefix = MODELS[name][2]
    saved_state = _saved_tensors(d / "model.safetensors", prefix)
    state = backbone.state_dict()
    assert state, name
    for key, value in state.items():
        assert _spelling(key) in saved_state, f"{key} not in the saved file"
        ref = saved_state[_spelling(key)]
        assert value.dtype == torch.float32, key
        torch.testing.assert_close(value, ref.to(value.dtype), rtol=0, atol=0, msg=key)

    config = json.loads(json.dumps(backbone_config(backbone)))  # what a model file keeps
    rebuilt = load_backbone(str(d / "not-there"), MODELS[name][1], config=config)
    assert type(rebuilt) is type(backbone)
    assert {k: v.shape for k, v in rebuilt.state_dict().items()} == {
        k: v.shape for k, v in state.items()}


def test_the_right_towers_are_taken(loaded):
    assert type(loaded("clip")[1]).__name__ == "CLIPVisionModel"  # from a whole CLIPModel
    assert type(loaded("whisper")[1]).__name__ == "WhisperEncoder"
    assert type(loaded("siglip_full")[1]).__name__ == "SiglipVisionModel"
    for name in ("siglip", "siglip_full"):  # the pooling head is not used: not loaded
        assert not any(k.startswith("head.") for k in loaded(name)[1].state_dict())
    assert not any("pooler" in k for n in ("vit", "bert", "roberta")
                   for k in loaded(n)[1].state_dict())


# ---- (b) wrappers: shapes, masks, children --------------------------------------------------


def _contract(module: torch.nn.Module, tokens: torch.Tensor, mask: torch.Tensor, b: int) -> None:
    assert [n for n, _ in module.named_children()] == ["backbone", "proj"]
    assert all(k.startswith(("backbone.", "proj.")) for k in module.state_dict())
    assert tokens.dtype == torch.float32 and tokens.dim() == 3
    assert tokens.shape[0] == b and tokens.shape[2] == DIM
    assert mask.dtype == torch.bool and mask.shape == tokens.shape[:2]
    assert torch.isfinite(tokens).all()


@pytest.mark.parametrize("name", IMAGE)
def test_image_encoders(name, loaded):
    d, backbone = loaded(name)
    facts = image_processor_facts(str(d))
    enc = HFImageEncoder(backbone, DIM, facts["mean"], facts["std"]).eval()
    images = torch.randint(0, 256, (2, 3, facts["size"], facts["size"]), dtype=torch.uint8)
    with torch.no_grad():
        tokens, mask = enc(images)
    _contract(enc, tokens, mask, 2)
    grid = (32 // 8) ** 2
    assert tokens.shape[1] == (grid if name.startswith("siglip") else grid + 1)  # + class token
    assert mask.all()
    assert not any("mean" in k or "std" in k for k in enc.state_dict())


@pytest.mark.parametrize("name", ["clip", "vit"])
def test_image_encoders_take_other_sizes(name, loaded):
    d, backbone = loaded(name)
    facts = image_processor_facts(str(d))
    enc = HFImageEncoder(backbone, DIM, facts["mean"], facts["std"]).eval()
    with torch.no_grad():
        tokens, _ = enc(torch.randint(0, 256, (1, 3, 48, 48), dtype=torch.uint8))
    assert tokens.shape[1] == (48 // 8) ** 2 + 1


@pytest.mark.parametrize("name", TEXT)
def test_text_encoders(name, loaded):
    _, backbone = loaded(name)
    enc = HFTextEncoder(backbone, DIM).eval()
    ids = torch.randint(3, 64, (2, 7))
    attn = torch.tensor([[1] * 7, [1] * 4 + [0] * 3])
    with torch.no_grad():
        tokens, mask = enc(ids, attn)
    _contract(enc, tokens, mask, 2)
    assert tokens.shape[1] == 7 and mask.tolist() == attn.bool().tolist()


# ---- (d) image processor facts -------------------------------------------------------------


def test_image_processor_facts(saved, tmp_path):
    assert image_processor_facts(str(saved("clip"))) == {"size": 32, "mean": MEAN, "std": STD}
    assert image_processor_facts(str(saved("siglip"))) == {"size": 32, "mean": [0.5] * 3,
                                                           "std": [0.5] * 3}
    assert image_processor_facts(str(saved("vit")))["mean"] == MEAN
    assert image_processor_facts(str(saved("dinov2")))["size"] == 32  # the crop, not 40

    # an int size, no crop; a processor nested in processor_config.json; no processor at all
    plain = tmp_path / "plain"
    plain.mkdir()
    (plain / "preprocessor_config.json").write_text(json.dumps(
        {"size": 24, "image_mean": MEAN, "image_std": STD}))
    assert image_processor_facts(str(plain)) == {"size": 24, "mean": MEAN, "std": STD}
    nested = tmp_path / "nested"
    nested.mkdir()
    (nested / "processor_config.json").write_text(json.dumps({"image_processor": {
        "size": {"shortest_edge": 20}, "do_center_crop": False, "crop_size": {"height": 9,
                                                                              "width": 9}}}))
    assert image_processor_facts(str(nested))["size"] == 20
    bare = tmp_path / "bare"
    bare.mkdir()
    shutil.copy(saved("clip") / "config.json", bare / "config.json")
    facts = image_processor_facts(str(bare))  # vision_config.image_size + ImageNet mean/std
    assert facts["size"] == 32 and facts["mean"] == pytest.approx([0.485, 0.456, 0.406])
    (plain / "preprocessor_config.json").write_text(json.dumps({"size": {"height": 24,
                                                                         "width": 32}}))
    with pytest.raises(ValueError, match="square"):
        image_processor_facts(str(plain))


# ---- (e) audio features into the audio encoders ---------------------------------------------

SHAPES = {"whisper": (16, 100), "whisper_generation": (16, 100), "wav2vec2": (16000,),
          "hubert": (16000,), "wavlm": (16000,), "ast": (48, 32)}


@pytest.mark.parametrize("name", AUDIO)
def test_audio_features_feed_the_audio_encoders(name, loaded):
    d, backbone = loaded(name)
    kind = audio_kind(str(d))
    assert kind == feature_kind(d) == audio_kind(backbone.config) == audio_kind(
        backbone_config(backbone))
    features = AudioFeatures(str(d), sample_rate=16000)
    assert features.sampling_rate == 16000
    waves = (np.random.default_rng(0).standard_normal((2, 16000)) * 0.1).astype(np.float32)
    x = features(waves)
    assert x.dtype == np.float32 and x.shape == (2, *SHAPES[name])
    assert feature_shape(str(d), 16000) == SHAPES[name]
    if name == "wav2vec2":  # do_normalize: zero mean, unit variance per clip
        assert np.allclose(x.mean(1), 0, atol=1e-3) and np.allclose(x.std(1), 1, atol=1e-2)

    enc = HFAudioEncoder(backbone, DIM, kind).eval()
    with torch.no_grad():
        tokens, mask = enc(torch.from_numpy(x))
    _contract(enc, tokens, mask, 2)
    if kind == "log_mel":
        assert tokens.shape[1] == 50 and mask.all()
    else:
        assert mask.all()

    again = pickle.loads(pickle.dumps(features))  # only the path travels; loads on first call
    assert again._extractor is None
    np.testing.assert_array_equal(again(waves), x)


def test_whisper_pads_short_clips_and_masks_the_padding(loaded):
    d, backbone = loaded("whisper")
    features = AudioFeatures(str(d))
    waves = (np.random.default_rng(1).standard_normal((2, 8000)) * 0.1).astype(np.float32)
    x = features(waves)
    assert x.shape == (2, 16, 50) == (2, *feature_shape(str(d), 8000))
    enc = HFAudioEncoder(backbone, DIM, "log_mel").eval()
    with torch.no_grad():
        tokens, mask = enc(torch.from_numpy(x))
        assert tokens.shape == (2, 50, DIM)
        assert mask.sum(1).tolist() == [25, 25] and mask[:, :25].all()
        odd, odd_mask = enc(torch.from_numpy(x[..., :49]))  # ceil(49 / 2) real tokens
        assert odd_mask.sum(1).tolist() == [25, 25]
        long, long_mask = enc(torch.from_numpy(np.concatenate([x, x, x], -1)))  # cut to 100
        assert long.shape == (2, 50, DIM) and long_mask.all()
        # padding is each clip's minimum (silence): same as padding by hand
        pad = torch.from_numpy(x).amin(dim=(1, 2), keepdim=True).expand(2, 16, 50)
        by_hand, _ = enc(torch.cat([torch.from_numpy(x), pad], -1))
    torch.testing.assert_close(tokens, by_hand)
    with pytest.raises(ValueError, match="16"):
        enc(torch.zeros(2, 8, 100))


def test_audio_sample_rate_must_match(saved):
    with pytest.raises(ValueError, match=r"data\.sample_rate=22050"):
        AudioFeatures(str(saved("wav2vec2")), sample_rate=22050)


def test_audio_kind_must_fit_the_model(loaded):
    with pytest.raises(ValueError, match="log_mel"):
        HFAudioEncoder(loaded("whisper")[1], DIM, "waveform")
    with pytest.raises(ValueError, match="audio"):
        HFAudioEncoder(loaded("bert")[1], DIM, "waveform")
    with pytest.raises(ValueError, match="not an audio encoder"):
        audio_kind({"model_type": "bert"})


# ---- (f) errors -----------------------------------------------------------------------------


def test_pickled_weights_are_refused(saved, tmp_path):
    d = tmp_path / "bin_only"
    d.mkdir()
    shutil.copy(saved("bert") / "config.json", d / "config.json")
    (d / "pytorch_model.bin").write_bytes(b"never read")
    with pytest.raises(ValueError, match=r"model\.text_pretrained=.*never unpickles"):
        load_backbone(str(d), "model.text_pretrained")


def test_weights_of_another_architecture_are_refused(saved, tmp_path):
    shutil.copy(saved("vit") / "model.safetensors", tmp_path / "model.safetensors")
    shutil.copy(saved("dinov2") / "config.json", tmp_path / "config.json")
    with pytest.raises(ValueError, match=r"model\.image_pretrained=.*do not fit Dinov2Model"):
        load_backbone(str(tmp_path), "model.image_pretrained")


def test_load_errors_name_the_key_and_path(tmp_path):
    with pytest.raises(FileNotFoundError, match=r"model\.image_pretrained=.*not a directory"):
        load_backbone(str(tmp_path / "nope"), "model.image_pretrained")
    with pytest.raises(FileNotFoundError, match=r"model\.image_pretrained=.*no config\.json"):
        load_backbone(str(tmp_path), "model.image_pretrained")
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "gpt2"}))
    with pytest.raises(ValueError, match=r"model\.text_pretrained=.*'gpt2'.*bert.*whisper"):
        load_backbone(str(tmp_path), "model.text_pretrained")
    with pytest.raises(ValueError, match=r"model\.audio_pretrained=.*'gpt2'"):
        load_backbone(str(tmp_path), "model.audio_pretrained", config={"model_type": "gpt2"})
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "bert"}))
    with pytest.raises(FileNotFoundError, match="no model.safetensors"):
        load_backbone(str(tmp_path), "model.text_pretrained")


def test_imports_stay_light():
    code = textwrap.dedent('''
        import sys
        import mmdist.data.hf_audio
        print("DATA", sorted(m for m in ("torch", "transformers") if m in sys.modules))
        import mmdist.models.hf_encoders
        print("MODELS", "transformers" in sys.modules)
    ''')
    r = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True,
                       timeout=120)
    assert r.returncode == 0, r.stderr[-3000:]
    assert "DATA []" in r.stdout and "MODELS False" in r.stdout, r.stdout
