"""Language modelling: a decoder LM writes the row's target text conditioned on the fused
non-text modalities (captioning, transcription); perplexity and BLEU of greedy generations."""

from __future__ import annotations

from typing import TYPE_CHECKING, ClassVar

from torch import Tensor, nn

from mmdist.config import Config, ModelConfig
from mmdist.models.accounting import Cost, decoder_cost
from mmdist.models.decoder import build_decoder, sequence_nll
from mmdist.models.fused import Encoded, FusedModel
from mmdist.models.sizes import SizeSpec
from mmdist.tasks.base import BuildContext, Task, TaskOutput

if TYPE_CHECKING:  # torchmetrics takes 5 s to import; a model is built without it
    from mmdist.models.metrics import TaskMetrics


def decoder_problems(m: ModelConfig, role: str) -> list[str]:
    """Rules of a task that writes text with the decoder LM."""
    problems = []
    if "text" not in m.modalities:
        problems.append(f"model.modalities={m.modalities}: {role} needs 'text'")
    if m.decoder == "llama" and m.lm_conditioning == "cross_attention" \
            and not m.decoder_pretrained:
        problems.append("model.decoder=llama with model.lm_conditioning=cross_attention: "
                        "transformers' Llama has no cross-attention layers; use "
                        "model.lm_conditioning=prefix or model.decoder=gpt2/lstm")
    return problems


def make_decoder(ctx: BuildContext) -> nn.Module:
    """The decoder LM: the pretrained one of ``model.decoder_pretrained`` (or its saved
    architecture, ``extra["decoder_config"]``), else ``model.decoder`` built at this size."""
    m, s, v = ctx.cfg.model, ctx.spec, ctx.vocab
    if m.decoder_pretrained:
        # light, but only pretrained runs need it
        from mmdist.models.pretrained_lm import PretrainedDecoder, lm_config, load_causal_lm

        saved = ctx.extra.get("decoder_config")
        lm = load_causal_lm(None if saved is not None else m.decoder_pretrained,
                            config=saved)
        n_lm = lm.config.get_text_config().vocab_size
        if n_lm < v["vocab_size"]:
            raise ValueError(f"model.decoder_pretrained={m.decoder_pretrained!r}: the LM has "
                             f"{n_lm} token embeddings but the run's tokenizer has "
                             f"{v['vocab_size']} tokens; use the LM's own tokenizer (leave "
                             "data.tokenizer unset: the LM directory's tokenizer is used)")
        ctx.extra["decoder_config"] = lm_config(lm)
        return PretrainedDecoder(lm, s.hidden)
    return build_decoder(m.decoder, v["vocab_size"], s.dec_width, s.dec_layers, s.dec_heads,
                         s.dec_ffn, ctx.decoder_positions + ctx.cfg.data.max_text_len, s.hidden,
                         m.lm_conditioning, v["pad_id"], v["bos_id"], v["eos_id"])


def teacher_forced(decoder: nn.Module, memory: Tensor, mask: Tensor,
                   batch: dict[str, Tensor], prompt: tuple[Tensor, Tensor] | None = None
                   ) -> TaskOutput:
    """Token-weighted NLL of ``target_ids`` (the answer only: a ``prompt`` is read, never
    scored) and the exact-match of the argmax tokens."""
    ids, tmask = batch["target_ids"], batch["target_mask"]
    if prompt is None:
        logits = decoder(ids[:, :-1], memory, mask)
    else:
        logits = decoder(ids[:, :-1], memory, mask, prompt=prompt)
    nll, n = sequence_nll(logits, ids, tmask)
    valid = tmask[:, 1:].bool()
    correct = ((logits.argmax(-1) == ids[:, 1:]) | ~valid).all(1) & valid.any(1)
    return TaskOutput(nll.sum() / n.sum().clamp_min(1), nll / n.clamp_min(1),
                      {"nll_sum": nll, "n_tokens": n, "exact_match": correct.float(),
                       "target": ids[:, 1:]})  # without [BOS] (it may be the EOS id: GPT-2)


class LM(Task):
    name = "lm"
    group = "context"
    reads_text = False
    primary_metric = "val_loss"
    mode = "min"
    exact_match: ClassVar[bool] = False  # report the share of answers written exactly

    def __init__(self, decoder: nn.Module):
        super().__init__()
        self.decoder = decoder

    @classmethod
    def config_problems(cls, m: ModelConfig, role: str) -> list[str]:
        return decoder_problems(m, role)

    @classmethod
    def uses_decoder(cls, m: ModelConfig) -> bool:
        return True

    @classmethod
    def build(cls, ctx: BuildContext) -> LM:
        return cls(make_decoder(ctx))

    @classmethod
    def head_cost(cls, cfg: Config, spec: SizeSpec, vocab_size: int, memory_tokens: int) -> Cost:
        m = cfg.model
        return decoder_cost(m.decoder, m.lm_conditioning, spec, vocab_size,
                            cfg.data.max_text_len, memory_tokens, spec.hidden)

    @classmethod
    def metrics(cls, m: ModelConfig, vocab: dict) -> TaskMetrics:
        from mmdist.models import (
            metrics,  # torchmetrics (5 s): at evaluation only
        )
        bleu = metrics.TokenBLEU(vocab["eos_id"], vocab["special_ids"])
        return metrics.TextMetrics(cls.exact_match, bleu)

    def prompt(self, batch: dict[str, Tensor]) -> tuple[Tensor, Tensor] | None:
        """What the decoder reads before the answer besides the fused memory (none here)."""
        return None

    def loss(self, model: FusedModel, enc: Encoded, batch: dict[str, Tensor],
             evaluating: bool) -> TaskOutput:
        memory, mask, _ = model.fuse(self.group, enc)
        prompt = self.prompt(batch)
        out = teacher_forced(self.decoder, memory, mask, batch, prompt)
        if evaluating:
            out.outputs["generated"] = model.generate_from(
                self.decoder, memory, mask, model.max_text_len - 1, 1, prompt)
        return out

    def predict(self, model: FusedModel, enc: Encoded, batch: dict[str, Tensor],
                max_new_tokens: int, num_beams: int) -> dict[str, Tensor]:
        memory, mask, _ = model.fuse(self.group, enc)
        return {"tokens": model.generate_from(self.decoder, memory, mask, max_new_tokens,
                                              num_beams, self.prompt(batch))}
