"""`mmdist bench adapt`: what freezing and LoRA save, per rank. A pretrained LM with a vision and
an audio encoder, trained three ways under ZeRO-3 in one run; after one real optimizer step,
the bytes each rank holds of model, gradients and optimizer state:

    full        everything trains
    frozen      the encoders are frozen (model.freeze)
    lora        the encoders are frozen and the LM trains through LoRA adapters only

Frozen parameters take no gradient and no optimizer state (fp32 master copy + Adam moments),
so what they save grows with the share of the model they are. Runs in this process on one rank
(gloo), so every byte is counted once.

With no pretrained directories given, random stand-ins of the preset's shapes are saved with
``save_pretrained`` to a temporary directory first (a Llama-shaped LM, a SigLIP tower, a
Whisper encoder); the bytes depend on the shapes, not on the weights.
"""

from __future__ import annotations

import argparse
import tempfile
from pathlib import Path
from typing import Any

from mmdist.arguments import add_config_arguments
from mmdist.config import Config, load_config

VARIANTS = {
    "full": {"model.freeze": [], "model.lora": None},
    "frozen": {"model.freeze": ["image_encoder", "audio_encoder"], "model.lora": None},
    "lora": {"model.freeze": ["image_encoder", "audio_encoder"], "model.lora": {"r": 8}},
}
KEYS = ("decoder_pretrained", "image_pretrained", "audio_pretrained")


def configure_parser(parser: argparse.ArgumentParser) -> None:
    add_config_arguments(parser, default="mmlm_stage1")
    parser.add_argument("--lm-width", type=int, default=256,
                        help="stand-in LM width when model.decoder_pretrained is not a local "
                             "directory (default 256)")
    parser.add_argument("--lm-layers", type=int, default=4,
                        help="stand-in LM layers (default 4)")


def stand_ins(root: Path, cfg: Config, width: int, layers: int) -> dict[str, str]:
    """Random models saved with ``save_pretrained`` for each pretrained key of ``cfg`` that is
    not a local directory: key -> directory."""
    import transformers  # heavy: not loaded for --help

    from mmdist.data.tokenizer import TextTokenizer

    out: dict[str, str] = {}
    m = cfg.model
    if not (m.decoder_pretrained and Path(m.decoder_pretrained).is_dir()):
        d = root / "lm"
        words = [f"word{i}" for i in range(2000)]
        tok = TextTokenizer.train([" ".join(words[i:i + 8]) for i in range(0, 2000, 8)], 2000)
        tok.save(d)
        transformers.LlamaForCausalLM(transformers.LlamaConfig(
            vocab_size=tok.vocab_size, hidden_size=width, num_hidden_layers=layers,
            num_attention_heads=max(1, width // 64), intermediate_size=4 * width,
            max_position_embeddings=512)).save_pretrained(d)
        out["decoder_pretrained"] = str(d)
    if not (m.image_pretrained and Path(m.image_pretrained).is_dir()):
        d = root / "vision"
        transformers.SiglipVisionModel(transformers.SiglipVisionConfig(
            hidden_size=192, intermediate_size=768, num_hidden_layers=4, num_attention_heads=3,
            image_size=64, patch_size=16)).save_pretrained(d)
        transformers.SiglipImageProcessor(size={"height": 64, "width": 64}).save_pretrained(d)
        out["image_pretrained"] = str(d)
    if not (m.audio_pretrained and Path(m.audio_pretrained).is_dir()):
        d = root / "audio"
        transformers.WhisperModel(transformers.WhisperConfig(
            d_model=192, encoder_layers=4, decoder_layers=1, encoder_attention_heads=3,
            decoder_attention_heads=3, encoder_ffn_dim=768, decoder_ffn_dim=768,
            num_mel_bins=80, max_source_positions=50, vocab_size=64, pad_token_id=0,
            bos_token_id=1, eos_token_id=2, decoder_start_token_id=1)).save_pretrained(d)
        transformers.WhisperFeatureExtractor(feature_size=80, chunk_length=1).save_pretrained(d)
        out["audio_pretrained"] = str(d)
    return out


def measure(cfg: Config) -> dict[str, int]:
    """Bytes per rank after one optimizer step of ``cfg`` under ZeRO-3 on this process's rank."""
    import torch  # heavy: not loaded for --help

    from mmdist.bench.zero import zero3_bytes
    from mmdist.data.hf_audio import AudioFeatures
    from mmdist.data.schema import random_batch
    from mmdist.data.tokenizer import TextTokenizer
    from mmdist.train.engine import build_engine

    tok = TextTokenizer.load(cfg.tokenizer_path)
    engine = build_engine(cfg, tok.model_vocab(), world_size=1, total_steps=10)
    d = cfg.data
    feats = AudioFeatures(cfg.model.audio_pretrained, d.sample_rate)
    n = int(round(d.sample_rate * d.audio_seconds))
    batch = random_batch(cfg.train.micro_batch_size, tok.vocab_size, d.max_text_len,
                         d.image_size, 1, 1)
    batch["audio"] = torch.from_numpy(feats(torch.randn(len(batch["audio"]), n).numpy()))
    engine.backward(engine(batch)["loss"])
    engine.step()
    out = zero3_bytes(engine)
    out["trainable_params"] = sum(p.ds_numel for p in engine.module.parameters()
                                  if p.requires_grad)
    out["params"] = sum(p.ds_numel for p in engine.module.parameters())
    engine.destroy()
    return out


def run(args: argparse.Namespace) -> dict[str, Any]:
    import torch  # heavy: not loaded for --help

    from mmdist.bench.process_group import single_process_group
    from mmdist.train.startable import processor_settings

    base = load_config(args.config, args.overrides)
    results: dict[str, dict[str, int]] = {}
    with tempfile.TemporaryDirectory() as tmp:
        made = stand_ins(Path(tmp), base, args.lm_width, args.lm_layers)
        if made:
            print(f"random stand-ins for {', '.join(f'model.{k}' for k in made)} "
                  f"(LM width {args.lm_width}, {args.lm_layers} layers)")
        base = base.override({**{f"model.{k}": v for k, v in made.items()},
                              "model.init_from": None,
                              "train.use_gpu": False, "train.num_workers": 1,
                              "train.zero_stage": 3, "train.micro_batch_size": 2,
                              "train.global_batch_size": 0})
        base = processor_settings(base)
        with single_process_group(torch.device("cpu")):
            for name, changes in VARIANTS.items():
                results[name] = measure(base.override(changes))
                print(f"  measured {name}", flush=True)
    mib, full = 2**20, results["full"]["total_bytes"]
    print(f"{'ZeRO-3 bytes per rank':<22}{'trainable':>12}{'model':>10}{'grads':>10}"
          f"{'optimizer':>11}{'total':>10}{'vs full':>9}")
    for name, r in results.items():
        print(f"{name:<22}{r['trainable_params']:>12,}{r['model_bytes'] / mib:>8.1f}Mi"
              f"{r['grad_bytes'] / mib:>8.1f}Mi{r['optimizer_bytes'] / mib:>9.1f}Mi"
              f"{r['total_bytes'] / mib:>8.1f}Mi{r['total_bytes'] / full:>9.3f}")
    return {"variants": results,
            "ratios": {k: v["total_bytes"] / full for k, v in results.items()}}
