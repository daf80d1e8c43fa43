"""The report of a sweep: one row per trial, and trials.csv, trials.md, heatmap.png and
curves.png written from them."""

from __future__ import annotations

import json
import math
import re
from pathlib import Path
from typing import Any

from mmdist.config import FUSION_STAGES, FUSIONS
from mmdist.tune.space import trial_overrides


def trial_rows(grid, metric: str, mode: str, report_dir: Path) -> list[dict[str, Any]]:
    """One row per trial: its overrides, best metric, steps, whether ASHA stopped it."""
    rows = []
    done_dir = report_dir / "trials"
    finished = {}
    if done_dir.exists():
        for p in done_dir.glob("*.json"):
            d = json.loads(p.read_text())
            finished[json.dumps(d["overrides"], sort_keys=True)] = d
    for res in grid:
        conf = trial_overrides(res.config or {})
        df = res.metrics_dataframe
        failed = res.error is not None
        series = df[metric].dropna() if df is not None and metric in df else None
        best_val = None
        if series is not None and len(series):
            best_val = float(series.max() if mode == "max" else series.min())
        done = finished.get(json.dumps(conf, sort_keys=True))
        steps = int((res.metrics or {}).get("global_step", 0) or 0)
        row = {
            "overrides": conf, "metric": None if series is None or not len(series)
            else float(series.iloc[-1]), "best_metric_seen": best_val, "steps": steps,
            "failed": failed, "stopped_early": not failed and done is None,
            "error": error_line(res.error) if failed else "",
            "final_metric": (done or {}).get("metrics", {}).get(metric),
            "model_dir": None, "history": df,
        }
        if done:
            row["steps"] = int(done.get("global_step", steps))
            if done.get("checkpoint_path"):
                row["model_dir"] = str(Path(done["checkpoint_path"]) / "model")
            if row["final_metric"] is not None:
                row["metric"] = float(row["final_metric"])
        rows.append(row)
    return rows


def write_report(rows: list[dict], grid, metric: str, mode: str, out: Path,
                 dropped: list[dict] = ()) -> list[Path]:
    """trials.csv, trials.md, heatmap.png (fusion x stage), curves.png (top trials).

    ``dropped``: the combinations the config refused (:func:`~mmdist.tune.space.space_points`),
    listed in trials.md and marked "refused" on the heat map. Failed trials are in the tables
    with their error, and left out of the heat map and the curves.
    """
    import matplotlib  # heavy: not loaded for --help

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt  # heavy: not loaded for --help
    import pandas as pd  # heavy: not loaded for --help

    out.mkdir(parents=True, exist_ok=True)
    table = pd.DataFrame([{**r["overrides"], metric: r["metric"], "steps": r["steps"],
                           "stopped_early": r["stopped_early"], "failed": r["failed"],
                           "error": r["error"]} for r in rows])
    table = table.sort_values(metric, ascending=(mode == "min"), na_position="last")
    table.to_csv(out / "trials.csv", index=False)
    md = table.to_markdown(index=False)
    if dropped:
        md += "\n\nDropped before the sweep, refused by the config:\n\n" + "\n".join(
            f"- {format_overrides(d['overrides'])}: {d['reason']}" for d in dropped)
    (out / "trials.md").write_text(md + "\n")
    files = [out / "trials.csv", out / "trials.md"]

    # Heat map: best metric per fusion method x stage.
    points = [r["overrides"] for r in rows] + [d["overrides"] for d in dropped]
    fusions = sorted({p.get("model.fusion") for p in points} - {None},
                     key=lambda f: FUSIONS.index(f))
    stages = sorted({p.get("model.fusion_stage") for p in points} - {None},
                    key=lambda s: FUSION_STAGES.index(s))
    if fusions:
        stages = stages or ["(fixed)"]

        def cell(p: dict) -> tuple[int, int] | None:
            if "model.fusion" not in p:
                return None
            return fusions.index(p["model.fusion"]), stages.index(p.get("model.fusion_stage",
                                                                        "(fixed)"))

        grid_vals = [[math.nan] * len(stages) for _ in fusions]
        empty = {cell(d["overrides"]): "refused" for d in dropped}
        empty.update({cell(r["overrides"]): "failed" for r in rows if r["failed"]})
        for r in rows:
            if r["metric"] is None or r["failed"] or cell(r["overrides"]) is None:
                continue
            i, j = cell(r["overrides"])
            cur = grid_vals[i][j]
            better = max if mode == "max" else min
            grid_vals[i][j] = r["metric"] if math.isnan(cur) else better(cur, r["metric"])
        fig, ax = plt.subplots(figsize=(1.6 + 1.4 * len(stages), 1.2 + 0.5 * len(fusions)))
        im = ax.imshow(grid_vals, cmap="viridis" if mode == "max" else "viridis_r", aspect="auto")
        ax.set_xticks(range(len(stages)), stages)
        ax.set_yticks(range(len(fusions)), fusions)
        for i, row in enumerate(grid_vals):
            for j, v in enumerate(row):
                ax.text(j, i, empty.get((i, j), "-") if math.isnan(v) else f"{v:.3f}",
                        ha="center", va="center",
                        color="white" if not math.isnan(v) else "grey", fontsize=9)
        ax.set_xlabel("fusion stage")
        ax.set_ylabel("fusion method")
        ax.set_title(f"best {metric} per fusion method x stage")
        fig.colorbar(im, ax=ax)
        fig.tight_layout()
        fig.savefig(out / "heatmap.png", dpi=120)
        plt.close(fig)
        files.append(out / "heatmap.png")

    # Learning curves of the top trials.
    ranked = [r for r in rows
              if r["metric"] is not None and r["history"] is not None and not r["failed"]]
    ranked.sort(key=lambda r: r["metric"], reverse=(mode == "max"))
    fig, ax = plt.subplots(figsize=(7, 4))
    for r in ranked[:5]:
        h = r["history"]
        if metric in h and "global_step" in h:
            h = h.dropna(subset=[metric])
            label = ", ".join(f"{k.split('.')[-1]}={v:.3g}" if isinstance(v, float)
                              else f"{k.split('.')[-1]}={v}" for k, v in r["overrides"].items())
            ax.plot(h["global_step"], h[metric], marker="o", label=label)
    ax.set_xlabel("optimizer step")
    ax.set_ylabel(metric)
    ax.set_title("learning curves, top trials")
    if ranked:
        ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(out / "curves.png", dpi=120)
    plt.close(fig)
    files.append(out / "curves.png")
    return files


_EXCEPTION_LINE = re.compile(r"^(?:\w+\.)*(\w*(?:Error|Exception|Interrupt)(?:\([\w.]+\))?): ")


def error_line(error: BaseException | str) -> str:
    """What went wrong in a trial, from the (remote) traceback text Tune keeps: the last
    ``SomeError: message`` line with the rest of its message, the class without its module;
    at most 500 characters."""
    lines = [x for x in str(error).splitlines() if x.strip()]
    starts = [i for i, x in enumerate(lines) if _EXCEPTION_LINE.match(x)]
    if not starts:
        return (lines[-1].strip() if lines else type(error).__name__)[:500]
    first, *rest = lines[starts[-1]:]
    text = " ".join([_EXCEPTION_LINE.sub(r"\1: ", first), *(x.strip() for x in rest)])
    return text if len(text) <= 500 else text[:497] + "..."


def format_overrides(overrides: dict[str, Any]) -> str:
    """``{"model.fusion": "add", "train.lr": 0.001}`` -> ``model.fusion=add train.lr=0.001``."""
    return " ".join(f"{k}={v}" for k, v in overrides.items())
