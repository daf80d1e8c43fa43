"""Prompted generation with a pretrained LM, as LLaVA trains it: the fused non-text modalities
lead, the row's ``text`` is the instruction or prompt, the ``target`` is the answer, and only the
answer's tokens are scored. One task for captioning ("describe the image"), visual and audio
question answering, speech-to-text and multimodal translation (source text + image -> target
text). Generation is the LM's own ``generate`` (KV cache, greedy or beam search)."""

from __future__ import annotations

from typing import TYPE_CHECKING

from torch import Tensor

from mmdist.config import ModelConfig
from mmdist.models.fused import Encoded, FusedModel
from mmdist.tasks.base import TaskOutput
from mmdist.tasks.lm import LM, teacher_forced

if TYPE_CHECKING:  # torchmetrics takes 5 s to import; a model is built without it
    from mmdist.models.metrics import TaskMetrics


def prompt_of(batch: dict[str, Tensor]) -> tuple[Tensor, Tensor]:
    """The prompt tokens of a batch: the row's tokenised ``text`` and its mask."""
    return batch["input_ids"], batch["attention_mask"]


class Prompted(LM):
    name = "prompted"
    group = "context"
    reads_text = False  # the text is the LM's prompt, not an encoder input

    @classmethod
    def config_problems(cls, m: ModelConfig, role: str) -> list[str]:
        problems = super().config_problems(m, role)
        if not m.decoder_pretrained:
            problems.append(f"model.decoder_pretrained is not set: {role} prompts a pretrained "
                            "causal LM (a local Hugging Face directory); for a decoder trained "
                            "from scratch use task lm")
        return problems

    @classmethod
    def metrics(cls, m: ModelConfig, vocab: dict) -> TaskMetrics:
        from mmdist.models import (
            metrics,  # torchmetrics (5 s): at evaluation only
        )
        bleu = metrics.TokenBLEU(vocab["eos_id"], vocab["special_ids"])
        return metrics.TextMetrics(True, bleu)

    def loss(self, model: FusedModel, enc: Encoded, batch: dict[str, Tensor],
             evaluating: bool) -> TaskOutput:
        memory, mask, _ = model.fuse(self.group, enc)
        prompt = prompt_of(batch)
        out = teacher_forced(self.decoder, memory, mask, batch, prompt)
        if evaluating:
            out.outputs["generated"] = model.generate_from(
                self.decoder, memory, mask, model.max_text_len - 1, 1, prompt)
        return out

    def predict(self, model: FusedModel, enc: Encoded, batch: dict[str, Tensor],
                max_new_tokens: int, num_beams: int) -> dict[str, Tensor]:
        memory, mask, _ = model.fuse(self.group, enc)
        return {"tokens": model.generate_from(self.decoder, memory, mask, max_new_tokens,
                                              num_beams, prompt_of(batch))}
