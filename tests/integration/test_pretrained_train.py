"""The two-stage recipe on pretrained parts, end to end on a real local Ray, real DeepSpeed
(gloo) and a real MLflow store: tiny random Llama LM, SigLIP vision tower and Whisper encoder
saved with ``save_pretrained``, loaded through mmdist's real loading path (no hub:
``HF_HUB_OFFLINE=1``).

Stage 1: 2 ranks, ZeRO-3, only the projectors train; consolidated, registered, pulled and
served with the LM's own tokenizer. Stage 2 starts from stage 1's registered model
(``models:/NAME@champion``) with LoRA on the LM: registered as plain weights + the adapter.
"""

from __future__ import annotations

import os
import subprocess
import sys

import pandas as pd
import pytest
import torch
from mlflow.tracking import MlflowClient
from safetensors.torch import load_file

from mmdist.config import load_config
from mmdist.data.tokenizer import TextTokenizer
from mmdist.serve.batch import evaluate_distributed
from mmdist.serve.predictor import Predictor
from mmdist.serve.pull import pull
from mmdist.train.run import ensure_data, train
from tests.tiny_hf import MODELS, tiny_lm

os.environ["HF_HUB_OFFLINE"] = "1"


@pytest.fixture(scope="module")
def parts(tmp_path_factory):
    root = tmp_path_factory.mktemp("pretrained")
    torch.manual_seed(0)
    dirs = {"decoder": tiny_lm(root / "llama", "llama")}
    for key, name in (("image", "siglip"), ("audio", "whisper")):
        MODELS[name][0](root / name)
        dirs[key] = root / name
    return dirs


def _cfg(parts, tmp, *overrides):
    uri = f"sqlite:///{tmp / 'mlflow.db'}"
    return load_config("tiny", [
        "model.task=prompted", f"model.decoder_pretrained={parts['decoder']}",
        f"model.image_pretrained={parts['image']}", f"model.audio_pretrained={parts['audio']}",
        "model.modality_tokens={image: 8, audio: 8}", "data.synthetic_samples=160",
        "data.max_text_len=16", f"tracking.tracking_uri={uri}",
        f"train.storage_path={tmp / 'runs'}", "train.log_every=1", *overrides])


def test_two_stages_on_pretrained_parts(ray_local, parts, tmp_path):
    stage1 = _cfg(parts, tmp_path, "train.num_workers=2", "train.zero_stage=3",
                  "train.max_steps=6", "train.lr=0.003",
                  "model.freeze=[image_encoder,audio_encoder,decoder]",
                  "tracking.model_name=pt-stage1")
    data = ensure_data(stage1, tmp_path / "data")
    # the LM's tokenizer is the run's: the shards were tokenised with it
    saved_tok = TextTokenizer.load(data / "tokenizer")
    assert saved_tok.vocab_size == TextTokenizer.load(parts["decoder"]).vocab_size
    s1 = train(stage1.override({"data.path": str(data)}))
    assert s1["global_step"] == 6 and s1["alias"] == "champion"
    uri = stage1.tracking.tracking_uri

    # registered: plain safetensors, the LM's tokenizer, the audio extractor's settings
    m1 = tmp_path / "stage1"
    pull("models:/pt-stage1@champion", m1, uri)
    weights = load_file(str(m1 / "model.safetensors"))
    lm_saved = load_file(str(parts["decoder"] / "model.safetensors"))
    for k, v in lm_saved.items():  # frozen through ZeRO-3 training and consolidation
        assert torch.equal(weights[f"tasks.prompted.decoder.lm.{k}"], v), k
    assert (m1 / "audio_processor" / "preprocessor_config.json").exists()
    p1 = Predictor.from_dir(m1)
    val = pd.read_parquet(data / "val").head(3)
    answers = p1.predict_frame(val[["text", "image", "audio"]])
    assert len(answers) == 3 and all(isinstance(t, str) for t in answers["text"])
    ev1 = p1.evaluate_dir(data, split="val")
    assert {"val_loss", "val_bleu", "val_accuracy"} <= set(ev1)
    assert ev1["val_loss"] == pytest.approx(s1["metrics"]["val_loss"], rel=1e-4)
    # `mmdist evaluate`: Ray Data actors, fresh processes, the pulled directory alone
    dist = evaluate_distributed(m1, data, "val", actors=1)
    assert dist["val_loss"] == pytest.approx(ev1["val_loss"], rel=1e-5)

    # stage 2 from the registered stage 1, LoRA on the LM. lr ~0: the model it ends with is
    # the one it started from, so its val loss is stage 1's exactly (LoRA starts at zero)
    stage2 = _cfg(parts, tmp_path, "train.num_workers=1", "train.zero_stage=2",
                  "train.max_steps=2", "train.lr=1e-12", "train.warmup_steps=0",
                  "model.freeze=[image_encoder,audio_encoder]", "model.lora={r: 4}",
                  "model.init_from=models:/pt-stage1@champion", "tracking.model_name=pt-stage2",
                  f"data.path={data}")
    s2 = train(stage2)
    assert s2["metrics"]["val_loss"] == pytest.approx(ev1["val_loss"], abs=2e-3)
    first = MlflowClient(uri).get_metric_history(s1["run_id"], "train_loss")
    assert abs(s2["metrics"]["val_loss"] - first[0].value) > 0.05  # not a fresh start

    m2 = tmp_path / "stage2"
    pull("models:/pt-stage2@champion", m2, uri)
    assert not any("lora" in k for k in load_file(str(m2 / "model.safetensors")))
    assert (m2 / "adapter" / "decoder" / "adapter_model.safetensors").exists()
    p2 = Predictor.from_dir(m2)  # its config has no LoRA: it loads without peft
    assert p2.cfg.model.lora is None
    assert len(p2.predict_frame(val[["text", "image", "audio"]])) == 3
    import mlflow

    mlflow.set_tracking_uri(uri)  # the MLflow pyfunc users load
    pyfunc = mlflow.pyfunc.load_model("models:/pt-stage2@champion")
    got = pyfunc.predict(val[["text", "image", "audio"]].head(2))
    assert list(got["text"]) == list(p2.predict_frame(val[["text", "image", "audio"]].head(2))
                                     ["text"])
    # a fresh process, offline, with the pulled directory only (the pretrained dirs gone)
    for d in parts.values():
        d.rename(d.with_name(d.name + "-gone"))
    code = ("import sys; from mmdist.serve.predictor import Predictor; import pandas as pd\n"
            f"p = Predictor.from_dir({str(m2)!r})\n"
            f"df = pd.read_parquet({str(data / 'val')!r}).head(2)\n"
            "print(list(p.predict_frame(df[['text', 'image', 'audio']])['text']))\n")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                       timeout=300, env={**os.environ, "HF_HUB_OFFLINE": "1"})
    assert r.returncode == 0, r.stderr[-2000:]
    assert r.stdout.strip().splitlines()[-1] == repr(list(got["text"]))
