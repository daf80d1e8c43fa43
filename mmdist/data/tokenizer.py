"""Text tokenizer: trained locally with `tokenizers`, or a local pretrained tokenizer.json.

    tok = TextTokenizer.train(["a red circle", "a blue square"], vocab_size=200)
    ids, mask = tok.encode_batch(["a red circle", None], max_len=8)
    # ids[0] = [BOS] a red circle [EOS] [PAD] [PAD] [PAD]; ids[1] all [PAD], mask[1] all 0
    tok.save("shards/tokenizer"); TextTokenizer.load("shards/tokenizer")

Trained tokenizers use WordPiece (whole words + characters) with the special tokens of :data:`schema.SPECIAL_TOKENS` at ids
0..5. A pretrained directory (any Hugging Face ``tokenizer.json``) works too: [BOS]/[EOS]/[PAD]
are then looked up among the usual names ([CLS]/[SEP], <s>/</s>, <|endoftext|>, ...).
Special tokens are added by :meth:`encode_batch` itself, never by the tokenizer's own
post-processor, so every tokenizer yields the same ``[BOS] ... [EOS] [PAD]...`` layout.
"""

from __future__ import annotations

import json
from collections import Counter
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

import numpy as np
from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers

from mmdist.data.schema import BOS_ID, EOS_ID, PAD_ID, SPECIAL_TOKENS

TOKENIZER_FILE = "tokenizer.json"
META_FILE = "mmdist_tokenizer.json"

# Candidate names, in order of preference, for pretrained tokenizers.
_BOS_NAMES = ("[BOS]", "<s>", "<bos>", "[CLS]", "<|begin_of_text|>", "<|endoftext|>")
_EOS_NAMES = ("[EOS]", "</s>", "<eos>", "[SEP]", "<|end_of_text|>", "<|endoftext|>")
# LMs without a padding token (GPT-2, Llama 3, Qwen2) pad with their end token: padding is
# masked out of every loss, so which id it is does not matter
_PAD_NAMES = ("[PAD]", "<pad>", "<|pad|>", "<|finetune_right_pad_id|>", "<unk>", "[UNK]",
              "<|endoftext|>", "<|end_of_text|>", "</s>")


class TextTokenizer:
    """A `tokenizers.Tokenizer` plus the ids of [PAD]/[BOS]/[EOS] and fixed-length encoding.

    Args:
        tokenizer: the wrapped tokenizer.
        pad_id, bos_id, eos_id: ids of the padding, begin and end tokens.
    """

    def __init__(self, tokenizer: Tokenizer, pad_id: int = PAD_ID, bos_id: int = BOS_ID,
                 eos_id: int = EOS_ID):
        self.tokenizer = tokenizer
        self._pad_id, self._bos_id, self._eos_id = int(pad_id), int(bos_id), int(eos_id)
        self.tokenizer.no_padding()
        self.tokenizer.no_truncation()

    # ---- construction ---------------------------------------------------------------------
    @classmethod
    def train(cls, texts: Iterable[str], vocab_size: int) -> TextTokenizer:
        """Build a lower-casing WordPiece tokenizer from ``texts``, deterministically.

        The vocabulary is the special tokens, every character seen (as a word start and as a
        ``##`` continuation, so no seen text maps to [UNK]) and then whole words by frequency
        (ties by spelling) up to ``vocab_size``. Unlike `tokenizers`' WordPiece trainer, whose
        merge ties break in hash-map order, the same text always gives the same file, so a
        shard directory is reproducible bit for bit.

        Args:
            texts: training text (None and empty strings are skipped).
            vocab_size: the largest vocabulary; small corpora give fewer tokens.

        Returns:
            A tokenizer whose special tokens are ``schema.SPECIAL_TOKENS`` at ids 0..5.
        """
        if vocab_size < len(SPECIAL_TOKENS) + 1:
            raise ValueError(f"vocab_size={vocab_size}: must be > {len(SPECIAL_TOKENS)} "
                             "(the special tokens)")
        normalizer = normalizers.BertNormalizer(lowercase=True, strip_accents=True,
                                                clean_text=True, handle_chinese_chars=True)
        pre = pre_tokenizers.BertPreTokenizer()
        counts: Counter[str] = Counter()
        for t in texts:
            if isinstance(t, str) and t.strip():
                counts.update(w for w, _ in pre.pre_tokenize_str(normalizer.normalize_str(t)))
        chars = sorted({c for w in counts for c in w})
        vocab_list = [*SPECIAL_TOKENS, *chars, *(f"##{c}" for c in chars)]
        have = set(vocab_list)
        for word, _ in sorted(counts.items(), key=lambda wc: (-wc[1], wc[0])):
            if len(vocab_list) >= vocab_size:
                break
            if word not in have:
                vocab_list.append(word)
                have.add(word)
        vocab_list = vocab_list[:max(vocab_size, len(SPECIAL_TOKENS))]
        tok = Tokenizer(models.WordPiece(vocab={t: i for i, t in enumerate(vocab_list)},
                                         unk_token="[UNK]", max_input_chars_per_word=100))
        tok.normalizer = normalizer
        tok.pre_tokenizer = pre
        tok.decoder = decoders.WordPiece()
        tok.add_special_tokens(list(SPECIAL_TOKENS))
        return cls(tok, PAD_ID, BOS_ID, EOS_ID)

    @classmethod
    def load(cls, path: str | Path) -> TextTokenizer:
        """Load a directory written by :meth:`save` or a pretrained one with ``tokenizer.json``.

        Args:
            path: a directory holding ``tokenizer.json`` (or the path of that file itself).

        Raises:
            FileNotFoundError: no ``tokenizer.json`` there.
            ValueError: the tokenizer has no token usable as [BOS], [EOS] or [PAD].
        """
        path = Path(path)
        file = path if path.is_file() else path / TOKENIZER_FILE
        if not file.exists():
            raise FileNotFoundError(f"tokenizer {path}: no {TOKENIZER_FILE} there (a directory "
                                    "written by `mmdist prepare` or a local pretrained tokenizer)")
        tok = Tokenizer.from_file(str(file))
        meta_file = file.parent / META_FILE
        if meta_file.exists():
            meta = json.loads(meta_file.read_text())
            return cls(tok, meta["pad_id"], meta["bos_id"], meta["eos_id"])
        ids = {}
        for role, names in (("bos", _BOS_NAMES), ("eos", _EOS_NAMES), ("pad", _PAD_NAMES)):
            found = [tok.token_to_id(n) for n in names if tok.token_to_id(n) is not None]
            if not found:
                raise ValueError(f"tokenizer {file}: no {role} token among {list(names)}")
            ids[role] = found[0]
        return cls(tok, ids["pad"], ids["bos"], ids["eos"])

    def save(self, path: str | Path) -> Path:
        """Write ``tokenizer.json`` and the special-token ids into directory ``path``."""
        path = Path(path)
        path.mkdir(parents=True, exist_ok=True)
        self.tokenizer.save(str(path / TOKENIZER_FILE))
        (path / META_FILE).write_text(json.dumps(
            {"pad_id": self.pad_id, "bos_id": self.bos_id, "eos_id": self.eos_id}, indent=1) + "\n")
        return path

    # ---- properties -------------------------------------------------------------------------
    @property
    def vocab_size(self) -> int:
        return self.tokenizer.get_vocab_size(with_added_tokens=True)

    @property
    def pad_id(self) -> int:
        return self._pad_id

    @property
    def bos_id(self) -> int:
        return self._bos_id

    @property
    def eos_id(self) -> int:
        return self._eos_id

    @property
    def special_ids(self) -> list[int]:
        """Ids of every special token ([PAD]/[BOS]/[EOS] and the tokenizer's added specials):
        never text, so generation metrics drop them."""
        added = self.tokenizer.get_added_tokens_decoder()
        return sorted({i for i, t in added.items() if t.special}
                      | {self._pad_id, self._bos_id, self._eos_id})

    def model_vocab(self) -> dict[str, Any]:
        """What a model is built with: ``vocab_size`` and the special ids."""
        return {"vocab_size": self.vocab_size, "pad_id": self.pad_id, "bos_id": self.bos_id,
                "eos_id": self.eos_id, "special_ids": self.special_ids}

    # ---- encoding -------------------------------------------------------------------------
    def encode_batch(self, texts: Sequence[str | None], max_len: int) -> tuple[np.ndarray, np.ndarray]:
        """Tokenise to fixed length: ``[BOS] tokens [EOS] [PAD]...``, truncated to fit.

        Args:
            texts: strings; None (a missing text) gives a row of [PAD] with mask 0.
            max_len: L, the length of every row, special tokens included (>= 2).

        Returns:
            ``(ids, mask)``, both int64 of shape (len(texts), max_len).
        """
        if max_len < 2:
            raise ValueError(f"max_len={max_len}: must be >= 2 ([BOS] and [EOS])")
        n = len(texts)
        ids = np.full((n, max_len), self._pad_id, dtype=np.int64)
        mask = np.zeros((n, max_len), dtype=np.int64)
        present = [i for i, t in enumerate(texts) if t is not None]
        if not present:
            return ids, mask
        encs = self.tokenizer.encode_batch([str(texts[i]) for i in present],
                                           add_special_tokens=False)
        room = max_len - 2
        for row, enc in zip(present, encs):
            toks = enc.ids[:room]
            k = len(toks)
            ids[row, 0] = self._bos_id
            ids[row, 1:k + 1] = toks
            ids[row, k + 1] = self._eos_id
            mask[row, :k + 2] = 1
        return ids, mask

    def decode(self, ids: Sequence[int] | np.ndarray) -> str:
        """Text of a row of ids; stops at the first [EOS] and drops special tokens."""
        out = []
        for i in np.asarray(ids).reshape(-1).tolist():
            if i == self._eos_id:
                break
            if i in (self._pad_id, self._bos_id):
                continue
            out.append(int(i))
        return self.tokenizer.decode(out, skip_special_tokens=True)

    def words(self, ids: Sequence[int]) -> list[str]:
        """The whitespace-separated words of the text ``ids`` decode to (what BLEU scores)."""
        return self.tokenizer.decode([int(i) for i in ids], skip_special_tokens=True).split()

    def __getstate__(self) -> dict:
        return {"json": self.tokenizer.to_str(), "ids": (self._pad_id, self._bos_id, self._eos_id)}

    def __setstate__(self, state: dict) -> None:
        self.tokenizer = Tokenizer.from_str(state["json"])
        self._pad_id, self._bos_id, self._eos_id = state["ids"]
