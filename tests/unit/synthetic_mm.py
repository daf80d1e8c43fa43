"""Tensor-level synthetic multimodal batches per the batch contract (mmdist.data.schema),
for model tests. The class of a sample sets the image colour (and the video's), the audio pitch
(a bright mel band) and a colour word in the text, so matching text against image/audio needs fusion while
text alone carries no match information."""

from __future__ import annotations

import torch

from mmdist.config import Config, load_config
from mmdist.data.schema import BOS_ID, EOS_ID, PAD_ID, audio_frames

COLOURS = torch.tensor([[220, 30, 30], [30, 200, 40], [40, 60, 220], [230, 220, 40],
                        [200, 40, 200], [40, 210, 210], [240, 140, 20], [120, 120, 120]],
                       dtype=torch.float32)
FIRST_WORD = 10  # ids below are specials / filler
VOCAB = 64


def tiny_config(*overrides: str) -> Config:
    """The shipped tiny preset with overrides (image 32 px, 16 mels, 0.5 s, 16 tokens) and 8
    classes (a model built without shards must be told: model.num_classes=0 reads the data)."""
    return load_config("tiny", ["model.num_classes=8", *overrides])


def classes_without_equal_neighbours(n: int, n_classes: int, g: torch.Generator) -> torch.Tensor:
    """Classes such that sample i and i-1 (cyclically) differ, so rolled ITM negatives are
    real mismatches."""
    c = torch.empty(n, dtype=torch.long)
    c[0] = torch.randint(n_classes, (1,), generator=g)
    for i in range(1, n):
        c[i] = (c[i - 1] + torch.randint(1, n_classes, (1,), generator=g)) % n_classes
    if n > 2 and c[-1] == c[0]:
        choices = [k for k in range(n_classes) if k not in (c[-2].item(), c[0].item())]
        c[-1] = choices[torch.randint(len(choices), (1,), generator=g).item()]
    return c


def make_video(cls: torch.Tensor, k: int, s: int, g: torch.Generator) -> torch.Tensor:
    """uint8 ``(B, k, 3, s, s)``: the class colour, with a bright bar that moves one way or the
    other by class parity (the motion needs the frames in order)."""
    b = len(cls)
    video = (COLOURS[cls].view(b, 1, 3, 1, 1) + torch.randn(b, k, 3, s, s, generator=g) * 25)
    for t in range(k):
        col = torch.where(cls % 2 == 0, t, -t - 1) % s
        video[torch.arange(b), t, :, :, col] = 255.0
    return video.clamp(0, 255).to(torch.uint8)


def make_batch(cfg: Config, batch_size: int = 8, n_classes: int = 4, seed: int = 0,
               has: dict[str, bool] | None = None) -> dict[str, torch.Tensor]:
    """One batch per the contract. ``has`` sets presence of each modality (default all);
    ``video`` holds ``data.video_frames`` frames when the model lists video, else none."""
    g = torch.Generator().manual_seed(seed)
    d = cfg.data
    b, s, L = batch_size, d.image_size, d.max_text_len
    frames = audio_frames(d.sample_rate, d.audio_seconds, d.hop_length)
    cls = classes_without_equal_neighbours(b, n_classes, g)

    noise = torch.randn(b, 3, s, s, generator=g) * 25
    image = (COLOURS[cls].view(b, 3, 1, 1) + noise).clamp(0, 255).to(torch.uint8)
    audio = torch.randn(b, d.n_mels, frames, generator=g) * 0.5 - 4.0
    band = (cls * d.n_mels) // n_classes + d.n_mels // (2 * n_classes)
    audio[torch.arange(b), band, :] += 6.0

    # text: [BOS] filler... colour-word filler... [EOS] [PAD]...; the word sits at a random place
    n_words = torch.randint(3, L - 2, (b,), generator=g)
    ids = torch.full((b, L), PAD_ID, dtype=torch.long)
    mask = torch.zeros(b, L, dtype=torch.long)
    for i in range(b):
        n = n_words[i].item()
        words = torch.randint(FIRST_WORD + n_classes, VOCAB, (n,), generator=g)
        words[torch.randint(n, (1,), generator=g)] = FIRST_WORD + cls[i]
        ids[i, 0], ids[i, 1:n + 1], ids[i, n + 1] = BOS_ID, words, EOS_ID
        mask[i, : n + 2] = 1
    # target: a short caption naming the class
    target = torch.full((b, L), PAD_ID, dtype=torch.long)
    target[:, 0], target[:, 1], target[:, 2] = BOS_ID, FIRST_WORD + cls, EOS_ID
    tmask = (target != PAD_ID).long()
    has = has or {}
    batch = {
        "sample_id": torch.arange(b, dtype=torch.long) + seed * b,
        "input_ids": ids, "attention_mask": mask,
        "target_ids": target, "target_mask": tmask,
        "label": cls.clone(), "label_image": cls.clone(), "label_audio": cls.clone(),
        "image": image, "audio": audio,
    }
    batch["video"] = make_video(cls, d.video_frames if "video" in cfg.model.modalities else 0,
                                s, g)
    for m in ("text", "image", "audio", "video"):
        present = has.get(m, True) and (m != "video" or batch["video"].shape[1] > 0)
        batch[f"has_{m}"] = torch.full((b,), present, dtype=torch.bool)
        if not present:
            key = {"text": "input_ids", "image": "image", "audio": "audio", "video": "video"}[m]
            batch[key] = torch.zeros_like(batch[key])
            if m == "text":
                batch["attention_mask"] = torch.zeros_like(mask)
    return batch
