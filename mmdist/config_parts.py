"""The parts of the fused model that ``model.freeze`` and ``model.lora.components`` name, and the
config rules about them. ``mmdist.models.adapt`` says which parameters each part holds.

    text_encoder, image_encoder, audio_encoder   a modality's encoder, less its projector
    video_frame_encoder   the image encoder a video model runs on every frame (weights of its
                          own: a model of image and video has two image encoders)
    video_temporal        what mixes the frames (time embedding, temporal transformer); none
                          for model.video_temporal=mean
    video_encoder         both video parts (a name for the pair, :data:`FREEZE_GROUPS`)
    projectors            every projector, fusion, trunk and task head
    decoder               the LM inside a task's decoder
"""

from __future__ import annotations

from typing import Any

COMPONENTS = ("text_encoder", "image_encoder", "audio_encoder", "video_encoder",
              "video_frame_encoder", "video_temporal", "projectors", "decoder")
LORA_COMPONENTS = ("decoder", "text_encoder", "image_encoder", "audio_encoder")
# model.freeze names that stand for several components
FREEZE_GROUPS = {"video_encoder": ("video_frame_encoder", "video_temporal")}


def part_problems(m: Any, decodes: bool) -> list[tuple[bool, str]]:
    """``(failed, message)`` of ``model.freeze`` and ``model.lora.components`` for the model
    config ``m`` (a ``ModelConfig``) whose task has a decoder LM when ``decodes``."""
    mods = m.modalities
    video = "video" in mods
    present = {"decoder": decodes, "projectors": True,
               **{f"{x}_encoder": x in mods for x in ("text", "image", "audio", "video")},
               "video_frame_encoder": video,
               "video_temporal": video and m.video_temporal != "mean"}
    tuned = {"decoder": m.decoder_pretrained,
             **{f"{x}_encoder": getattr(m, f"{x}_pretrained") for x in ("text", "image", "audio")}}

    def absent(c: str) -> str:
        if c == "video_temporal" and video:
            return ("model.freeze: 'video_temporal' has no parameters with "
                    "model.video_temporal=mean")
        hint = ("; a video's frames have an encoder of their own: video_frame_encoder"
                if c == "image_encoder" and video else "")
        return (f"model.freeze: {c!r} is not part of this model (model.modalities={mods}, "
                f"task {m.task!r}){hint}")

    return [*((not present[c], absent(c)) for c in m.freeze),
            *((not tuned[c], f"model.lora.components: {c!r} has no pretrained weights to adapt;"
               f" set model.{c.replace('_encoder', '')}_pretrained")
              for c in (m.lora.components if m.lora else []))]
