"""Decoder LMs conditioned on fused modality tokens, and greedy / beam generation.

Every decoder has one call, ``decoder(ids, memory, memory_mask) -> logits (B, T, V)``:
``memory`` (B, M, D) are the fused tokens it is conditioned on, either as prefix tokens in
front of the text (``prefix``) or through cross-attention (``cross_attention``).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from mmdist.models.transformers_init import build_transformers_model, hf


class HFDecoder(nn.Module):
    """A transformers causal LM (GPT-2 or Llama) conditioned on ``memory``.

    Args:
        lm: ``GPT2LMHeadModel`` or ``LlamaForCausalLM`` (GPT-2 built with
            ``add_cross_attention=True`` for cross-attention conditioning).
        memory_dim: width D of the fused tokens.
        conditioning: ``"prefix"`` or ``"cross_attention"``.
    """

    def __init__(self, lm: nn.Module, memory_dim: int, conditioning: str):
        super().__init__()
        self.lm = lm
        self.conditioning = conditioning
        width = lm.config.hidden_size  # not weight.shape: partitioned under ZeRO-3 zero.Init
        self.memory_proj = nn.Sequential(nn.Linear(memory_dim, width), nn.LayerNorm(width))

    def forward(self, ids: Tensor, memory: Tensor, memory_mask: Tensor) -> Tensor:
        emb = self.lm.get_input_embeddings()(ids)
        mem = self.memory_proj(memory.to(emb.dtype))
        if self.conditioning == "prefix":
            x = torch.cat([mem, emb], 1)
            mask = torch.cat([memory_mask.long(), torch.ones_like(ids)], 1)
            out = self.lm(inputs_embeds=x, attention_mask=mask, use_cache=False)
            return out.logits[:, mem.shape[1]:]
        out = self.lm(inputs_embeds=emb, encoder_hidden_states=mem,
                      encoder_attention_mask=memory_mask.long(), use_cache=False)
        return out.logits


class LSTMDecoder(nn.Module):
    """An LSTM LM whose state starts from the pooled memory; conditioned by prefix tokens or by
    dot-product attention over the memory at every step.

    Args:
        vocab_size: tokenizer size.
        width: LSTM width.
        layers: LSTM layers.
        memory_dim: width D of the fused tokens.
        conditioning: ``"prefix"`` or ``"cross_attention"``.
        pad_id: padding id.
    """

    def __init__(self, vocab_size: int, width: int, layers: int, memory_dim: int,
                 conditioning: str, pad_id: int = 0):
        super().__init__()
        self.conditioning = conditioning
        self.layers = layers
        self.embed = nn.Embedding(vocab_size, width, padding_idx=pad_id)
        self.memory_proj = nn.Sequential(nn.Linear(memory_dim, width), nn.LayerNorm(width))
        self.init_state = nn.Linear(width, 2 * layers * width)
        self.lstm = nn.LSTM(width, width, num_layers=layers, batch_first=True)
        self.attn_out = nn.Linear(2 * width, width)
        self.norm = nn.LayerNorm(width)
        self.head = nn.Linear(width, vocab_size)

    def forward(self, ids: Tensor, memory: Tensor, memory_mask: Tensor) -> Tensor:
        x = self.embed(ids)
        mem = self.memory_proj(memory.to(x.dtype))
        w = memory_mask.to(x.dtype).unsqueeze(-1)
        pooled = (mem * w).sum(1) / w.sum(1).clamp_min(1.0)
        b, width = pooled.shape
        h0, c0 = torch.tanh(self.init_state(pooled)).view(b, 2, self.layers, width).unbind(1)
        state = (h0.transpose(0, 1).contiguous(), c0.transpose(0, 1).contiguous())
        if self.conditioning == "prefix":
            out, _ = self.lstm(torch.cat([mem, x], 1), state)
            out = out[:, mem.shape[1]:]
        else:
            out, _ = self.lstm(x, state)
            scores = out @ mem.transpose(1, 2) / width**0.5
            scores = scores.masked_fill(~memory_mask.bool()[:, None, :], float("-inf"))
            ctx = torch.softmax(scores.float(), -1).to(out.dtype) @ mem
            out = out + self.attn_out(torch.cat([out, ctx], -1))
        return self.head(self.norm(out))


def build_decoder(kind: str, vocab_size: int, width: int, layers: int, heads: int, ffn: int,
                  max_len: int, memory_dim: int, conditioning: str, pad_id: int = 0,
                  bos_id: int = 2, eos_id: int = 3) -> nn.Module:
    """The decoder ``kind`` (``gpt2``, ``llama``, ``lstm``) built from a config at this size.

    ``max_len`` covers memory prefix + text; positions beyond it are not needed.
    """
    if kind == "lstm":
        return LSTMDecoder(vocab_size, width, layers, memory_dim, conditioning, pad_id)
    if kind == "gpt2":
        config = hf("GPT2Config")(
            vocab_size=vocab_size, n_embd=width, n_layer=layers, n_head=heads,
            n_positions=max_len, n_inner=4 * width,
            add_cross_attention=conditioning == "cross_attention",
            bos_token_id=bos_id, eos_token_id=eos_id, pad_token_id=pad_id,
            resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0)
        return HFDecoder(build_transformers_model(hf("GPT2LMHeadModel"), config), memory_dim,
                         conditioning)
    if kind == "llama":
        if conditioning != "prefix":
            raise ValueError("model.decoder=llama: transformers' Llama has no cross-attention "
                             "layers; use model.lm_conditioning=prefix or model.decoder=gpt2")
        config = hf("LlamaConfig")(
            vocab_size=vocab_size, hidden_size=width, num_hidden_layers=layers,
            num_attention_heads=heads, num_key_value_heads=heads, intermediate_size=ffn,
            max_position_embeddings=max_len, bos_token_id=bos_id, eos_token_id=eos_id,
            pad_token_id=pad_id, tie_word_embeddings=False)
        return HFDecoder(build_transformers_model(hf("LlamaForCausalLM"), config), memory_dim,
                         conditioning)
    raise ValueError(f"unknown decoder {kind!r}; choose from ['gpt2', 'llama', 'lstm']")


def sequence_nll(logits: Tensor, target_ids: Tensor, target_mask: Tensor) -> tuple[Tensor, Tensor]:
    """Teacher-forced NLL (float32). ``logits`` predict ``target_ids[:, 1:]``.

    Returns:
        Per-sample summed NLL ``(B,)`` and per-sample target token count ``(B,)``.
    """
    labels = target_ids[:, 1:]
    mask = target_mask[:, 1:].to(torch.float32)
    nll = F.cross_entropy(logits.float().transpose(1, 2), labels, reduction="none")
    return (nll * mask).sum(1), mask.sum(1)


@torch.no_grad()
def generate(decoder: nn.Module, memory: Tensor, memory_mask: Tensor, max_new_tokens: int,
             bos_id: int, eos_id: int, pad_id: int, num_beams: int = 1) -> Tensor:
    """Greedy (``num_beams=1``) or beam-search decoding from ``[BOS]``.

    Always runs exactly ``max_new_tokens`` decoder calls, with no early exit on content, so
    every rank of a ZeRO-3 job makes the same collective calls.

    Returns:
        Token ids ``(B, max_new_tokens)`` without the BOS; after EOS only ``pad_id``.
    """
    b = memory.shape[0]
    k = max(1, num_beams)
    memory = memory.repeat_interleave(k, 0)
    memory_mask = memory_mask.repeat_interleave(k, 0)
    ids = torch.full((b * k, 1), bos_id, dtype=torch.long, device=memory.device)
    scores = torch.zeros(b, k, device=memory.device)
    scores[:, 1:] = float("-inf")  # all beams start identical: keep one
    done = torch.zeros(b * k, dtype=torch.bool, device=memory.device)
    lengths = torch.zeros(b * k, device=memory.device)
    for _ in range(max_new_tokens):
        logp = torch.log_softmax(decoder(ids, memory, memory_mask)[:, -1].float(), -1)
        v = logp.shape[-1]
        # finished sequences only extend with PAD at no cost
        pad_row = torch.full_like(logp, float("-inf"))
        pad_row[:, pad_id] = 0.0
        logp = torch.where(done[:, None], pad_row, logp)
        if k == 1:
            nxt = logp.argmax(-1)
            beam_idx = torch.arange(b, device=memory.device)
        else:
            total = (scores.view(b * k, 1) + logp).view(b, k * v)
            scores, flat = total.topk(k, dim=-1)
            beam_idx = (flat // v + torch.arange(b, device=memory.device)[:, None] * k).view(-1)
            nxt = (flat % v).view(-1)
        ids = torch.cat([ids[beam_idx], nxt[:, None]], 1)
        done, lengths = done[beam_idx], lengths[beam_idx]
        lengths = lengths + (~done).float()
        done = done | (nxt == eos_id)
    if k > 1:  # length-normalised best beam
        best = (scores / lengths.view(b, k).clamp_min(1.0)).argmax(-1)
        ids = ids.view(b, k, -1)[torch.arange(b, device=ids.device), best]
    return ids[:, 1:]
