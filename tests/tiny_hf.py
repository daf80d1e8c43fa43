"""Tiny random Hugging Face models saved with ``save_pretrained``, as a user's local directories
of a real LLM would be laid out (config.json, model.safetensors, tokenizer.json): what the
pretrained-parts tests load through mmdist's real loading path. Nothing is downloaded.

    lm_dir = tiny_lm(tmp_path / "llama", "llama")
"""

from __future__ import annotations

from pathlib import Path

from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

TEXTS = ["a red circle", "a blue square", "a green triangle", "what shape is it",
         "describe the image", "the digit is seven", "translate to french",
         "un cercle rouge", "a small black digit on white", "one two three four five six"]

# special tokens per tokenizer family: (bos, eos, pad or None: the LM pads with its end token)
SPECIALS = {"gpt2": ("<|endoftext|>", "<|endoftext|>", None),
            "llama": ("<s>", "</s>", "<unk>"),
            "qwen2": ("<|endoftext|>", "<|endoftext|>", None)}


def tiny_tokenizer(family: str, vocab_size: int = 160, texts: list[str] = TEXTS) -> Tokenizer:
    """A byte-level BPE tokenizer as GPT-2 / Llama 3 / Qwen2 ship (``tokenizer.json``), trained
    on ``texts`` (:data:`TEXTS`), with the family's special tokens and no mmdist metadata."""
    bos, eos, pad = SPECIALS[family]
    specials = list(dict.fromkeys(t for t in (bos, eos, pad) if t))
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=specials,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(texts * 5, trainer)
    return tok


def tiny_lm(path: str | Path, arch: str = "llama", hidden: int = 32, layers: int = 2,
            min_vocab: int = 0, texts: list[str] = TEXTS, vocab_size: int = 160) -> Path:
    """A random causal LM of ``arch`` (``llama``, ``gpt2``, ``qwen2``) and its tokenizer
    (trained on ``texts`` up to ``vocab_size``), saved in ``path``; the embedding table covers
    the tokenizer and at least ``min_vocab``."""
    import transformers  # heavy: only the tests that build models import this module

    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    tok = tiny_tokenizer(arch, vocab_size, texts)
    tok.save(str(path / "tokenizer.json"))
    n = max(tok.get_vocab_size(), min_vocab)
    bos, eos, _ = SPECIALS[arch]
    ids = {"bos_token_id": tok.token_to_id(bos), "eos_token_id": tok.token_to_id(eos)}
    if arch == "gpt2":
        cfg = transformers.GPT2Config(vocab_size=n, n_embd=hidden, n_layer=layers, n_head=2,
                                      n_positions=256, **ids)
    elif arch == "llama":
        cfg = transformers.LlamaConfig(vocab_size=n, hidden_size=hidden, num_hidden_layers=layers,
                                       num_attention_heads=2, num_key_value_heads=1,
                                       intermediate_size=2 * hidden, max_position_embeddings=256,
                                       **ids)
    elif arch == "qwen2":
        cfg = transformers.Qwen2Config(vocab_size=n, hidden_size=hidden, num_hidden_layers=layers,
                                       num_attention_heads=2, num_key_value_heads=1,
                                       intermediate_size=2 * hidden, max_position_embeddings=256,
                                       **ids)
    else:
        raise ValueError(f"arch {arch!r}: llama, gpt2 or qwen2")
    transformers.AutoModelForCausalLM.from_config(cfg).save_pretrained(str(path))
    return path


TINY = dict(hidden_size=16, intermediate_size=32, num_hidden_layers=1, num_attention_heads=2)
MEAN, STD = [0.1, 0.2, 0.3], [0.4, 0.5, 0.6]


# ---- encoders: vision, audio, text -------------------------------------------------------


def _clip(d: Path) -> None:
    import transformers as T

    cfg = T.CLIPConfig(
        text_config=dict(TINY, vocab_size=64, max_position_embeddings=16, bos_token_id=0,
                         eos_token_id=1, pad_token_id=1),
        vision_config=dict(TINY, image_size=32, patch_size=8), projection_dim=8)
    T.CLIPModel(cfg).save_pretrained(d)  # the whole two-tower model: the vision tower is taken
    T.CLIPImageProcessor(size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32},
                         image_mean=MEAN, image_std=STD).save_pretrained(d)


def _siglip(d: Path) -> None:
    import transformers as T

    cfg = T.SiglipVisionConfig(**TINY, image_size=32, patch_size=8)
    T.SiglipVisionModel(cfg).save_pretrained(d)  # the vision tower alone, with its pooling head
    T.SiglipImageProcessor(size={"height": 32, "width": 32}).save_pretrained(d)


def _siglip_full(d: Path) -> None:
    import transformers as T

    cfg = T.SiglipConfig(text_config=dict(TINY, vocab_size=64, max_position_embeddings=16),
                         vision_config=dict(TINY, image_size=32, patch_size=8))
    T.SiglipModel(cfg).save_pretrained(d)  # the whole two-tower model
    T.SiglipImageProcessor(size={"height": 32, "width": 32}).save_pretrained(d)


def _vit(d: Path) -> None:
    import transformers as T

    T.ViTModel(T.ViTConfig(**TINY, image_size=32, patch_size=8)).save_pretrained(d)
    T.ViTImageProcessor(size={"height": 32, "width": 32}, image_mean=MEAN,
                        image_std=STD).save_pretrained(d)


def _dinov2(d: Path) -> None:
    import transformers as T

    cfg = T.Dinov2Config(hidden_size=16, num_hidden_layers=1, num_attention_heads=2, mlp_ratio=2,
                         image_size=32, patch_size=8)
    T.Dinov2Model(cfg).save_pretrained(d)
    T.BitImageProcessor(size={"shortest_edge": 40}, crop_size={"height": 32, "width": 32},
                        do_center_crop=True, image_mean=MEAN, image_std=STD).save_pretrained(d)


def _whisper_config():
    import transformers as T

    return T.WhisperConfig(
        d_model=16, encoder_layers=1, decoder_layers=1, encoder_attention_heads=2,
        decoder_attention_heads=2, encoder_ffn_dim=32, decoder_ffn_dim=32, num_mel_bins=16,
        max_source_positions=50, max_target_positions=16, vocab_size=64, pad_token_id=0,
        bos_token_id=1, eos_token_id=2, decoder_start_token_id=1)


def _whisper_extractor(d: Path) -> None:
    import transformers as T

    # chunk_length=1: a 1 s window of 100 frames = 2 * max_source_positions
    T.WhisperFeatureExtractor(feature_size=16, chunk_length=1).save_pretrained(d)


def _whisper(d: Path) -> None:
    import transformers as T

    T.WhisperModel(_whisper_config()).save_pretrained(d)  # keys encoder.* / decoder.*
    _whisper_extractor(d)


def _whisper_generation(d: Path) -> None:
    import transformers as T

    # keys model.encoder.* / model.decoder.* / proj_out
    T.WhisperForConditionalGeneration(_whisper_config()).save_pretrained(d)
    _whisper_extractor(d)


CONV = dict(conv_dim=(16, 16), conv_stride=(5, 4), conv_kernel=(10, 4),
            num_conv_pos_embeddings=8, num_conv_pos_embedding_groups=2)


def _wav2vec2(d: Path) -> None:
    import transformers as T

    T.Wav2Vec2Model(T.Wav2Vec2Config(**TINY, **CONV)).save_pretrained(d)
    T.Wav2Vec2FeatureExtractor(do_normalize=True).save_pretrained(d)


def _hubert(d: Path) -> None:
    import transformers as T

    T.HubertModel(T.HubertConfig(**TINY, **CONV)).save_pretrained(d)
    T.Wav2Vec2FeatureExtractor(do_normalize=False).save_pretrained(d)


def _wavlm(d: Path) -> None:
    import transformers as T

    T.WavLMModel(T.WavLMConfig(**TINY, **CONV)).save_pretrained(d)
    T.Wav2Vec2FeatureExtractor(do_normalize=True).save_pretrained(d)


def _ast(d: Path) -> None:
    import transformers as T

    cfg = T.ASTConfig(**TINY, patch_size=16, num_mel_bins=32, max_length=48, frequency_stride=8,
                      time_stride=8)
    T.ASTModel(cfg).save_pretrained(d)
    T.ASTFeatureExtractor(num_mel_bins=32, max_length=48).save_pretrained(d)


def _bert(d: Path) -> None:
    import transformers as T

    T.BertModel(T.BertConfig(**TINY, vocab_size=64, max_position_embeddings=32)).save_pretrained(d)


def _roberta(d: Path) -> None:
    import transformers as T

    cfg = T.RobertaConfig(**TINY, vocab_size=64, max_position_embeddings=40, pad_token_id=1)
    T.RobertaModel(cfg).save_pretrained(d)


def _modernbert(d: Path) -> None:
    import transformers as T

    cfg = T.ModernBertConfig(**TINY, vocab_size=64, max_position_embeddings=32, pad_token_id=0,
                             bos_token_id=1, eos_token_id=2, cls_token_id=1, sep_token_id=2)
    T.ModernBertModel(cfg).save_pretrained(d)


# name -> (builder, config key, prefix of the backbone's keys in the saved file)
MODELS = {
    "clip": (_clip, "model.image_pretrained", "vision_model."),
    "siglip": (_siglip, "model.image_pretrained", ""),
    "siglip_full": (_siglip_full, "model.image_pretrained", "vision_model."),
    "vit": (_vit, "model.image_pretrained", ""),
    "dinov2": (_dinov2, "model.image_pretrained", ""),
    "whisper": (_whisper, "model.audio_pretrained", "encoder."),
    "whisper_generation": (_whisper_generation, "model.audio_pretrained", "model.encoder."),
    "wav2vec2": (_wav2vec2, "model.audio_pretrained", ""),
    "hubert": (_hubert, "model.audio_pretrained", ""),
    "wavlm": (_wavlm, "model.audio_pretrained", ""),
    "ast": (_ast, "model.audio_pretrained", ""),
    "bert": (_bert, "model.text_pretrained", ""),
    "roberta": (_roberta, "model.text_pretrained", ""),
    "modernbert": (_modernbert, "model.text_pretrained", ""),
}
IMAGE = ["clip", "siglip", "siglip_full", "vit", "dinov2"]
AUDIO = ["whisper", "whisper_generation", "wav2vec2", "hubert", "wavlm", "ast"]
TEXT = ["bert", "roberta", "modernbert"]
