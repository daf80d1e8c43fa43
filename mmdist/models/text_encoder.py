"""Text encoders: ``bert`` (transformers), ``lstm``, ``gru``; each returns tokens + mask."""

from __future__ import annotations

from pathlib import Path

from torch import Tensor, nn

from mmdist.models.transformers_init import build_transformers_model, hf


class RecurrentTextEncoder(nn.Module):
    """Token embedding + bidirectional LSTM/GRU, projected to ``dim``.

    Args:
        kind: ``"lstm"`` or ``"gru"``.
        vocab_size: tokenizer size.
        dim: output width D.
        layers: recurrent layers.
        pad_id: padding token id (its embedding stays zero).
    """

    def __init__(self, kind: str, vocab_size: int, dim: int, layers: int, pad_id: int = 0):
        super().__init__()
        rnn = {"lstm": nn.LSTM, "gru": nn.GRU}[kind]
        self.embed = nn.Embedding(vocab_size, dim, padding_idx=pad_id)
        self.rnn = rnn(dim, dim // 2, num_layers=layers, batch_first=True, bidirectional=True)
        self.proj = nn.Linear(2 * (dim // 2), dim)
        self.norm = nn.LayerNorm(dim)

    def forward(self, input_ids: Tensor, attention_mask: Tensor) -> tuple[Tensor, Tensor]:
        """``(B, L)`` ids and mask -> tokens ``(B, L, D)`` and mask ``(B, L)`` (bool)."""
        x, _ = self.rnn(self.embed(input_ids))
        return self.norm(self.proj(x)), attention_mask.bool()


class BertTextEncoder(nn.Module):
    """A transformers ``BertModel`` (built from a config or loaded from a local directory).

    Args:
        bert: the BERT model (no pooling layer needed).
        dim: output width D; the BERT hidden states are projected to it.
    """

    def __init__(self, bert: nn.Module, dim: int):
        super().__init__()
        self.bert = bert
        self.proj = nn.Linear(bert.config.hidden_size, dim)
        self.norm = nn.LayerNorm(dim)

    def forward(self, input_ids: Tensor, attention_mask: Tensor) -> tuple[Tensor, Tensor]:
        """``(B, L)`` ids and mask -> tokens ``(B, L, D)`` and mask ``(B, L)`` (bool)."""
        h = self.bert(input_ids=input_ids, attention_mask=attention_mask).last_hidden_state
        return self.norm(self.proj(h)), attention_mask.bool()


def build_bert(vocab_size: int, width: int, layers: int, heads: int, max_len: int,
               pad_id: int = 0, pretrained: str | None = None) -> nn.Module:
    """A ``BertModel`` from a config at this size, or ``from_pretrained`` of a local directory.

    Raises:
        FileNotFoundError: ``pretrained`` is not a directory.
        ValueError: the pretrained vocabulary is smaller than the tokenizer's.
    """
    if pretrained:
        if not Path(pretrained).is_dir():
            raise FileNotFoundError(f"model.text_pretrained={pretrained!r}: not a directory")
        bert = hf("BertModel").from_pretrained(pretrained, add_pooling_layer=False,
                                               use_safetensors=True)
        if bert.config.vocab_size < vocab_size:
            raise ValueError(f"model.text_pretrained={pretrained!r}: its vocabulary has "
                             f"{bert.config.vocab_size} tokens but the tokenizer has {vocab_size};"
                             " use the tokenizer saved with it (data.tokenizer)")
        return bert
    config = hf("BertConfig")(
        vocab_size=vocab_size, hidden_size=width, num_hidden_layers=layers,
        num_attention_heads=heads, intermediate_size=4 * width,
        max_position_embeddings=max(max_len, 64), pad_token_id=pad_id)
    return build_transformers_model(hf("BertModel"), config, add_pooling_layer=False)


def build_text_encoder(kind: str, vocab_size: int, dim: int, layers: int, heads: int,
                       max_len: int, pad_id: int = 0,
                       pretrained: str | None = None) -> nn.Module:
    """The text encoder named ``kind`` (``bert``, ``lstm``, ``gru``) at width ``dim``."""
    if kind == "bert":
        return BertTextEncoder(build_bert(vocab_size, dim, layers, heads, max_len, pad_id,
                                          pretrained), dim)
    if kind in ("lstm", "gru"):
        return RecurrentTextEncoder(kind, vocab_size, dim, layers, pad_id)
    raise ValueError(f"unknown text encoder {kind!r}; choose from ['bert', 'gru', 'lstm']")
