"""Prompted generation with a pretrained LM, as LLaVA trains it: the fused non-text modalities
lead, the row's ``text`` is the instruction or prompt, the ``target`` is the answer, and only the
answer's tokens are scored. One task for captioning ("describe the image"), visual and audio
question answering, speech-to-text and multimodal translation (source text + image -> target
text). Generation is the LM's own ``generate`` (KV cache, greedy or beam search)."""

from __future__ import annotations

from torch import Tensor

from mmdist.config import ModelConfig
from mmdist.tasks.lm import LM


class Prompted(LM):
    name = "prompted"
    group = "context"
    reads_text = False  # the text is the LM's prompt, not an encoder input
    exact_match = True

    @classmethod
    def config_problems(cls, m: ModelConfig, role: str) -> list[str]:
        problems = super().config_problems(m, role)
        if not m.decoder_pretrained:
            problems.append(f"model.decoder_pretrained is not set: {role} prompts a pretrained "
                            "causal LM (a local Hugging Face directory); for a decoder trained "
                            "from scratch use task lm")
        return problems

    def prompt(self, batch: dict[str, Tensor]) -> tuple[Tensor, Tensor]:
        """The row's tokenised ``text`` and its mask."""
        return batch["input_ids"], batch["attention_mask"]
