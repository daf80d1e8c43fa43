"""Distributed evaluation and batch inference over shard sets with Ray Data actor pools."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import ray
import torch

from mmdist.config import Config
from mmdist.data.shard_source import ShardDatasource
from mmdist.data.shards import canonical_batches, verify_manifest
from mmdist.data.tokenizer import TextTokenizer
from mmdist.models.model_files import read_meta
from mmdist.serve.predictor import Predictor
from mmdist.tasks import compute_metrics


class EvalActor:
    """Holds one model; turns a canonical batch of shard rows into per-sample eval outputs."""

    def __init__(self, model_dir: str, device: str = "cpu"):
        self.predictor = Predictor.from_dir(model_dir, device=device)

    def __call__(self, rows: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        return {k: v.float().numpy() if v.is_floating_point() else v.numpy()
                for k, v in self.predictor.eval_outputs(rows).items()}


class PredictActor:
    """Holds one model; answers a batch of shard rows (sample ids kept). The rows are read as
    training reads them: a video is the frame strip `mmdist prepare` stored, its sound track the
    row's audio, its subtitles the row's text."""

    def __init__(self, model_dir: str, device: str = "cpu"):
        self.predictor = Predictor.from_dir(model_dir, device=device)

    def __call__(self, rows: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        n = len(rows["sample_id"])
        known = self.predictor.cfg.model.modalities
        absent = np.full(n, None, dtype=object)
        # modalities the model was not trained on are ignored here (not decoded)
        shard = {"sample_id": rows["sample_id"],
                 **{c: rows[c] if c in rows and c in known else absent
                    for c in ("text", "image", "audio", "video")}}
        answers = pd.DataFrame(self.predictor.predict_shard_rows(shard))
        answers.insert(0, "sample_id", np.asarray(rows["sample_id"], dtype=np.int64))
        return {c: answers[c].to_numpy() for c in answers.columns}


def evaluate_distributed(model_dir: str | Path, data_dir: str | Path, split: str = "val",
                         batch_size: int | None = None, actors: int = 1,
                         use_gpu: bool = False) -> dict[str, Any]:
    """Metrics of a model on a shard split, computed by a Ray Data actor pool."""
    verify_manifest(data_dir)
    meta = read_meta(model_dir)
    cfg = Config.from_dict(meta["config"])
    bs = batch_size or cfg.train.micro_batch_size
    ds = ray.data.from_arrow(canonical_batches(data_dir, split, bs))  # one block per batch
    out = ds.map_batches(EvalActor, fn_constructor_args=(str(model_dir),
                                                         "cuda" if use_gpu else "cpu"),
                         batch_size=None, batch_format="numpy",
                         compute=ray.data.ActorPoolStrategy(size=actors),
                         num_gpus=1 if use_gpu else 0, num_cpus=0.5)
    merged: dict[str, list] = {}
    for b in out.iter_batches(batch_size=None, batch_format="numpy"):
        for k, v in b.items():
            merged.setdefault(k, []).append(torch.from_numpy(np.array(v)))
    outputs = {k: torch.cat(v) for k, v in merged.items()}
    return compute_metrics(cfg, outputs, meta["vocab"],
                           TextTokenizer.load(Path(model_dir) / "tokenizer"))


def predict_distributed(model_dir: str | Path, data_dir: str | Path, out_dir: str | Path,
                        splits: tuple[str, ...] = ("train", "val"), batch_size: int = 64,
                        actors: int = 1, use_gpu: bool = False) -> dict[str, Any]:
    """Write Parquet predictions (one row per input row, with its sample id) to ``out_dir``."""
    verify_manifest(data_dir)
    paths = [str(p) for s in splits for p in sorted((Path(data_dir) / s).glob("*.parquet"))]
    if not paths:
        raise FileNotFoundError(f"{data_dir}: no Parquet shards in {list(splits)}")
    ds = ray.data.read_datasource(ShardDatasource(paths), override_num_blocks=len(paths))
    rows_in = ds.count()
    preds = ds.map_batches(PredictActor, fn_constructor_args=(str(model_dir),
                                                              "cuda" if use_gpu else "cpu"),
                           batch_size=batch_size, batch_format="numpy",
                           compute=ray.data.ActorPoolStrategy(size=actors),
                           num_gpus=1 if use_gpu else 0, num_cpus=0.5)
    preds.write_parquet(str(out_dir))
    rows_out = ray.data.read_parquet(str(out_dir)).count()
    return {"rows_in": rows_in, "rows_out": rows_out, "out": str(Path(out_dir).resolve())}
