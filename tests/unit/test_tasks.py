"""Tasks are modules: a task written outside mmdist (``toy_task.py``, one file) joins with one
registry entry and then trains, evaluates, predicts, saves and is sized like the built-in ones;
generation metrics follow the tokenizer in use."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import torch
from tokenizers import Tokenizer, models, pre_tokenizers

from mmdist.data.tokenizer import TextTokenizer
from mmdist.models import build_model
from mmdist.models.metrics import corpus_bleu
from mmdist.tasks import compute_metrics
from tests.unit.synthetic_mm import make_batch, tiny_config

ROOT = Path(__file__).resolve().parents[2]

# Runs in a fresh interpreter: the registry entry is made before mmdist.config reads the names,
# as an edit of mmdist/registry.py would be.
TOY = r"""
import json, sys, tempfile
import torch
from mmdist import registry
registry.TASKS["brightness"] = "tests.unit.toy_task:Brightness"

from mmdist.bench.process_group import single_process_group
from mmdist.config import ConfigError, load_config
from mmdist.models import build_model, count_parameters, load_model, parameter_count, save_model
from mmdist.tasks import compute_metrics
from mmdist.train.engine import build_engine
from tests.unit.synthetic_mm import VOCAB, make_batch

TINY = ["model.task=brightness", "train.num_workers=1", "train.micro_batch_size=4",
        "train.global_batch_size=0", "train.warmup_steps=0", "train.lr=0.01"]
cfg = load_config("tiny", TINY)
out = {"primary": cfg.primary_metric, "mode": cfg.metric_mode}
try:
    load_config("tiny", [*TINY, "model.modalities=[text, audio]"])
except ConfigError as e:
    out["refused"] = str(e)
model = build_model(cfg, VOCAB)
out["params_match"] = count_parameters(model) == parameter_count(cfg, VOCAB)
with single_process_group(torch.device("cpu")):
    engine = build_engine(cfg, {"vocab_size": VOCAB}, world_size=1, total_steps=30)
    batch = make_batch(cfg, 4, seed=0)
    losses = []
    for _ in range(30):
        loss = engine(batch)["loss"]
        engine.backward(loss)
        engine.step()
        losses.append(float(loss))
    engine.eval()
    with torch.no_grad():
        ev = engine(batch, mode="eval")
    out["metrics"] = compute_metrics(cfg, ev, engine.module.vocab)
    out["losses"] = losses
    d = tempfile.mkdtemp()
    save_model(engine.module, d)
    again = load_model(d).eval()
    with torch.no_grad():
        out["same_after_load"] = torch.allclose(again.predict(batch)["brightness"],
                                                engine.module.predict(batch)["brightness"])
print("RESULT " + json.dumps(out))
"""


def test_a_task_from_one_file_and_one_registry_entry_trains_end_to_end():
    r = subprocess.run([sys.executable, "-c", TOY], cwd=ROOT, capture_output=True, text=True,
                       timeout=300)
    assert r.returncode == 0, r.stderr[-3000:]
    out = json.loads(r.stdout.split("RESULT ", 1)[1])
    assert (out["primary"], out["mode"]) == ("val_mse", "min")
    assert "task 'brightness' needs 'image'" in out["refused"]
    assert out["params_match"]
    assert out["losses"][-1] < 0.5 * out["losses"][0], out["losses"]
    assert set(out["metrics"]) == {"val_loss", "val_mse"}
    assert out["same_after_load"]


def _bert_style_tokenizer(tmp_path: Path) -> TextTokenizer:
    """Ids as in BERT's vocabulary: [PAD] 0, words from 1, [UNK] 100, [CLS] 101, [SEP] 102."""
    words = ["the", "a", "cat", "dog", "sat", "on", "mat", "red"]
    words += [f"word{i}" for i in range(len(words) + 1, 100)]  # dense ids, as real vocabularies
    vocab = {"[PAD]": 0, **{w: i + 1 for i, w in enumerate(words)},
             "[UNK]": 100, "[CLS]": 101, "[SEP]": 102, "[MASK]": 103}
    raw = Tokenizer(models.WordLevel(vocab=vocab, unk_token="[UNK]"))
    raw.pre_tokenizer = pre_tokenizers.Whitespace()
    raw.add_special_tokens(["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"])
    (tmp_path / "bert").mkdir()
    raw.save(str(tmp_path / "bert" / "tokenizer.json"))
    return TextTokenizer.load(tmp_path / "bert")


def test_bleu_and_generation_take_special_ids_from_the_tokenizer(tmp_path):
    tok = _bert_style_tokenizer(tmp_path)
    vocab = tok.model_vocab()
    assert (tok.pad_id, tok.bos_id, tok.eos_id) == (0, 101, 102)
    assert vocab["special_ids"] == [0, 100, 101, 102, 103]
    ref, _ = tok.encode_batch(["the cat sat on a mat"], 12)  # words at ids 1..7, EOS 102
    ref = torch.as_tensor(ref)
    # ids 3 (cat) and 5 (sat) are words here: mmdist's own ids 0..5 are not special
    assert corpus_bleu(ref[:, 1:], ref, vocab["eos_id"], vocab["special_ids"]) == 1.0
    wrong_words = torch.tensor([[4, 8, 102, 1, 3, 5]])  # dog red; after EOS nothing counts
    assert corpus_bleu(wrong_words, ref, vocab["eos_id"], vocab["special_ids"]) == 0.0

    cfg = tiny_config("model.task=lm", "data.max_text_len=12")
    torch.manual_seed(0)
    model = build_model(cfg, **vocab).eval()
    batch = make_batch(cfg, 3)
    batch["target_ids"] = ref.repeat(3, 1)
    batch["target_mask"] = (batch["target_ids"] != 0).long()
    with torch.no_grad():
        outputs = model.eval_outputs(batch)
        generated = model.generate(batch, max_new_tokens=11)
    # generation stops at the tokenizer's EOS (102) and pads with its PAD (0) after it
    for row in generated.tolist():
        if 102 in row:
            assert all(t == 0 for t in row[row.index(102) + 1:])
    metrics = compute_metrics(cfg, outputs, model.vocab)
    expected = corpus_bleu(outputs["lm.generated"], outputs["lm.target"], 102,
                           vocab["special_ids"])
    assert metrics["val_bleu"] == expected
    # the generations scored as the tokenizer would decode them
    outputs["lm.generated"] = ref[:, 1:].repeat(3, 1)
    assert compute_metrics(cfg, outputs, model.vocab)["val_bleu"] == 1.0
