import json

import numpy as np
import pytest
from tokenizers import Tokenizer, models, pre_tokenizers

from mmdist.data.schema import BOS_ID, EOS_ID, PAD_ID, SPECIAL_TOKENS
from mmdist.data.tokenizer import TextTokenizer

TEXTS = ["a red circle with a high tone", "a blue square with a low hum", "the box is red"] * 5


def test_special_tokens_have_fixed_ids():
    tok = TextTokenizer.train(TEXTS, vocab_size=100)
    assert [tok.tokenizer.token_to_id(t) for t in SPECIAL_TOKENS] == list(range(6))
    assert (tok.pad_id, tok.bos_id, tok.eos_id) == (PAD_ID, BOS_ID, EOS_ID)
    assert tok.vocab_size <= 100


def test_encode_batch_layout_padding_truncation_and_none():
    tok = TextTokenizer.train(TEXTS, vocab_size=100)
    ids, mask = tok.encode_batch(["a red circle", None, "a blue square with a low hum " * 5], 8)
    assert ids.dtype == np.int64 and mask.dtype == np.int64 and ids.shape == mask.shape == (3, 8)
    assert ids[0, 0] == BOS_ID and ids[0, 4] == EOS_ID and (ids[0, 5:] == PAD_ID).all()
    assert mask[0].tolist() == [1, 1, 1, 1, 1, 0, 0, 0]
    assert (ids[1] == PAD_ID).all() and (mask[1] == 0).all()
    assert ids[2, -1] == EOS_ID and mask[2].all()  # truncated, still ends with [EOS]
    assert tok.decode(ids[0]) == "a red circle"


def test_unknown_words_fall_back_to_characters():
    tok = TextTokenizer.train(TEXTS, vocab_size=100)
    ids, _ = tok.encode_batch(["a rose"], 16)  # "rose" unseen, its letters seen
    assert 1 not in ids[0].tolist()  # no [UNK]
    assert tok.decode(ids[0]) == "a rose"


def test_training_is_deterministic_and_save_load_round_trips(tmp_path):
    a, b = TextTokenizer.train(TEXTS, 60), TextTokenizer.train(TEXTS, 60)
    assert a.tokenizer.to_str() == b.tokenizer.to_str()
    a.save(tmp_path / "tok")
    c = TextTokenizer.load(tmp_path / "tok")
    assert np.array_equal(c.encode_batch(TEXTS[:2], 12)[0], a.encode_batch(TEXTS[:2], 12)[0])


def test_load_pretrained_tokenizer_json_finds_special_tokens(tmp_path):
    vocab = {"<pad>": 0, "<s>": 1, "</s>": 2, "<unk>": 3, "hello": 4, "world": 5}
    raw = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    raw.pre_tokenizer = pre_tokenizers.Whitespace()
    (tmp_path / "pre").mkdir()
    raw.save(str(tmp_path / "pre" / "tokenizer.json"))
    tok = TextTokenizer.load(tmp_path / "pre")
    assert (tok.pad_id, tok.bos_id, tok.eos_id) == (0, 1, 2)
    ids, mask = tok.encode_batch(["hello world"], 6)
    assert ids[0].tolist() == [1, 4, 5, 2, 0, 0] and mask[0].tolist() == [1, 1, 1, 1, 0, 0]


def test_load_errors_name_the_path(tmp_path):
    with pytest.raises(FileNotFoundError, match="tokenizer.json"):
        TextTokenizer.load(tmp_path)
    raw = Tokenizer(models.WordLevel(vocab={"x": 0, "y": 1}, unk_token="x"))
    raw.save(str(tmp_path / "tokenizer.json"))
    (tmp_path / "ignored.json").write_text(json.dumps({}))
    with pytest.raises(ValueError, match="no bos token"):
        TextTokenizer.load(tmp_path)
