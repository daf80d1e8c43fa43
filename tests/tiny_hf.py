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


def tiny_tokenizer(family: str, vocab_size: int = 160) -> Tokenizer:
    """A byte-level BPE tokenizer as GPT-2 / Llama 3 / Qwen2 ship (``tokenizer.json``), trained
    on :data:`TEXTS`, with the family's special tokens and no mmdist metadata."""
    bos, eos, pad = SPECIALS[family]
    specials = list(dict.fromkeys(t for t in (bos, eos, pad) if t))
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=specials,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(TEXTS * 5, trainer)
    return tok


def tiny_lm(path: str | Path, arch: str = "llama", hidden: int = 32, layers: int = 2,
            min_vocab: int = 0) -> Path:
    """A random causal LM of ``arch`` (``llama``, ``gpt2``, ``qwen2``) and its tokenizer,
    saved in ``path``; the embedding table covers the tokenizer and at least ``min_vocab``."""
    import transformers  # heavy: only the tests that build models import this module

    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    tok = tiny_tokenizer(arch)
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
