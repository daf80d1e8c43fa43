"""The search space of a sweep: ``--space`` parsing, the default space, the combinations the
config refuses, Tune's param space, and the overrides of one trial."""

from __future__ import annotations

import functools
import itertools
import random
from typing import Any

import yaml

from mmdist.config import FUSION_STAGES, FUSIONS, Config, ConfigError


def parse_space_arg(item: str) -> tuple[str, Any]:
    """``model.fusion=concat,add`` -> (key, [..]); ``train.lr=loguniform:1e-4:1e-2`` -> range."""
    if "=" not in item:
        raise ConfigError([f"--space {item!r}: expected KEY=SPEC, e.g. model.fusion=concat,add"])
    key, spec = item.split("=", 1)
    key, spec = key.strip(), spec.strip()
    for kind in ("loguniform", "uniform"):
        if spec.startswith(kind + ":"):
            parts = spec.split(":")
            try:
                lo, hi = float(parts[1]), float(parts[2])
            except (IndexError, ValueError):
                raise ConfigError([f"--space {item!r}: expected {kind}:LO:HI"]) from None
            return key, {kind: [lo, hi]}
    return key, [yaml.safe_load(v) for v in spec.split(",") if v.strip()]


def default_space(cfg: Config) -> dict[str, Any]:
    """Every fusion method x every stage valid for this config, and a log-uniform lr range."""
    pairs = valid_fusion_pairs(cfg)
    return {"model.fusion": sorted({f for f, _ in pairs}, key=FUSIONS.index),
            "model.fusion_stage": sorted({s for _, s in pairs}, key=FUSION_STAGES.index),
            "train.lr": {"loguniform": [cfg.train.lr / 3, cfg.train.lr * 3]}}


def valid_fusion_pairs(cfg: Config) -> list[tuple[str, str]]:
    out = []
    for f, s in itertools.product(FUSIONS, FUSION_STAGES):
        try:
            cfg.override({"model.fusion": f, "model.fusion_stage": s})
            out.append((f, s))
        except ConfigError:
            pass
    return out


def resolve_space(cfg: Config, space_args: list[str]) -> dict[str, Any]:
    space = dict(cfg.tune.space or default_space(cfg))
    for item in space_args:
        key, spec = parse_space_arg(item)
        space[key] = spec
    cfg.override({"tune.space": space})  # validates every key and choice, all at once
    return space


def _choices(spec: Any) -> list | None:
    """The values of a finite dimension (a list, or {choice: [...]}); None for a range."""
    if isinstance(spec, list):
        return spec
    return spec.get("choice") if isinstance(spec, dict) else None


def refusal(cfg: Config, overrides: dict[str, Any]) -> str | None:
    """Why the config refuses ``overrides`` (its problems, each naming key and value), or None."""
    try:
        cfg.override(overrides)
        return None
    except ConfigError as e:
        return "; ".join(e.problems)


def space_points(cfg: Config, space: dict[str, Any]) -> tuple[list[dict], list[dict]]:
    """Every combination of the space's finite dimensions (lists and {choice: [...]}): those the
    config accepts, and those it refuses as ``{"overrides": {...}, "reason": "..."}``.

    Each value was checked on its own when the space was resolved; a combination can still be
    refused by a rule across keys (``model.fusion=attention`` with ``model.fusion_stage=late``).
    Those never become trials. Ranges are not enumerated: a sampled value the config refuses
    fails its trial before training starts.
    """
    keys = [k for k, spec in space.items() if _choices(spec) is not None]
    valid, dropped = [], []
    for combo in itertools.product(*(_choices(space[k]) for k in keys)):
        point = dict(zip(keys, combo))
        reason = refusal(cfg, point)
        if reason:
            dropped.append({"overrides": point, "reason": reason})
        else:
            valid.append(point)
    return valid, dropped


def to_tune_space(space: dict[str, Any], search: str,
                  points: list[dict] | None = None) -> dict[str, Any]:
    """Tune's param space for ``space``, over the combinations ``points`` of its finite
    dimensions (default: all of them; see :func:`space_points`).

    The finite dimensions are one joint key, ``_point``, so that a refused combination is never
    made: with ``search=grid`` a grid over the points (lists are grid dimensions), else a
    uniform choice among them (uniform over the accepted combinations, what resampling the
    refused ones would give). ``{choice: [...]}`` dimensions under a grid are sampled per trial
    as ``_choice``, among the completions the config accepts for that trial's grid point.
    Ranges stay independent keys.
    """
    from ray import tune  # heavy: not loaded for --help

    finite = [k for k, spec in space.items() if _choices(spec) is not None]
    if points is None:
        points = [dict(zip(finite, c))
                  for c in itertools.product(*(_choices(space[k]) for k in finite))]
    grid_keys = [k for k in finite if search == "grid" and isinstance(space[k], list)]
    out: dict[str, Any] = {}
    if finite and not grid_keys:
        out["_point"] = tune.choice(points)
    elif finite and len(grid_keys) == len(finite):
        out["_point"] = tune.grid_search(points)
    elif finite:
        completions: list[tuple[dict, list[dict]]] = []
        for p in points:
            head = {k: p[k] for k in grid_keys}
            tail = {k: v for k, v in p.items() if k not in grid_keys}
            for h, tails in completions:
                if h == head:
                    tails.append(tail)
                    break
            else:
                completions.append((head, [tail]))
        out["_point"] = tune.grid_search([h for h, _ in completions])
        out["_choice"] = tune.sample_from(functools.partial(_pick_completion, completions))
    ranges = {"loguniform": tune.loguniform, "uniform": tune.uniform}
    for key, spec in space.items():
        if key not in finite:
            kind, args = next(iter(spec.items()))
            out[key] = ranges[kind](*args)
    return out


def _pick_completion(completions: list[tuple[dict, list[dict]]], config: dict) -> dict:
    """The sampled dimensions of one grid trial: one of the accepted completions of its point."""
    head = dict(config["_point"])
    return random.choice(next(tails for h, tails in completions if h == head))


def expected_trials(tune_space: dict[str, Any], num_samples: int) -> int:
    """How many trials Tune makes of ``tune_space`` (what :func:`to_tune_space` built): every
    grid point ``num_samples`` times; sampled keys do not multiply."""
    n = num_samples
    for spec in tune_space.values():
        if isinstance(spec, dict) and set(spec) == {"grid_search"}:
            n *= len(spec["grid_search"])
    return n


def trial_overrides(config: dict[str, Any]) -> dict[str, Any]:
    """The dotted config keys of one trial: its point, its sampled choices, its ranges (Tune adds
    nothing else to our param space). Sweeps saved before points existed had only dotted keys."""
    out = dict(config.get("_point") or {})
    out.update(config.get("_choice") or {})
    out.update({k: v for k, v in config.items() if "." in k})
    return out
