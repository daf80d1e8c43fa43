"""Real Ray: shards -> Ray Datasets -> contract batches; the CLI and the ingest bench."""

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import ray
import torch

from mmdist.config import load_config
from mmdist.data.pipeline import (
    build_datasets,
    iter_train_batches,
    open_worker_shards,
    worker_shards,
)
from mmdist.data.prepare import prepare_synthetic
from mmdist.data.schema import BATCH_KEYS
from mmdist.data.shard_batches import ShardBatches, shard_dataloader
from mmdist.data.shards import ManifestError, load_tokenizer
from mmdist.data.torch_batches import iter_torch

ROOT = Path(__file__).resolve().parents[2]
CFG = load_config("tiny", ["data.synthetic_samples=48", "data.shard_rows=12",
                           "data.val_fraction=0.25"])


@pytest.fixture(scope="module")
def ray_cluster(ray_local):
    ray.data.DataContext.get_current().enable_progress_bars = False
    yield ray_local


@pytest.fixture(scope="module")
def shards(tmp_path_factory):
    out = tmp_path_factory.mktemp("data") / "synthetic"
    prepare_synthetic(out, CFG, seed=0)
    return out


def _check_contract(batch, n, cfg=CFG):
    d = cfg.data
    frames = 1 + int(round(d.sample_rate * d.audio_seconds)) // d.hop_length
    assert tuple(sorted(batch)) == tuple(sorted(BATCH_KEYS))
    shapes = {"input_ids": (n, d.max_text_len), "attention_mask": (n, d.max_text_len),
              "target_ids": (n, d.max_text_len), "target_mask": (n, d.max_text_len),
              "image": (n, 3, d.image_size, d.image_size), "audio": (n, d.n_mels, frames),
              "sample_id": (n,), "label": (n,), "has_text": (n,), "has_image": (n,),
              "has_audio": (n,)}
    dtypes = {"image": torch.uint8, "audio": torch.float32, "has_text": torch.bool,
              "has_image": torch.bool, "has_audio": torch.bool}
    for k, shape in shapes.items():
        assert tuple(batch[k].shape) == shape, k
        assert batch[k].dtype == dtypes.get(k, torch.int64), k


def test_ray_datasets_yield_contract_batches(ray_cluster, shards):
    ds = build_datasets(shards, CFG)
    assert set(ds) == {"train", "val"}
    batches = list(iter_train_batches(ds["train"], batch_size=8, seed=0, epoch=0))
    assert len(batches) == 36 // 8  # drop_last
    for b in batches:
        _check_contract(b, 8)
        assert b["has_image"].all() and b["has_audio"].all() and b["has_text"].all()
    ids = torch.cat([b["sample_id"] for b in batches]).tolist()
    assert len(set(ids)) == len(ids)
    val = list(iter_torch(ds["val"], batch_size=32))
    assert sum(len(b["sample_id"]) for b in val) == 12
    _check_contract(val[0], 12)


def test_ray_and_dataloader_paths_agree(ray_cluster, shards):
    """Batches of iter_torch (training's and evaluation's: numpy batches wrapped by
    as_tensors) hold what the DataLoader path makes."""
    ray_val = {}
    for b in iter_torch(build_datasets(shards, CFG)["val"], batch_size=5):
        assert all(isinstance(v, torch.Tensor) for v in b.values())
        for i, sid in enumerate(b["sample_id"].tolist()):
            ray_val[sid] = {k: v[i] for k, v in b.items()}
    spec_cfg = ShardBatches(shards, "val").spec  # from the manifest
    assert spec_cfg.image_size == CFG.data.image_size
    seen = 0
    for b in shard_dataloader(shards, "val", batch_size=5, num_workers=0):
        _check_contract(b, len(b["sample_id"]))
        for i, sid in enumerate(b["sample_id"].tolist()):
            for k in BATCH_KEYS:
                assert torch.equal(b[k][i], ray_val[sid][k]), (sid, k)
            seen += 1
    assert seen == len(ray_val) == 12
    assert load_tokenizer(shards).vocab_size > 6


def test_build_dataset_carries_the_scheduling_callbacks(ray_cluster, shards):
    """Ray 2.60 runs one task at a time for the first second of every execution (its resource
    limits start at zero), notices finished tasks up to 0.1 s late and emits blocks a step
    after a thread read their metadata; build_dataset registers the fixes on the dataset's own
    context (not the global one), and the executor still has the attributes and the module
    global (its ``ray``) the callbacks rely on."""
    from ray.data._internal.execution import streaming_executor_state as ses
    from ray.data._internal.execution.execution_callback import ExecutionCallback
    from ray.data._internal.execution.metadata_fetcher import InlineMetadataFetcher

    from mmdist.data import ray_scheduling

    ds = build_datasets(shards, CFG)["train"]
    global_classes = ray.data.DataContext.get_current().custom_execution_callback_classes
    for cls in ray_scheduling.CALLBACKS:
        assert cls in ds.context.custom_execution_callback_classes
        assert cls not in global_classes
    seen = []

    class Probe(ExecutionCallback):
        def on_execution_step(self, executor):
            rm = executor._resource_manager
            seen.append((hasattr(rm, "_global_limits_last_update_time"), ses.ray,
                         executor._metadata_fetcher))

    ds.context.custom_execution_callback_classes.append(Probe)
    assert sum(len(b["sample_id"]) for b in ds.iter_batches(batch_size=None)) == 36
    assert seen and all(has for has, _, _ in seen)
    assert all(isinstance(r, ray_scheduling.WaitForFirst) and r._ray is ray for _, r, _ in seen)
    assert ray_scheduling.one_node()  # the test's cluster
    assert all(isinstance(f, InlineMetadataFetcher) for _, _, f in seen)


def test_wait_for_first_returns_a_finished_task_while_another_still_runs(ray_cluster):
    """The executor's wait for all its running tasks (num_returns=all) now returns with the
    one that finished; Ray's own wait would hold it until the slow one ended too."""
    import time

    from mmdist.data.ray_scheduling import WaitForFirst

    @ray.remote(num_cpus=0)
    def sleep(s):
        time.sleep(s)
        return s

    fast, slow = sleep.remote(0), sleep.remote(30)
    try:
        ray.get(fast)
        # no timeout: Ray's own wait would return both, after 30 s
        ready, rest = WaitForFirst(ray).wait([slow, fast], num_returns=2, timeout=None,
                                             fetch_local=False)
        assert ready == [fast] and rest == [slow]
    finally:
        ray.cancel(slow, force=True)


def test_the_first_wave_of_tasks_hands_over_a_chunk_first(ray_cluster, shards):
    """With Ray's shaping off for the preprocess map (UdfShapesBlocks) the blocks are what
    BatchPreprocessor yields: the tasks that fit at once on the cluster's 2 CPUs (1 CPU each)
    hand over their first chunk on its own, then the rest of their shard; the third task its
    whole shard. Without it Ray merges every task's yields into one block."""
    from mmdist.data import ray_scheduling
    from mmdist.data.pipeline import build_dataset
    from mmdist.data.preprocess import PreprocessSpec
    from mmdist.data.shards import shard_paths, verify_manifest

    paths = shard_paths(shards, verify_manifest(shards), "train")
    spec, tok = PreprocessSpec.from_config(CFG.data, augment=False), load_tokenizer(shards)
    ds = build_dataset(paths, spec, tok, map_batch_size=4)
    assert ds.context.get_config(ray_scheduling.UDF_BLOCKS_KEY) == ["BatchPreprocessor"]
    shaped = sorted(b.num_rows() for b in ds.iter_internal_ref_bundles())
    merged = build_dataset(paths, spec, tok, map_batch_size=4)
    merged.context.set_config(ray_scheduling.UDF_BLOCKS_KEY, None)
    by_ray = [b.num_rows() for b in merged.iter_internal_ref_bundles()]
    assert shaped == [4, 4, 8, 8, 12]  # three 12-row shards: 4 + 8, 4 + 8, 12
    assert sorted(by_ray) == [12, 12, 12]
    rows = [r["sample_id"] for r in ds.iter_rows()]
    assert len(rows) == len(set(rows)) == 36
    # a training worker's first batch needs first_rows: those come first, in whole chunks
    first = build_dataset(paths, spec, tok, map_batch_size=2, first_rows=5)
    assert sorted(b.num_rows() for b in first.iter_internal_ref_bundles()) == [6, 6, 6, 6, 12]


def test_shard_datasource_reads_each_file_as_one_block_in_order(ray_cluster, shards, tmp_path):
    """The shards' own reader: one read task and one block per file, the file's rows in order,
    the row counts known before anything runs; a file that is not Parquet is named."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    from mmdist.data.shard_source import ShardDatasource
    from mmdist.data.shards import shard_paths, verify_manifest

    paths = shard_paths(shards, verify_manifest(shards), "train")
    source = ShardDatasource(paths, ["sample_id", "text"])
    tasks = source.get_read_tasks(parallelism=1)
    assert [t.metadata.num_rows for t in tasks] == [12, 12, 12]
    assert source.estimate_inmemory_data_size() == sum(os.path.getsize(p) for p in paths)
    ds = ray.data.read_datasource(source, override_num_blocks=len(paths))
    blocks = [ray.get(b.block_refs[0]) for b in ds.iter_internal_ref_bundles()]
    assert [b.num_rows for b in blocks] == [12, 12, 12]
    assert all(b.column_names == ["sample_id", "text"] for b in blocks)
    want = pa.concat_tables([pq.read_table(p, columns=["sample_id"]) for p in paths])
    got = [i for b in blocks for i in b.column("sample_id").to_pylist()]
    assert got == want.column("sample_id").to_pylist()
    bad = tmp_path / "part-bad.parquet"
    bad.write_bytes(b"not parquet")
    with pytest.raises(pa.ArrowInvalid, match="part-bad.parquet"):
        ShardDatasource([*paths, str(bad)])


def test_worker_shards_split_train_equally_and_give_every_rank_all_of_val(ray_cluster, shards):
    """What each training worker gets (worker_shards, opened as the worker does): the train
    split runs in Ray Data's split coordinator actor, so the scheduling callback must unpickle
    there, and the ranks' rows are disjoint and equal in number; val is whole, in order, for
    every rank."""
    import threading

    datasets = build_datasets(shards, CFG)
    refs = worker_shards(datasets, 2)
    ranks = [open_worker_shards(r) for r in refs]
    ids = [[], []]

    def consume(i):
        for b in ranks[i]["train"].iter_batches(batch_size=4):
            ids[i].extend(b["sample_id"].tolist())

    threads = [threading.Thread(target=consume, args=(i,)) for i in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=120)
    assert len(ids[0]) == len(ids[1]) == 18
    assert len(set(ids[0] + ids[1])) == 36
    val = [[i for b in r["val"].iter_batches(batch_size=4) for i in b["sample_id"].tolist()]
           for r in ranks]
    want = [i for b in datasets["val"].iter_batches(batch_size=4) for i in b["sample_id"].tolist()]
    assert val[0] == val[1] == want and want


def test_tampered_shard_is_refused(ray_cluster, tmp_path):
    out = tmp_path / "s"
    prepare_synthetic(out, CFG, seed=3)
    victim = sorted((out / "val").glob("*.parquet"))[0]
    victim.write_bytes(victim.read_bytes()[:-10] + b"0123456789")
    with pytest.raises(ManifestError, match=f"val/{victim.name}"):
        build_datasets(out, CFG)


def _env():
    return {**os.environ, "RAY_USAGE_STATS_ENABLED": "0", "PYTHONPATH": str(ROOT)}


def test_prepare_cli_json(tmp_path):
    out = tmp_path / "cli"
    proc = subprocess.run(
        [sys.executable, "-m", "mmdist.cli", "prepare", "--source", "synthetic", "--out",
         str(out), "--num-samples", "20", "--seed", "2", "--shard-rows", "8", "--json",
         "--config", "tiny"], capture_output=True, text=True, env=_env(), timeout=120)
    assert proc.returncode == 0, proc.stderr
    summary = json.loads(proc.stdout.strip().splitlines()[-1])
    assert {"rows_in", "rows_written", "rows_quarantined", "shards", "out"} <= set(summary)
    assert summary["rows_in"] == 20 == summary["rows_written"] + summary["rows_quarantined"]
    assert summary["out"] == str(out) and (out / "manifest.json").exists()
    # the Ray job entrypoint takes the same arguments
    proc = subprocess.run(
        [sys.executable, str(ROOT / "jobs" / "prepare_data.py"), "--source", "jsonl",
         "--manifest", str(tmp_path / "absent.jsonl"), "--out", str(tmp_path / "j"), "--json"],
        capture_output=True, text=True, env=_env(), timeout=120)
    assert proc.returncode == 1 and "absent.jsonl" in proc.stderr
    assert json.loads(proc.stdout.strip().splitlines()[-1])["ok"] is False


def test_bench_ingest_runs_tiny(ray_cluster, shards):
    import argparse

    from mmdist.bench import ingest

    parser = argparse.ArgumentParser()
    ingest.configure_parser(parser)
    # two worker processes a side on one CPU: DataLoader workers=2, Ray tasks of 0.5 CPU
    args = parser.parse_args(["--data", str(shards), "--batch-size", "6", "--cpus", "1",
                              "--workers", "2", "--config", "tiny"])
    s = ingest.run(args)
    assert s["workers"] == 2 and s["cpus"] == 1
    for k in ("ray_data_samples_per_s", "dataloader_samples_per_s", "ratio"):
        assert s[k] > 0, k
    assert np.isfinite(s["ratio"]) and s["ray_data_breakdown"]
    assert s["epoch_ratio_by_round"] == [s["epoch_ratio"]] == [s["epoch_ratio_paired_median"]]
    # Ray's own processes use CPU while nothing runs; the breakdown charges it to the epoch
    assert sum(s["ray_data_idle_cpu_s_per_s"].values()) > 0
    assert s["ray_data_breakdown"]["cpu_idle_background_s"] > 0
