"""Multimodal translation, image + text against text alone, on the ambiguous-word synthetic
source (``mmdist.data.mmt``): two tiny prompted models trained in this process on CPU (plain
AdamW, no Ray, no DeepSpeed) from real shards, scored on the same val rows.

    python -m tests.unit.mmt_gap [STEPS [SEED]]   # one JSON line with both models' figures

The LM is a tiny random Llama saved with ``save_pretrained`` (its byte-level BPE tokenizer
trained on the source's sentences), loaded through mmdist's real loading path and trained in
full; the image encoder is the from-scratch CNN. The text-only model is the same config with
``model.modalities=[text]`` (the LM then reads one learned null token in place of the image).
"""

from __future__ import annotations

import json
import sys
import tempfile
import time
from pathlib import Path

import torch

from mmdist.config import Config, load_config
from mmdist.data.mmt import MMTSource, generate_row, noun_correct
from mmdist.data.prepare import convert, prepared_data
from mmdist.data.preprocess import PreprocessSpec, arrow_to_numpy, preprocess_batch
from mmdist.data.schema import as_tensors
from mmdist.data.shards import canonical_batches, load_tokenizer
from mmdist.models import build_model
from mmdist.tasks import compute_metrics
from tests.tiny_hf import tiny_lm

ROWS, SEED, IMAGE_SIZE = 1200, 0, 32
# the preset at tiny size, the LM trained in full (it is random: LoRA would have nothing to adapt)
TINY = ["model.size=tiny", f"data.image_size={IMAGE_SIZE}", "data.max_text_len=10",
        "data.val_fraction=0.2", "model.lora=null", "model.modality_tokens={image: 4}"]


def make_lm(path: Path) -> Path:
    """A tiny random Llama whose tokenizer holds every word of both languages whole."""
    texts = [t for i in range(200) for t in (generate_row(i, 99, 8).text,
                                             generate_row(i, 99, 8).target)]
    torch.manual_seed(0)
    return tiny_lm(path, "llama", hidden=64, layers=2, texts=texts, vocab_size=400)


def make_data(out: Path, lm_dir: Path, rows: int = ROWS) -> Path:
    """Shards of the mmt source, tokenised with the LM's tokenizer (``mmdist prepare``'s code)."""
    cfg = load_config("ref_mmt", [*TINY, f"model.decoder_pretrained={lm_dir}"])
    convert(MMTSource(rows, SEED, IMAGE_SIZE), out, prepared_data(cfg), seed=SEED,
            parallel="local")
    return out


def config(lm_dir: Path, modalities: str, *overrides: str) -> Config:
    image = (["model.aux_classes={image: 8}"] if "image" in modalities
             else ["model.aux_weight=0", "model.modality_tokens={}"])
    return load_config("ref_mmt", [*TINY, f"model.decoder_pretrained={lm_dir}",
                                   f"model.modalities={modalities}", *image, *overrides])


def batches(data_dir: Path, split: str, cfg: Config, tok, size: int) -> list[dict]:
    spec = PreprocessSpec.from_config(cfg.data, augment=False)
    return [as_tensors(preprocess_batch(arrow_to_numpy(t), spec, tok))
            for t in canonical_batches(data_dir, split, size)]


def train_and_score(data_dir: Path, lm_dir: Path, modalities: str, steps: int = 500,
                    lr: float = 3e-3, batch_size: int = 32, seed: int = 0) -> dict[str, float]:
    """Train one model for ``steps`` AdamW steps; its val metrics (``val_bleu``: sacreBLEU
    corpus BLEU 0..1, ``val_accuracy``: exact translations) and ``noun_accuracy``: the share of
    val rows with an ambiguous noun whose translation names the sense the image shows."""
    threads = torch.get_num_threads()
    # one thread: tiny ops on a shared 2-core machine run several times faster than on two
    torch.set_num_threads(1)
    try:
        return _train_and_score(data_dir, lm_dir, modalities, steps, lr, batch_size, seed)
    finally:
        torch.set_num_threads(threads)


def _train_and_score(data_dir: Path, lm_dir: Path, modalities: str, steps: int, lr: float,
                     batch_size: int, seed: int) -> dict[str, float]:
    t0 = time.perf_counter()
    cfg = config(lm_dir, modalities)
    tok = load_tokenizer(data_dir)
    train, val = (batches(data_dir, s, cfg, tok, batch_size) for s in ("train", "val"))
    torch.manual_seed(seed)
    model = build_model(cfg, **tok.model_vocab())
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=lr,
                            weight_decay=0.01)
    model.train()
    for step in range(steps):
        for group in opt.param_groups:  # linear warm-up, then linear decay to 10 %
            group["lr"] = lr * min((step + 1) / 30, 1.0 - 0.9 * step / steps)
        loss = model(train[step % len(train)])["loss"]
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
    model.eval()
    with torch.no_grad():
        outs = [model.eval_outputs(b) for b in val]
    merged = {k: torch.cat([o[k] for o in outs]) for k in outs[0]}
    metrics = compute_metrics(cfg, merged, model.vocab, tok)
    sample_ids = torch.cat([b["sample_id"] for b in val]).tolist()
    hits = []
    for sid, ids in zip(sample_ids, merged["prompted.generated"].tolist()):
        row = generate_row(sid, SEED, IMAGE_SIZE)
        if row.ambiguous:
            hits.append(noun_correct(tok.decode(ids), row))
    return {"val_bleu": metrics["val_bleu"], "val_accuracy": metrics["val_accuracy"],
            "noun_accuracy": sum(hits) / len(hits), "ambiguous_rows": len(hits),
            "val_rows": len(sample_ids), "final_train_loss": float(loss.detach()),
            "seconds": round(time.perf_counter() - t0, 1)}


def measure(root: Path, steps: int = 500, seed: int = 0) -> dict[str, dict[str, float]]:
    """Both models on one shard set, initialised from ``seed``:
    ``{"image_text": {...}, "text_only": {...}}``."""
    lm_dir = make_lm(root / "lm")
    data = make_data(root / "data", lm_dir)
    out = {}
    for name, modalities in (("image_text", "[text, image]"), ("text_only", "[text]")):
        out[name] = train_and_score(data, lm_dir, modalities, steps, seed=seed)
        print(name, out[name], file=sys.stderr)
    return out


if __name__ == "__main__":
    steps = int(sys.argv[1]) if len(sys.argv) > 1 else 500
    seed = int(sys.argv[2]) if len(sys.argv) > 2 else 0
    with tempfile.TemporaryDirectory() as d:
        print(json.dumps(measure(Path(d), steps, seed)))
