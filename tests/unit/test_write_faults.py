"""Writes that fail part-way (a full disk): `mmdist prepare` reports it, keeps nothing
half-written and leaves the previous shards as they were.

The fault is real, made by the kernel: the child process runs under RLIMIT_FSIZE, so a write
past the limit fails with EFBIG exactly where a full disk fails with ENOSPC."""

import json
import resource
import signal
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def _prepare(out: Path, n: int, limit: int | None = None) -> subprocess.CompletedProcess:
    def cap() -> None:
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # a failed write, not a killed process
        resource.setrlimit(resource.RLIMIT_FSIZE, (limit, limit))

    return subprocess.run(
        [sys.executable, "-m", "mmdist.cli", "prepare", "--source", "synthetic", "--out",
         str(out), "--num-samples", str(n), "--parallel", "local", "--json"],
        cwd=ROOT, capture_output=True, text=True, timeout=300,
        preexec_fn=cap if limit else None)


def test_a_full_disk_during_prepare_keeps_the_previous_shards(tmp_path):
    out = tmp_path / "shards"
    first = _prepare(out, 40)
    assert first.returncode == 0, first.stderr[-2000:]
    before = (out / "manifest.json").read_text()
    files = sorted(p.relative_to(out) for p in out.rglob("*"))

    r = _prepare(out, 400, limit=256 * 1024)  # larger shards than the limit lets through
    assert r.returncode == 1, (r.stdout[-2000:], r.stderr[-2000:])
    assert "Traceback" not in r.stderr, r.stderr[-3000:]
    assert f"--out {out}: cannot write the shards (" in r.stderr, r.stderr
    assert "File too large" in r.stderr  # the kernel's own words for the failed write
    assert "nothing was kept" in r.stderr
    # the previous shards are untouched, no half-written folder is left beside them
    assert (out / "manifest.json").read_text() == before
    assert sorted(p.relative_to(out) for p in out.rglob("*")) == files
    assert sorted(p.name for p in tmp_path.iterdir()) == ["shards", "shards.prepare.log"]
    assert json.loads(before)["counts"]["rows_in"] == 40
