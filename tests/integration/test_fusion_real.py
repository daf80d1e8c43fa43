"""Quality on real recordings, run as users run it: `mmdist bench fusion` on real handwritten
digits and spoken digits. Image-text matching and the image-audio "same digit?" relation (the
two collapsed to a constant before: loss pinned at ln 2, accuracy 0.49-0.53) learn at CI size:
matching clears 0.65, the relation 0.58 (measured 0.708-0.719 and 0.604-0.667 on 2026-12-02)."""

import json
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
BARS = {"match": 0.65, "same": 0.58}  # chance is 0.5


def test_matching_and_the_image_audio_relation_learn_on_real_digits(tmp_path):
    cmd = [sys.executable, "-m", "mmdist.cli", "bench", "fusion", "--config", "tiny",
           "--rows", "1000", "--epochs", "10", "--methods", "concat,attention",
           "--stages", "mid", "--jobs", "2", "--json",
           "--plot", str(tmp_path / "heat.png"), "train.lr=0.002", "train.warmup_steps=20"]
    r = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=900)
    assert r.returncode == 0, r.stderr[-3000:]
    out = json.loads(r.stdout.strip().splitlines()[-1])
    cells = {(c["benchmark"], c["method"]): c for c in out["cells"]}
    assert set(cells) == {(b, m) for b in ("match", "same") for m in ("concat", "attention")}
    for key, c in cells.items():
        assert c["val_accuracy"] >= BARS[key[0]], (key, c["curve"])
        assert c["best"] - c["val_accuracy"] <= 0.05, (key, c["curve"])  # no decay
    assert (tmp_path / "heat.png").stat().st_size > 0
