"""The frozen-encoder feature cache: what a frozen pretrained encoder makes of every sample,
computed once (``mmdist.data.feature_build``) and read by every run, evaluation pass and sweep
trial with the same key instead of decoding the media and running the encoder again.

What is cached is the frozen part of an encoder: a pretrained Hugging Face backbone's output
before its trained projector (``HFImageEncoder.features``); the projector, fusion, heads and LM
train on it exactly as on the live output (``FusedModel.encode`` takes ``<m>_features``).

An entry lives in ``<train.storage_path or ./runs>/feature_cache/<key>/`` (the run's storage:
a local folder, or the cluster's shared file system) and holds Parquet feature shards (the
shard rows less the cached media, plus ``<m>_features`` / ``<m>_feature_mask`` as raw bytes
and ``has_<m>``) and ``cache_manifest.json`` (the key's parts, each file's sha256 and rows,
the feature shapes). The key is the sha256 of everything that changes the features:

    source   the shard manifest's sha256 (the data, its splits and tokenizer)
    per modality: the pretrained directory's files (weights, config, processor) and the
    preprocessing it reads (image: data.image_size; audio: data.sample_rate,
    data.audio_seconds; text: data.max_text_len)

Any change makes a new key, so a stale entry is never read; a feature shard whose sha256 no
longer matches is refused (``ManifestError`` naming the file).

    plan = cache_plan(cfg, data_dir)   # None: nothing frozen to cache (or off)
    # built once under a file lock, else verified: mmdist.models.feature_build.ensure_cache
"""

from __future__ import annotations

import fcntl
import hashlib
import json
import shutil
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from mmdist.data.shards import ManifestError, read_manifest, sha256_file

if TYPE_CHECKING:
    from mmdist.config import Config

FORMAT = 2  # bump when what is stored changes: every old key becomes a miss (2: shards
# mirror the source shards)
MANIFEST = "cache_manifest.json"
CACHE_DIR = "feature_cache"
CACHEABLE = ("text", "image", "audio")


@dataclass(frozen=True)
class CachePlan:
    """What a run would cache: ``modalities`` (frozen pretrained encoders), the ``key`` and its
    ``parts``, the entry's directory and the source shard directory."""

    modalities: tuple[str, ...]
    key: str
    parts: dict[str, Any]
    entry: Path
    data_dir: Path


def cache_root(cfg: Config) -> Path:
    """Where entries live: beside the run's checkpoints (``train.storage_path``, else ./runs)."""
    return Path(cfg.train.storage_path or "runs").resolve() / CACHE_DIR


def cacheable(cfg: Config) -> tuple[list[str], list[str]]:
    """``(modalities, reasons)``: the modalities whose encoder is a frozen pretrained backbone,
    and why each other one is read from raw media."""
    from mmdist.config import torchvision_file

    m, mods, why = cfg.model, [], []
    lora = set(m.lora.components) if m.lora else set()
    for mod in m.modalities:
        path = getattr(m, f"{mod}_pretrained", None) if mod in CACHEABLE else None
        if mod not in CACHEABLE:
            why.append(f"{mod}: not cached (only {', '.join(CACHEABLE)})")
        elif not path or (mod == "image" and torchvision_file(path)):
            why.append(f"{mod}: no pretrained Hugging Face encoder (model.{mod}_pretrained)")
        elif m.fusion_stage == "early":
            why.append(f"{mod}: model.fusion_stage=early uses no encoder")
        elif f"{mod}_encoder" not in m.freeze:
            why.append(f"{mod}: its encoder trains (add {mod}_encoder to model.freeze)")
        elif f"{mod}_encoder" in lora:
            why.append(f"{mod}: LoRA adapts its encoder (model.lora.components)")
        elif m.init_from:
            why.append(f"{mod}: model.init_from gives its weights")
        else:
            mods.append(mod)
    return mods, why


def dir_hash(path: str | Path) -> str:
    """sha256 over every file of a pretrained directory (names and contents)."""
    h = hashlib.sha256()
    root = Path(path)
    for f in sorted(p for p in root.rglob("*") if p.is_file()):
        h.update(str(f.relative_to(root)).encode() + b"\0" + sha256_file(f).encode())
    return h.hexdigest()


def key_parts(cfg: Config, data_dir: str | Path, modalities: list[str]) -> dict[str, Any]:
    """Everything the cached features depend on (see the module)."""
    d = cfg.data
    settings = {"image": {"image_size": d.image_size},
                "audio": {"sample_rate": d.sample_rate, "audio_seconds": d.audio_seconds},
                "text": {"max_text_len": d.max_text_len}}
    return {"format": FORMAT,
            "source_manifest": read_manifest(data_dir)["manifest_sha256"],
            "encoders": {m: {"weights": dir_hash(getattr(cfg.model, f"{m}_pretrained")),
                             "preprocess": settings[m]} for m in sorted(modalities)}}


def cache_key(parts: dict[str, Any]) -> str:
    return hashlib.sha256(json.dumps(parts, sort_keys=True).encode()).hexdigest()[:20]


def cache_plan(cfg: Config, data_dir: str | Path, log=print) -> CachePlan | None:
    """The run's cache plan, or None (``data.feature_cache=off``, or ``auto`` with no frozen
    pretrained encoder: the run reads raw media, and says why).

    Raises:
        ConfigError: ``require`` with nothing to cache; ``data.augment`` with a cached image
            (augmented views differ every epoch; a cache holds one view).
    """
    from mmdist.config import ConfigError

    mode = cfg.data.feature_cache
    if mode == "off":
        return None
    mods, why = cacheable(cfg)
    if cfg.data.augment and "image" in mods:
        raise ConfigError([f"data.augment=true with data.feature_cache={mode}: the cache holds "
                           "one fixed view of each image, augmentation makes a new one every "
                           "epoch; set data.augment=false or data.feature_cache=off"])
    if not mods:
        if mode == "require":
            raise ConfigError([f"data.feature_cache=require: nothing to cache ({'; '.join(why)})"])
        log(f"[mmdist] feature cache: none, reading raw media ({'; '.join(why)})")
        return None
    if why:
        log(f"[mmdist] feature cache: {', '.join(mods)}; raw media for {'; '.join(why)}")
    parts = key_parts(cfg, data_dir, mods)
    key = cache_key(parts)
    return CachePlan(tuple(sorted(mods)), key, parts, cache_root(cfg) / key, Path(data_dir))


@contextmanager
def entry_lock(entry: Path) -> Iterator[None]:
    """One builder per entry at a time (sweep trials, runs on the same machine or on a shared
    file system that honours ``flock``)."""
    entry.parent.mkdir(parents=True, exist_ok=True)
    with open(entry.parent / f".{entry.name}.lock", "w") as fh:
        fcntl.flock(fh, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(fh, fcntl.LOCK_UN)


def read_cache_manifest(entry: Path) -> dict[str, Any] | None:
    path = entry / MANIFEST
    if not path.is_file():
        return None
    try:
        return json.loads(path.read_text())
    except ValueError as e:
        raise ManifestError(f"{path}: not valid JSON ({e}); remove the entry with "
                            f"`mmdist cache rm {entry.name}`") from None


def verify_cache(entry: Path, parts: dict[str, Any] | None = None) -> dict[str, Any]:
    """The entry's manifest after checking its key parts and every feature shard's sha256.

    Raises:
        ManifestError: a missing or changed shard, or parts that are not the key's.
    """
    manifest = read_cache_manifest(entry)
    if manifest is None:
        raise ManifestError(f"{entry}: no {MANIFEST} (an unfinished build?)")
    if parts is not None and manifest["parts"] != parts:
        raise ManifestError(f"{entry / MANIFEST}: its key parts are not this run's")
    for f in manifest["files"]:
        path = entry / f["path"]
        if not path.is_file():
            raise ManifestError(f"feature shard {path}: missing; remove the entry with "
                                f"`mmdist cache rm {entry.name}` and it is built again")
        digest = sha256_file(path)
        if digest != f["sha256"]:
            raise ManifestError(f"feature shard {path}: sha256 {digest[:12]}... does not match "
                                f"the cache manifest's {f['sha256'][:12]}...; the file changed "
                                f"or is corrupt: remove the entry with `mmdist cache rm "
                                f"{entry.name}` and it is built again")
    return manifest


def write_cache_manifest(entry: Path, manifest: dict[str, Any]) -> None:
    tmp = entry / (MANIFEST + ".tmp")
    tmp.write_text(json.dumps(manifest, indent=1, sort_keys=True))
    tmp.replace(entry / MANIFEST)  # the manifest appears last: an entry without it is unfinished


def entry_size(entry: Path) -> int:
    return sum(p.stat().st_size for p in entry.rglob("*") if p.is_file())


def list_entries(root: Path) -> list[dict[str, Any]]:
    """Every entry under ``root``: key, modalities, rows, bytes, when built, source."""
    out = []
    for entry in sorted(p for p in root.glob("*") if p.is_dir()) if root.is_dir() else []:
        try:
            m = read_cache_manifest(entry) or {}
        except ManifestError:
            m = {}
        out.append({"key": entry.name, "path": str(entry), "bytes": entry_size(entry),
                    "complete": bool(m), "modalities": m.get("modalities", []),
                    "rows": m.get("rows"), "built_at": m.get("built_at"),
                    "source": m.get("source")})
    return out


def remove_entries(root: Path, keys: list[str]) -> list[dict[str, Any]]:
    """Remove the entries ``keys`` (or every entry for ``["all"]``); returns what was removed.

    Raises:
        FileNotFoundError: a key with no entry (the message lists the keys there are).
    """
    entries = {e["key"]: e for e in list_entries(root)}
    wanted = list(entries) if keys == ["all"] else keys
    missing = [k for k in wanted if k not in entries]
    if missing:
        raise FileNotFoundError(f"no feature cache entry {', '.join(missing)} under {root}; "
                                f"entries: {', '.join(entries) or 'none'}")
    for k in wanted:
        with entry_lock(root / k):
            shutil.rmtree(root / k)
        (root / f".{k}.lock").unlink(missing_ok=True)
    return [entries[k] for k in wanted]
