"""What `mmdist prepare` prints at the end: counts, splits, quarantine reasons, warnings."""

from __future__ import annotations

from pathlib import Path
from typing import Any


def print_summary(s: dict[str, Any]) -> None:
    if s.get("reused"):
        print(f"reusing {s['out']} (same parameters, checksums verified)")
    else:
        print(f"prepared {s['out']} in {s.get('seconds', 0)} s ({s.get('parallel')})")
    print(f"  rows_in = rows_written + rows_quarantined: {s['rows_in']} = {s['rows_written']} "
          f"+ {s['rows_quarantined']}")
    print(f"  train: {s['train_rows']} rows in {s['train_shards']} shard(s); "
          f"val: {s['val_rows']} rows in {s['val_shards']} shard(s)")
    if s["rows_quarantined"]:
        reasons = ", ".join(f"{k}: {v}" for k, v in sorted(s["quarantine_reasons"].items()))
        print(f"  quarantined: {reasons} (details in {Path(s['out']) / 'quarantine.jsonl'})")
    print(f"  tokenizer: {s['tokenizer']} (vocab {s['vocab_size']})")
    for w in s.get("warnings", ()):
        print(f"  warning: {w}")
    if s.get("log_file"):
        print(f"  log: {s['log_file']} (Ray and the libraries; --verbose shows them)")
