"""A pretrained causal LM from a local Hugging Face directory as mmdist's decoder, as in LLaVA:
fused modality tokens go through a two-layer MLP projector into the LM's embedding space and
lead the sequence, an optional prompt (the row's ``text``) follows, then the answer.

    lm = load_causal_lm("/models/qwen2-0.5b", "model.decoder_pretrained")
    decoder = PretrainedDecoder(lm, memory_dim=256)
    logits = decoder(target_ids[:, :-1], memory, memory_mask, prompt=(input_ids, attention_mask))
    ids = decoder.generate_ids(memory, memory_mask, prompt, max_new_tokens=31, num_beams=1, ...)

Any architecture ``AutoModelForCausalLM`` knows works (Llama, Qwen2, Mistral, Phi, GPT-2, ...):
the decoder only calls ``get_input_embeddings``, ``forward(inputs_embeds=, attention_mask=,
position_ids=)`` and ``generate``. Generation is the LM's own ``generate`` (KV cache, greedy or
beam search). Nothing is downloaded: a path that is not a local directory is an error.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from mmdist.models.transformers_init import build_transformers_model, local_model_dir


def causal_lm_class(config: Any) -> type:
    """The transformers class ``AutoModelForCausalLM`` builds for a config (importing it)."""
    from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING

    return MODEL_FOR_CAUSAL_LM_MAPPING[type(config)]


def preload_causal_lm(path: str) -> None:
    """Import the transformers module of the LM in ``path`` (before ``zero.Init``)."""
    import transformers  # heavy: on first use (see transformers_init)

    if (Path(path) / "config.json").is_file():
        causal_lm_class(transformers.AutoConfig.from_pretrained(path, local_files_only=True))


def load_causal_lm(path: str | None, key: str = "model.decoder_pretrained",
                   config: dict[str, Any] | None = None) -> nn.Module:
    """``AutoModelForCausalLM`` from the local directory ``path`` (weights loaded), or, with
    ``config`` (a saved ``lm.config.to_dict()``), the same architecture with fresh weights and
    no file access (a saved mmdist model's weights follow).

    Inside ``deepspeed.zero.Init`` (ZeRO-3) transformers loads the weights straight into the
    partitioned parameters, so no rank holds the whole model.
    """
    import transformers  # heavy: on first use (see transformers_init)

    transformers.utils.logging.disable_progress_bar()  # per-tensor bars: noise on the screen
    if config is not None:
        cfg = transformers.AutoConfig.for_model(**config)
        return build_transformers_model(causal_lm_class(cfg), cfg)
    if path is None:
        raise ValueError(f"{key} is not set and no saved LM config was given")
    p = local_model_dir(path, key)
    return transformers.AutoModelForCausalLM.from_pretrained(
        str(p), use_safetensors=True, local_files_only=True, dtype=torch.float32)


def lm_config(lm: nn.Module) -> dict[str, Any]:
    """What :func:`load_causal_lm` needs to rebuild ``lm``'s architecture without its files."""
    return lm.config.to_dict()


def position_ids(mask: Tensor) -> Tensor:
    """Positions counting only the real tokens (padding in the middle keeps the positions of
    what follows contiguous); the rule transformers' ``generate`` uses, so teacher forcing and
    generation place every token alike."""
    pos = mask.long().cumsum(-1) - 1
    return pos.masked_fill(mask == 0, 1)


class PretrainedDecoder(nn.Module):
    """A causal LM conditioned on fused tokens through an MLP projector (LLaVA's ``mlp2x_gelu``).

    Args:
        lm: a transformers causal LM.
        memory_dim: width D of the fused tokens.
    """

    conditioning = "prefix"

    def __init__(self, lm: nn.Module, memory_dim: int):
        super().__init__()
        self.lm = lm
        width = lm.config.get_text_config().hidden_size  # not a weight shape: ZeRO-3 partitions
        self.memory_proj = nn.Sequential(nn.Linear(memory_dim, width), nn.GELU(),
                                         nn.Linear(width, width))

    def _inputs(self, ids: Tensor, ids_mask: Tensor, memory: Tensor, memory_mask: Tensor,
                prompt: tuple[Tensor, Tensor] | None) -> tuple[Tensor, Tensor]:
        embed = self.lm.get_input_embeddings()
        parts, masks = [], []
        mem = self.memory_proj(memory.to(self.memory_proj[0].weight.dtype))
        parts.append(mem)
        masks.append(memory_mask.long())
        if prompt is not None:
            p_ids, p_mask = prompt
            p_mask = p_mask.long()
            # the prompt's own end token would tell the LM the text is over: cut it
            parts.append(embed(p_ids[:, :-1]))
            masks.append(p_mask[:, 1:] * p_mask[:, :-1])  # drops each row's last real token
        parts.append(embed(ids))
        masks.append(ids_mask.long())
        x = torch.cat([p.to(mem.dtype) for p in parts], 1)
        return x, torch.cat(masks, 1)

    def forward(self, ids: Tensor, memory: Tensor, memory_mask: Tensor,
                prompt: tuple[Tensor, Tensor] | None = None) -> Tensor:
        """Logits ``(B, T, V)`` at the positions of ``ids`` (teacher forcing)."""
        x, mask = self._inputs(ids, torch.ones_like(ids), memory, memory_mask, prompt)
        out = self.lm(inputs_embeds=x, attention_mask=mask, position_ids=position_ids(mask),
                      use_cache=False)
        return out.logits[:, -ids.shape[1]:]

    @torch.no_grad()
    def generate_ids(self, memory: Tensor, memory_mask: Tensor,
                     prompt: tuple[Tensor, Tensor] | None, max_new_tokens: int, num_beams: int,
                     bos_id: int, eos_id: int, pad_id: int) -> Tensor:
        """Token ids ``(B, max_new_tokens)`` the LM's ``generate`` writes after ``[BOS]``
        (greedy, or beam search); after EOS only ``pad_id``. Under ZeRO-3 every rank runs the
        same number of forward passes (``synced_gpus``)."""
        b = memory.shape[0]
        bos = torch.full((b, 1), bos_id, dtype=torch.long, device=memory.device)
        x, mask = self._inputs(bos, torch.ones_like(bos), memory, memory_mask, prompt)
        out = self.lm.generate(
            inputs_embeds=x, attention_mask=mask, max_new_tokens=max_new_tokens,
            num_beams=max(1, num_beams), do_sample=False, bos_token_id=bos_id,
            eos_token_id=eos_id, pad_token_id=pad_id, synced_gpus=_zero3_synced(self.lm),
            use_cache=True)
        out = out[:, -max_new_tokens:] if out.shape[1] > max_new_tokens else out
        ids = torch.full((b, max_new_tokens), pad_id, dtype=torch.long, device=memory.device)
        ids[:, :out.shape[1]] = out
        # after the first EOS only padding (generate pads finished rows already; a beam may not)
        ended = (ids == eos_id).long().cumsum(1) - (ids == eos_id).long() > 0
        return ids.masked_fill(ended, pad_id)


def _zero3_synced(module: nn.Module) -> bool:
    """Whether ``module``'s parameters are ZeRO-3 partitioned in a multi-rank job (then every
    rank must run each forward pass together)."""
    p = next(module.parameters(), None)
    if p is None or not hasattr(p, "ds_id"):
        return False
    return torch.distributed.is_initialized() and torch.distributed.get_world_size() > 1
