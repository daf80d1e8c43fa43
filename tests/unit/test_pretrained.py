"""A pretrained causal LM fused in (``model.decoder_pretrained``), loaded from directories that
tiny random models were saved to with ``save_pretrained`` (Llama, GPT-2 and Qwen2 layouts):
weights load exactly, its tokenizer is the run's, frozen parts do not move, LoRA adds what it
should and merges to the same function, generation goes through the LM's ``generate``, and a
second stage starts where the first ended."""

from __future__ import annotations

import os

import pytest
import torch
from safetensors.torch import load_file

from mmdist.bench.process_group import single_process_group
from mmdist.config import load_config
from mmdist.data.schema import audio_frames, random_batch
from mmdist.data.tokenizer import TextTokenizer
from mmdist.models.adapt import component_of, lora_layers, merge_lora, trainable_summary
from mmdist.models.builder import build_model
from mmdist.models.model_files import init_weights, load_model, load_weights, save_state_dict
from mmdist.tasks import build_metrics
from mmdist.train.engine import build_engine
from tests.tiny_hf import tiny_lm

os.environ["HF_HUB_OFFLINE"] = "1"

ARCHS = ("llama", "gpt2", "qwen2")
SMALL = ["model.size=tiny", "data.max_text_len=12", "data.image_size=32", "data.n_mels=16",
         "data.audio_seconds=0.25", "train.num_workers=1", "train.micro_batch_size=4",
         "train.warmup_steps=0"]


@pytest.fixture(scope="module")
def lm_dirs(tmp_path_factory):
    root = tmp_path_factory.mktemp("lms")
    return {a: tiny_lm(root / a, a) for a in ARCHS}


def cfg_for(lm_dir, *overrides):
    return load_config("tiny", [*SMALL, "model.task=prompted",
                                f"model.decoder_pretrained={lm_dir}", *overrides])


def batch_for(cfg, tok, n=4, seed=0):
    d = cfg.data
    b = random_batch(n, tok.vocab_size, d.max_text_len, d.image_size, d.n_mels,
                     audio_frames(d.sample_rate, d.audio_seconds, d.hop_length), seed=seed)
    ids, mask = tok.encode_batch(["describe the image", "what shape is it", None, "a"][:n],
                                 d.max_text_len)
    tids, tmask = tok.encode_batch(["a red circle", "a blue square", "the digit is seven",
                                    "one two"][:n], d.max_text_len)
    b.update(input_ids=torch.from_numpy(ids), attention_mask=torch.from_numpy(mask),
             target_ids=torch.from_numpy(tids), target_mask=torch.from_numpy(tmask))
    b["has_text"] = b["attention_mask"].bool().any(1)
    return b


@pytest.mark.parametrize("arch", ARCHS)
def test_lm_weights_and_tokenizer_come_from_the_directory(lm_dirs, arch):
    cfg = cfg_for(lm_dirs[arch])
    assert cfg.tokenizer_path == str(lm_dirs[arch])  # the LM's tokenizer is the run's
    tok = TextTokenizer.load(cfg.tokenizer_path)
    model = build_model(cfg, **tok.model_vocab())
    saved = load_file(str(lm_dirs[arch] / "model.safetensors"))
    lm = model.tasks["prompted"].decoder.lm.state_dict()
    for k, v in saved.items():
        assert torch.equal(lm[k], v), k
    assert model.extra["decoder_config"]["model_type"] == arch


def test_a_missing_or_pickled_directory_is_a_clear_error(tmp_path, lm_dirs):
    with pytest.raises(FileNotFoundError, match="model.decoder_pretrained"):
        build_model(cfg_for(lm_dirs["llama"]).override(
            {"model.decoder_pretrained": str(tmp_path / "nope")}),
            vocab_size=200)
    (tmp_path / "pkl").mkdir()
    (tmp_path / "pkl" / "config.json").write_text("{}")
    (tmp_path / "pkl" / "pytorch_model.bin").write_bytes(b"x")
    with pytest.raises(ValueError, match="never unpickles"):
        build_model(cfg_for(tmp_path / "pkl"), vocab_size=200)


def test_prompted_needs_a_pretrained_lm():
    with pytest.raises(ValueError, match="model.decoder_pretrained is not set"):
        load_config("tiny", ["model.task=prompted"])


@pytest.mark.parametrize("arch", ("llama", "gpt2"))
def test_generation_is_the_lms_generate_and_matches_teacher_forcing(lm_dirs, arch):
    """Greedy ``generate`` (KV cache) writes what step-by-step argmax over the teacher-forced
    logits writes: the prompt, padding and memory are placed alike in both."""
    cfg = cfg_for(lm_dirs[arch])
    tok = TextTokenizer.load(cfg.tokenizer_path)
    torch.manual_seed(0)
    model = build_model(cfg, **tok.model_vocab()).eval()
    b = batch_for(cfg, tok)
    with torch.no_grad():
        got = model.generate(b, max_new_tokens=5)
        task = model.tasks["prompted"]
        memory, mask, _ = model.fuse("context", model.encode(b))
        ids = torch.full((4, 1), tok.bos_id)
        for _ in range(5):
            logits = task.decoder(ids, memory, mask, prompt=(b["input_ids"], b["attention_mask"]))
            ids = torch.cat([ids, logits[:, -1].argmax(-1, keepdim=True)], 1)
    want = ids[:, 1:]
    ended = (want == tok.eos_id).long().cumsum(1) - (want == tok.eos_id).long() > 0
    assert torch.equal(got, want.masked_fill(ended, tok.pad_id))
    assert model.generate(b, max_new_tokens=5, num_beams=3).shape == (4, 5)


def test_loss_is_on_the_answer_only(lm_dirs):
    """Changing the prompt changes the loss (it is read), but the prompt is never scored: the
    token count is the answer's."""
    cfg = cfg_for(lm_dirs["llama"])
    tok = TextTokenizer.load(cfg.tokenizer_path)
    model = build_model(cfg, **tok.model_vocab()).eval()
    b = batch_for(cfg, tok)
    with torch.no_grad():
        out = model(b, mode="eval")
        b2 = dict(b, input_ids=b["input_ids"].flip(0), attention_mask=b["attention_mask"].flip(0))
        out2 = model(b2, mode="eval")
    assert torch.equal(out["prompted.n_tokens"], b["target_mask"][:, 1:].sum(1).float())
    assert not torch.allclose(out["loss"], out2["loss"])


def test_bleu_scores_the_lms_decoded_words(lm_dirs):
    cfg = cfg_for(lm_dirs["gpt2"])
    tok = TextTokenizer.load(cfg.tokenizer_path)
    metrics = build_metrics(cfg, tok.model_vocab(), tok)
    ref, _ = tok.encode_batch(["a red circle on white"], 40)
    hyp, _ = tok.encode_batch(["a red circle on white"], 40)
    other, _ = tok.encode_batch(["describe the image"], 40)
    def run(h):
        m = build_metrics(cfg, tok.model_vocab(), tok)
        m.update({"loss": torch.ones(1), "prompted.nll_sum": torch.ones(1), "prompted.n_tokens": torch.ones(1),
                  "prompted.exact_match": torch.ones(1),
                  "prompted.generated": torch.from_numpy(h[:, 1:]),
                  "prompted.target": torch.from_numpy(ref[:, 1:])})
        return m.compute()["val_bleu"]
    assert run(hyp) == pytest.approx(1.0)
    assert run(other) < 0.2
    assert metrics.tasks["prompted"].bleu.words is not None
    ids = tok.tokenizer.encode("a red circle on white", add_special_tokens=False).ids
    assert len(ids) > 5  # subwords of the byte-level BPE; BLEU counts the 5 words
    assert tok.words(ids) == ["a", "red", "circle", "on", "white"]


def test_freeze_names_every_parameter_once(lm_dirs):
    cfg = cfg_for(lm_dirs["llama"], "model.freeze=[image_encoder,audio_encoder,decoder]")
    tok = TextTokenizer.load(cfg.tokenizer_path)
    model = build_model(cfg, **tok.model_vocab())
    for name, p in model.named_parameters():
        frozen = component_of(name) in cfg.model.freeze
        assert p.requires_grad != frozen, name
    summary = trainable_summary(model)
    assert summary["decoder"]["trainable"] == 0 < summary["projectors"]["trainable"]
    assert any(component_of(n) == "projectors" for n in ("tasks.prompted.decoder.memory_proj.0.weight",))


def test_frozen_parts_are_bit_identical_after_training_and_not_in_the_optimizer(lm_dirs):
    cfg = cfg_for(lm_dirs["gpt2"], "model.freeze=[image_encoder,decoder]", "train.zero_stage=2",
                  "train.lr=0.01")
    tok = TextTokenizer.load(cfg.tokenizer_path)
    with single_process_group(torch.device("cpu")):
        engine = build_engine(cfg, tok.model_vocab(), world_size=1, total_steps=3)
        before = {n: p.detach().clone() for n, p in engine.module.named_parameters()}
        in_optimizer = {id(p) for g in engine.optimizer.param_groups for p in g["params"]}
        for i in range(3):
            out = engine(batch_for(cfg, tok, seed=i))
            engine.backward(out["loss"])
            engine.step()
        moved = []
        for n, p in engine.module.named_parameters():
            if component_of(n) in ("image_encoder", "decoder"):
                assert torch.equal(p.detach(), before[n]), n
                assert not p.requires_grad
            elif not torch.equal(p.detach(), before[n]):
                moved.append(n)
        assert any(n.startswith("tasks.prompted.decoder.memory_proj") for n in moved)
    # ZeRO-2 flattens what it optimizes; the frozen tensors are none of it
    frozen_ids = {id(p) for n, p in engine.module.named_parameters() if not p.requires_grad}
    assert not frozen_ids & in_optimizer


@pytest.mark.parametrize("arch", ("gpt2", "llama"))
def test_lora_adds_the_expected_parameters_and_merges_to_the_same_function(lm_dirs, arch,
                                                                          tmp_path):
    cfg = cfg_for(lm_dirs[arch], "model.lora={r: 4, alpha: 8}")
    tok = TextTokenizer.load(cfg.tokenizer_path)
    torch.manual_seed(0)
    plain = build_model(cfg.override({"model.lora": None}), **tok.model_vocab())
    torch.manual_seed(0)
    model = build_model(cfg, **tok.model_vocab()).eval()
    # expected: r * (in + out) per linear layer of the LM but its output head (peft all-linear)
    lm = plain.tasks["prompted"].decoder.lm
    head = lm.get_output_embeddings()
    expected = 0
    for _, mod in lm.named_modules():
        if mod is head:
            continue
        if isinstance(mod, torch.nn.Linear):
            expected += 4 * (mod.in_features + mod.out_features)
        elif type(mod).__name__ == "Conv1D":  # GPT-2: weight is (in, out)
            expected += 4 * sum(mod.weight.shape)
    adapters = sum(p.numel() for n, p in model.named_parameters() if "lora_" in n)
    assert adapters == expected > 0
    lm_trainable = [n for n, p in model.named_parameters()
                    if p.requires_grad and component_of(n) == "decoder"]
    assert lm_trainable and all("lora_" in n for n in lm_trainable)
    with torch.no_grad():
        for n, p in model.named_parameters():
            if "lora_B" in n:
                p.normal_(0, 0.2)  # trained adapters: B is zero only at the start
    b = batch_for(cfg, tok)
    with torch.no_grad():
        want, want_ids = model(b, mode="eval")["loss"], model.generate(b, max_new_tokens=4)
    merged = merge_lora(dict(model.state_dict()), lora_layers(model))
    save_state_dict(merged, cfg.override({"model.lora": None}), tok.model_vocab(), tmp_path,
                    extra=model.extra)
    again = load_model(tmp_path).eval()  # plain weights: no peft module anywhere
    assert not any("lora" in n for n, _ in again.named_parameters())
    with torch.no_grad():
        got, got_ids = again(b, mode="eval")["loss"], again.generate(b, max_new_tokens=4)
    assert torch.allclose(want, got, atol=1e-5), (want, got)
    assert torch.equal(want_ids, got_ids)
    assert not torch.allclose(want, plain.eval()(b, mode="eval")["loss"], atol=1e-3)


def test_stage_two_starts_where_stage_one_ended(lm_dirs, tmp_path):
    """Stage 1 (projectors only) saved, stage 2 (projectors + LoRA) initialised from it: the
    same loss on the same batch, since fresh LoRA adds zero."""
    stage1 = cfg_for(lm_dirs["llama"], "model.freeze=[image_encoder,audio_encoder,decoder]")
    tok = TextTokenizer.load(stage1.tokenizer_path)
    torch.manual_seed(0)
    first = build_model(stage1, **tok.model_vocab())
    with torch.no_grad():
        for p in first.parameters():
            if p.requires_grad:
                p.add_(torch.randn_like(p) * 0.05)  # "trained"
    save_state_dict(dict(first.state_dict()), stage1, tok.model_vocab(), tmp_path / "s1",
                    extra=first.extra)
    stage2 = cfg_for(lm_dirs["llama"], "model.freeze=[image_encoder,audio_encoder]",
                     "model.lora={r: 4}", f"model.init_from={tmp_path / 's1'}")
    torch.manual_seed(1)  # other random init: every tensor must come from stage 1
    second = build_model(stage2, **tok.model_vocab())
    assert init_weights(second, tmp_path / "s1") > 0
    b = batch_for(cfg_for(lm_dirs["llama"]), tok)
    with torch.no_grad():
        assert torch.allclose(first.eval()(b, mode="eval")["loss"],
                              second.eval()(b, mode="eval")["loss"], atol=1e-5)
    wrong = build_model(cfg_for(lm_dirs["gpt2"]), **TextTokenizer.load(lm_dirs["gpt2"]).model_vocab())
    with pytest.raises(ValueError, match="model.init_from"):
        init_weights(wrong, tmp_path / "s1")


def test_modality_tokens_pool_to_the_budget(lm_dirs):
    cfg = cfg_for(lm_dirs["llama"], "model.modality_tokens={image: 3}")
    tok = TextTokenizer.load(cfg.tokenizer_path)
    model = build_model(cfg, **tok.model_vocab())
    enc = model.encode(batch_for(cfg, tok))
    assert enc["image"][0].shape[1] == 3
    full = build_model(cfg.override({"model.modality_tokens": {}}), **tok.model_vocab())
    assert full.encode(batch_for(cfg, tok))["image"][0].shape[1] > 3
    # a saved model keeps the budget
    state = {k: v for k, v in model.state_dict().items()}
    again = build_model(cfg, **tok.model_vocab(), extra=model.extra, load_pretrained=False)
    load_weights(again, state)
    assert again.encode(batch_for(cfg, tok))["image"][0].shape[1] == 3


def test_the_analytic_counts_refuse_pretrained_parts(lm_dirs):
    from mmdist.models.accounting import flops_per_sample

    with pytest.raises(ValueError, match="model.decoder_pretrained: the analytic"):
        flops_per_sample(cfg_for(lm_dirs["llama"]), 100)


def test_shards_of_another_tokenizer_are_refused(lm_dirs, tmp_path):
    from mmdist.errors import CommandError
    from mmdist.train.run import check_data, ensure_data

    own = ensure_data(load_config("tiny", ["data.synthetic_samples=40"]), tmp_path / "own")
    with pytest.raises(CommandError, match="another tokenizer than model.decoder_pretrained"):
        check_data(own, cfg_for(lm_dirs["llama"]))
    cfg = cfg_for(lm_dirs["llama"], "data.synthetic_samples=40")
    check_data(ensure_data(cfg, tmp_path / "lm"), cfg)  # prepared with the LM's: accepted


def test_lora_on_a_pretrained_encoder_too(pretrained_dirs, tmp_path):
    cfg = load_config("tiny", [*SMALL, "model.task=prompted",
                               f"model.decoder_pretrained={pretrained_dirs['@llama']}",
                               f"model.image_pretrained={pretrained_dirs['@siglip']}",
                               "model.lora={r: 2, components: [decoder, image_encoder]}"])
    tok = TextTokenizer.load(cfg.tokenizer_path)
    model = build_model(cfg, **tok.model_vocab()).eval()
    adapted = {n.split(".lora_")[0] for n, _ in model.named_parameters() if ".lora_" in n}
    assert any(n.startswith("encoders.image.backbone.") for n in adapted)
    assert any(n.startswith("tasks.prompted.decoder.lm.") for n in adapted)
    assert not any(p.requires_grad for n, p in model.named_parameters()
                   if n.startswith("encoders.image.backbone.") and ".lora_" not in n)
    with torch.no_grad():
        for n, p in model.named_parameters():
            if "lora_B" in n:
                p.normal_(0, 0.2)
        b = batch_for(cfg, tok)
        want = model(b, mode="eval")["loss"]
    merged = merge_lora(dict(model.state_dict()), lora_layers(model))
    save_state_dict(merged, cfg.override({"model.lora": None}), tok.model_vocab(), tmp_path,
                    extra=model.extra)
    with torch.no_grad():
        got = load_model(tmp_path).eval()(b, mode="eval")["loss"]
    assert torch.allclose(want, got, atol=1e-5)
