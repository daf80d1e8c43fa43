"""Save/load, pickle refusal, local pretrained weights, missing modalities, inference API,
metrics."""

import pickle

import pytest
import torch

from mmdist.data.schema import EOS_ID, SPECIAL_TOKENS
from mmdist.models import build_model, load_model, save_model
from mmdist.models.metrics import corpus_bleu, retrieval_metrics
from mmdist.models.model_files import save_state_dict
from mmdist.tasks import compute_metrics
from tests.unit.synthetic_mm import VOCAB, make_batch, tiny_config


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


def _model(*overrides):
    torch.manual_seed(0)
    cfg = tiny_config(*overrides)
    return cfg, build_model(cfg, VOCAB).eval()


@pytest.mark.parametrize("overrides", [
    ["model.task=multitask", "model.task_weights={itm: 1, contrastive: 1, classify: 1, lm: 1}",
     "model.text_encoder=bert", "model.fusion=transformer"],
    ["model.task=lm", "model.decoder=llama", "model.fusion=recurrent"],
])
def test_save_load_gives_identical_outputs(tmp_path, overrides):
    cfg, model = _model(*overrides)
    batch = make_batch(cfg, 4)
    tok = tmp_path / "tok"
    tok.mkdir()
    (tok / "tokenizer.json").write_text("{}")
    save_model(model, tmp_path / "m", tokenizer_dir=tok)
    assert sorted(p.name for p in (tmp_path / "m").iterdir()) == [
        "config.json", "model.safetensors", "tokenizer"]
    loaded = load_model(tmp_path / "m").eval()
    assert loaded.config == cfg.to_dict() and loaded.vocab["vocab_size"] == VOCAB
    with torch.no_grad():
        a, b = model.eval_outputs(batch), loaded.eval_outputs(batch)
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), k


def test_consolidated_state_dict_round_trip(tmp_path):
    # what the trainer does after ZeRO: named_parameters (tied weights once) + all buffers
    cfg, model = _model("model.task=lm")
    state = {n: p.detach().clone() for n, p in model.named_parameters()}
    state.update({n: b.clone() for n, b in model.named_buffers()})
    save_state_dict(state, cfg, model.vocab, tmp_path)
    loaded = load_model(tmp_path).eval()
    batch = make_batch(cfg, 3)
    with torch.no_grad():
        assert torch.equal(model.generate(batch, 5), loaded.generate(batch, 5))


class _Plant:
    """Unpickling this creates a marker file (as a malicious pickle would run code)."""

    def __init__(self, marker):
        self.marker = str(marker)

    def __reduce__(self):
        return (open, (self.marker, "w"))


@pytest.mark.parametrize("name", ["model.safetensors", "pytorch_model.bin"])
def test_pickled_weights_are_refused_without_unpickling(tmp_path, name):
    cfg, model = _model()
    save_model(model, tmp_path)
    (tmp_path / "model.safetensors").unlink()
    marker = tmp_path / "PWNED"
    (tmp_path / name).write_bytes(pickle.dumps({"w": _Plant(marker)}))
    with pytest.raises(ValueError, match="never unpickle"):
        load_model(tmp_path)
    assert not marker.exists()
    # torch.save's zip format is refused too
    (tmp_path / name).unlink()
    torch.save({"w": torch.zeros(1)}, tmp_path / "model.safetensors")
    with pytest.raises(ValueError, match="never unpickle"):
        load_model(tmp_path)


def test_missing_modality_works_and_changes_the_output():
    cfg, model = _model("model.task=classify")
    full = make_batch(cfg, 4)
    no_audio = make_batch(cfg, 4, has={"audio": False})
    only_image = make_batch(cfg, 4, has={"text": False, "audio": False})
    with torch.no_grad():
        p_full = model.predict(full)["probs"]
        p_no_audio = model.predict(no_audio)["probs"]
        p_img = model.predict(only_image)["probs"]
    assert torch.isfinite(p_no_audio).all() and torch.isfinite(p_img).all()
    assert not torch.allclose(p_full, p_no_audio)
    assert not torch.allclose(p_no_audio, p_img)
    # per sample: a mixed batch equals the per-sample results
    mixed = {k: v.clone() for k, v in full.items()}
    mixed["has_audio"][1] = False
    mixed["audio"][1] = 0
    with torch.no_grad():
        p_mixed = model.predict(mixed)["probs"]
    torch.testing.assert_close(p_mixed[1], p_no_audio[1])
    torch.testing.assert_close(p_mixed[0], p_full[0])


def test_modality_dropout_only_in_training():
    cfg, model = _model("model.modality_dropout=0.5")
    batch = make_batch(cfg, 8)
    with torch.no_grad():
        assert torch.equal(model(batch)["loss"], model(batch)["loss"])  # eval: deterministic
        model.train()
        torch.manual_seed(1)
        a = model(batch)["loss"]
        b = model(batch)["loss"]
    assert not torch.equal(a, b)


def test_predict_generate_and_beam_search():
    cfg, model = _model("model.task=lm")
    batch = make_batch(cfg, 3)
    greedy = model.generate(batch, max_new_tokens=6)
    beam = model.generate(batch, max_new_tokens=6, num_beams=3)
    assert greedy.shape == beam.shape == (3, 6) and greedy.dtype == torch.long
    assert torch.equal(model.predict(batch, max_new_tokens=6)["tokens"], greedy)
    # after EOS only PAD
    for row in torch.cat([greedy, beam]).tolist():
        if 3 in row:
            assert all(t == 0 for t in row[row.index(3) + 1:])
    # beam search scores at least as well as greedy under the model
    for ids in (greedy, beam):
        assert ids.min() >= 0 and ids.max() < VOCAB
    cfg, itm = _model()
    score = itm.predict(make_batch(cfg, 3))["score"]
    assert score.shape == (3,) and ((score > 0) & (score < 1)).all()


def test_eval_outputs_are_per_sample_and_metrics_cover_every_task():
    cfg, model = _model("model.task=multitask",
                        "model.task_weights={itm: 1, contrastive: 1, classify: 1, lm: 1}")
    with torch.no_grad():
        parts = [model.eval_outputs(make_batch(cfg, n, seed=s)) for s, n in ((0, 4), (1, 3))]
    merged = {k: torch.cat([p[k] for p in parts]) for k in parts[0]}
    assert all(v.shape[0] == 7 for v in merged.values())
    m = compute_metrics(cfg, merged, model.vocab)
    for key in ("val_loss", "val_itm_accuracy", "val_contrastive_r1_mean",
                "val_contrastive_r10_i2t", "val_classify_accuracy", "val_lm_perplexity",
                "val_lm_bleu"):
        assert key in m, sorted(m)
    single = {k: v for k, v in merged.items() if k.startswith("itm.")}
    single["loss"] = merged["loss"]
    # image and audio both swapped for a negative: also one hard negative per modality
    assert set(compute_metrics(tiny_config(), single, model.vocab)) == {
        "val_loss", "val_accuracy", "val_hard_accuracy"}
    # vqa both ways
    for answer, key in (("generate", "val_accuracy"), ("classify", "val_accuracy")):
        cfg, vqa = _model("model.task=vqa", f"model.vqa_answer={answer}")
        with torch.no_grad():
            assert key in compute_metrics(cfg, vqa.eval_outputs(make_batch(cfg, 3)), vqa.vocab)


def test_metric_functions():
    e = torch.eye(4)
    r = retrieval_metrics(e, e)
    assert r["val_r1_t2i"] == r["val_r1_i2t"] == r["val_r1_mean"] == 1.0
    r = retrieval_metrics(e, e[[1, 0, 2, 3]])
    assert r["val_r1_t2i"] == 0.5 and r["val_r5_t2i"] == 1.0
    ids = torch.tensor([[2, 10, 11, 12, 13, 3, 0]])
    assert corpus_bleu(ids[:, 1:], ids, EOS_ID, range(len(SPECIAL_TOKENS))) == pytest.approx(1.0)
    assert corpus_bleu(torch.tensor([[20, 21, 3]]), ids, EOS_ID, range(len(SPECIAL_TOKENS))) == 0.0


def test_bert_from_a_local_pretrained_directory(tmp_path):
    from transformers import BertConfig, BertModel

    torch.manual_seed(0)
    bert = BertModel(BertConfig(vocab_size=VOCAB, hidden_size=24, num_hidden_layers=1,
                                num_attention_heads=2, intermediate_size=48),
                     add_pooling_layer=False)
    bert.save_pretrained(tmp_path / "bert")
    cfg = tiny_config("model.text_encoder=bert", f"model.text_pretrained={tmp_path / 'bert'}")
    model = build_model(cfg, VOCAB)
    loaded = model.encoders["text"].backbone  # any AutoModel encoder (HFTextEncoder)
    assert loaded.config.hidden_size == 24
    torch.testing.assert_close(loaded.embeddings.word_embeddings.weight,
                               bert.embeddings.word_embeddings.weight)
    # the saved model rebuilds without the pretrained directory
    save_model(model, tmp_path / "m")
    (tmp_path / "bert" / "model.safetensors").unlink()
    again = load_model(tmp_path / "m")
    torch.testing.assert_close(again.encoders["text"].backbone.embeddings.word_embeddings.weight,
                               bert.embeddings.word_embeddings.weight)
    # models saved before (their BERT's config as extra["bert_config"]) keep their encoder
    old = build_model(cfg, VOCAB, extra={"bert_config": bert.config.to_dict()},
                      load_pretrained=False)
    assert type(old.encoders["text"]).__name__ == "BertTextEncoder"


def test_torchvision_weights_from_a_local_safetensors_file(tmp_path):
    import torchvision
    from safetensors.torch import save_file

    torch.manual_seed(0)
    net = torchvision.models.resnet18(weights=None)
    save_file({k: v.contiguous() for k, v in net.state_dict().items()}, tmp_path / "r18.safetensors")
    cfg = tiny_config("model.image_encoder=resnet18",
                      f"model.image_pretrained={tmp_path / 'r18.safetensors'}")
    model = build_model(cfg, VOCAB)
    torch.testing.assert_close(model.encoders["image"].resnet.conv1.weight, net.conv1.weight)
    bad = tmp_path / "r18.pt"
    torch.save(net.state_dict(), bad)
    with pytest.raises(ValueError, match="never loads pickled"):
        build_model(tiny_config("model.image_encoder=resnet18", f"model.image_pretrained={bad}"),
                    VOCAB)


@pytest.mark.parametrize("task", ["model.task=itm", "model.task=lm"])
def test_models_saved_before_tasks_were_modules_still_load(tmp_path, task):
    """Format 1 (wave 1's registered models) kept heads under ``heads.<task>.`` and the decoder
    under ``decoder.``; loading maps them to the task modules."""
    import json

    from mmdist.models.model_files import legacy_architecture

    cfg, model = _model(task, "model.align_weight=0")
    model = legacy_architecture(model)  # the architecture format-1 files hold
    state = {k.replace("tasks.itm.head.", "heads.itm.").replace("tasks.lm.decoder.", "decoder."): v
             for k, v in model.state_dict().items()}
    save_state_dict(state, cfg, model.vocab, tmp_path)
    meta = json.loads((tmp_path / "config.json").read_text())
    meta["format"] = "mmdist-fused-model/1"
    del meta["vocab"]["special_ids"]
    (tmp_path / "config.json").write_text(json.dumps(meta))
    loaded = load_model(tmp_path).eval()
    batch = make_batch(cfg, 3)
    with torch.no_grad():
        a, b = model.eval_outputs(batch), loaded.eval_outputs(batch)
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_modality_dropout_never_removes_the_last_non_text_modality():
    cfg, model = _model("model.modality_dropout=0.9")
    model.train()
    batch = make_batch(cfg, 64)
    batch["has_audio"][:16] = False  # these rows have only the image besides the text
    torch.manual_seed(0)
    present = model.present(batch)
    both = batch["has_image"] & batch["has_audio"]
    assert (present["image"] | present["audio"])[batch["has_image"] | batch["has_audio"]].all()
    assert present["image"][:16].equal(batch["has_image"][:16])  # never dropped: the last one
    assert (~present["image"][both]).any() and (~present["audio"][both]).any()  # dropout acts
    assert present["text"].equal(batch["has_text"])


@pytest.mark.parametrize("overrides", [
    ("model.fusion_stage=mid", "model.fusion=attention"),
    ("model.fusion_stage=early", "model.fusion=transformer"),
    ("model.fusion_stage=late", "model.fusion=mul"),
])
def test_models_saved_before_format_3_load_with_their_architecture(tmp_path, overrides):
    """A format-2 file (no QK-norm, residual convs, CNN positions, late-fusion norm, ITM
    alignment heads) loads into the architecture it was trained with, predicts as it did, and
    keeps that architecture when saved again."""
    import json

    from mmdist.models.model_files import legacy_architecture

    torch.manual_seed(0)
    cfg = tiny_config(*overrides, "model.align_weight=0")
    old = legacy_architecture(build_model(cfg, VOCAB)).eval()
    assert not any(".q_norm." in k or ".features.3.conv" in k for k in old.state_dict())
    save_state_dict(old.state_dict(), cfg, old.vocab, tmp_path / "v2", extra={})
    meta = json.loads((tmp_path / "v2" / "config.json").read_text())
    meta["format"] = "mmdist-fused-model/2"
    del meta["config"]["model"]["align_weight"]  # format 2 had no such key
    (tmp_path / "v2" / "config.json").write_text(json.dumps(meta))

    loaded = load_model(tmp_path / "v2").eval()
    batch = make_batch(cfg, 3)
    with torch.no_grad():
        a, b = old.eval_outputs(batch), loaded.eval_outputs(batch)
    assert all(torch.equal(a[k], b[k]) for k in a)
    save_model(loaded, tmp_path / "again")
    again = load_model(tmp_path / "again").eval()
    with torch.no_grad():
        assert torch.equal(again.eval_outputs(batch)["loss"], a["loss"])
    with pytest.raises(ValueError, match="do not fit"):  # the new architecture does not take it
        from safetensors.torch import load_file

        from mmdist.models.model_files import load_weights
        load_weights(build_model(cfg, VOCAB), load_file(str(tmp_path / "v2" / "model.safetensors")))
