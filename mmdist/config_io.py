"""How text becomes a config and a config's problems become text, for ``mmdist.config`` only.

Dotted ``key=value`` overrides merged into a nested dict, CLI strings read as YAML for the type
of their field, and pydantic's validation errors turned into one ``key=value: problem`` line
each, with every problem found in one call; YAML is read by :func:`load_yaml`, which refuses
Python tags, oversized texts and alias bombs. Imports nothing from mmdist: ``mmdist.config`` is
its one user.
"""

from __future__ import annotations

import re
import types
import typing
from pathlib import Path
from typing import Any, Literal, get_args, get_origin

import yaml
from pydantic import BaseModel, ValidationError, ValidationInfo

_NONE = ("none", "null", "~")
_BOUNDS = {"ge": ">=", "gt": ">", "le": "<=", "lt": "<"}
MAX_YAML_BYTES = 1 << 20  # a config file is a few kB
MAX_YAML_NODES = 100_000  # values after aliases are expanded (a billion laughs has 10**9)


class YAMLBomb(yaml.YAMLError):
    """YAML whose aliases expand to more values than any config holds, or refer to themselves."""


def load_yaml(text: str) -> Any:
    """``yaml.safe_load`` (no Python tags: they are refused) that also refuses a text over
    :data:`MAX_YAML_BYTES` and aliases that expand past :data:`MAX_YAML_NODES` values or into
    themselves, before anything is built from them.

    Raises:
        yaml.YAMLError: not YAML, a Python tag, or one of the above (:class:`YAMLBomb`).
    """
    if len(text) > MAX_YAML_BYTES:
        raise YAMLBomb(f"{len(text)} characters; a config is at most {MAX_YAML_BYTES}")
    node = yaml.compose(text, Loader=yaml.SafeLoader)
    if node is None:
        return None
    sizes: dict[int, int] = {}

    def size(n: yaml.Node, open_: set[int]) -> int:
        if id(n) in sizes:
            return sizes[id(n)]
        if id(n) in open_:
            raise YAMLBomb(f"line {n.start_mark.line + 1}: an alias refers to itself")
        open_.add(id(n))
        total = 1
        if isinstance(n, yaml.SequenceNode):
            total += sum(size(c, open_) for c in n.value)
        elif isinstance(n, yaml.MappingNode):
            total += sum(size(k, open_) + size(v, open_) for k, v in n.value)
        open_.discard(id(n))
        sizes[id(n)] = total
        if total > MAX_YAML_NODES:
            raise YAMLBomb(f"line {n.start_mark.line + 1}: its aliases expand to {total:,} "
                           f"values or more; a config holds at most {MAX_YAML_NODES:,}")
        return total

    size(node, set())
    return yaml.safe_load(text)


def from_text(value: Any, tp: Any) -> Any:
    """What ``value`` means for a field of type ``tp``, the way the CLI and YAML spell it: a
    string is read as YAML (``1e-3``, ``true``, ``[a, b]``, ``{a: 1}``) unless the field holds
    strings, ``a,b`` is a list, ``none``/``null``/``~`` is None for an optional field, an
    integral float an int. What still does not fit is left for the strict type check."""
    if get_origin(tp) in (typing.Union, types.UnionType):  # X | None
        if value is None or (isinstance(value, str) and value.lower() in _NONE):
            return None
        tp = next(a for a in get_args(tp) if a is not type(None))
    base = type(get_args(tp)[0]) if get_origin(tp) is Literal else get_origin(tp) or tp
    if isinstance(value, str) and base is not str:
        try:
            value = load_yaml(value)
        except yaml.YAMLError:
            return value
    if base is float and isinstance(value, str):  # YAML 1.1 reads 1e-3 (no dot) as a string
        try:
            return float(value)
        except ValueError:
            return value
    if base is int and isinstance(value, float) and value.is_integer():
        return int(value)
    if base is list and isinstance(value, str):
        value = [v.strip() for v in value.split(",") if v.strip()]
    if base is list and isinstance(value, (list, tuple)):
        return [from_text(v, get_args(tp)[0]) for v in value]
    if base is dict and isinstance(value, dict):
        return {k: from_text(v, get_args(tp)[1]) for k, v in value.items()}
    return value


def read_text(cls: type[BaseModel], value: Any, info: ValidationInfo) -> Any:
    """The before-validator of every field: :func:`from_text` for the field's type."""
    return from_text(value, cls.model_fields[info.field_name].annotation)


def report(model: BaseModel, info: ValidationInfo, rules: list[tuple[Any, str]]) -> Any:
    """The end of a rule validator: the messages of the broken ``(broken, message)`` rules go
    to ``context["problems"]`` (:func:`validate_all`, every problem at once), else raise."""
    problems, sink = [m for broken, m in rules if broken], (info.context or {}).get("problems")
    if sink is None and problems:
        raise ValueError("; ".join(problems))
    if sink is not None:
        sink.extend(problems)
    return model


def flatten(d: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    """``{"train": {"lr": 0.1}}`` -> ``{"train.lr": 0.1}``; only the sections nest, dict-valued
    fields (``model.task_weights``, ``tune.space``) stay whole."""
    out: dict[str, Any] = {}
    for k, v in d.items():
        if isinstance(v, dict) and not prefix:
            out.update(flatten(v, f"{k}."))
        else:
            out[f"{prefix}{k}"] = v
    return out


def read_yaml(name_or_path: str, config_dir: Path) -> tuple[Path, dict[str, Any], list[str]]:
    """The preset ``name_or_path`` (``config_dir/<name>.yaml``) or else that YAML file: its path,
    its mapping of sections, and the problems that make it not one.

    Raises:
        FileNotFoundError: neither exists; the message lists the presets.
    """
    path = Path(name_or_path)
    if not path.suffix and (config_dir / f"{name_or_path}.yaml").exists():
        path = config_dir / f"{name_or_path}.yaml"
    if not path.exists():
        presets = sorted(p.stem for p in config_dir.glob("*.yaml"))
        raise FileNotFoundError(
            f"config {name_or_path!r}: no such file and no such preset; presets: {presets}")
    try:
        raw = load_yaml(path.read_text()) or {}
    except yaml.YAMLError as e:
        return path, {}, [f"{path}: not valid YAML: {e}"]
    if not isinstance(raw, dict):
        return path, {}, [f"{path}: top level must be a mapping of sections"]
    return path, raw, []


def build(cls: type[BaseModel], base: Any,
          overrides: list[str] | dict[str, Any]) -> tuple[Any, list[str]]:
    """``(cls instance or None, problems)`` of nested dict ``base`` with dotted overrides."""
    if not isinstance(base, dict):
        return None, [f"<root>: expected a mapping, got {base!r}"]
    merged, problems = merge_overrides(base, overrides, list(cls.model_fields))
    obj, found = validate_all(cls, merged)
    return obj, problems + found


def space_problems(cls: type[BaseModel], config: dict[str, Any]) -> list[str]:
    """The problems of ``config["tune"]["space"]``, a sweep space ``{key: [choices] |
    {loguniform|uniform|choice: [...]}}``: every key is one of ``config``'s dotted keys, and every
    listed choice builds a valid ``cls`` from ``config`` (its space left out)."""
    p, keys = [], set(flatten(config))
    base = {**config, "tune": {**config["tune"], "space": {}}}
    for key, spec in config["tune"]["space"].items():
        if key not in keys:
            p.append(f"tune.space.{key}: not a config key")
        elif isinstance(spec, dict) and (len(spec) != 1 or set(spec) - {"loguniform", "uniform",
                                                                         "choice"}):
            p.append(f"tune.space.{key}={spec!r}: use a list of choices or one of "
                     "{loguniform: [lo, hi]}, {uniform: [lo, hi]}, {choice: [...]}")
        elif not isinstance(spec, (list, dict)) or not spec:
            p.append(f"tune.space.{key}={spec!r}: expected a non-empty list of choices")
        for v in spec if key in keys and isinstance(spec, list) else []:
            p.extend(f"tune.space.{key}: choice {v!r} is invalid: {x}"
                     for x in build(cls, base, {key: v})[1] if x.startswith(key))
    return p


def merge_overrides(base: dict[str, Any], overrides: list[str] | dict[str, Any],
                    sections: list[str]) -> tuple[dict[str, Any], list[str]]:
    """A copy of ``base`` with dotted overrides (``["a.b=1"]`` or ``{"a.b": 1}``) set, and the
    problems of overrides that name no key. ``tune.space.model.fusion=...``: past the field,
    the rest of the key is one key of that dict-valued field."""
    problems: list[str] = []
    if isinstance(overrides, dict):
        parsed = dict(overrides)
    else:
        parsed = {}
        for item in overrides:
            if "=" not in item:
                problems.append(f"{item!r}: overrides look like key=value (e.g. "
                                "model.fusion=attention)")
                continue
            k, v = item.split("=", 1)
            parsed[k.strip()] = v
    merged = _copy(base)
    for key, value in parsed.items():
        parts = key.split(".")
        if parts[0] not in sections:
            problems.append(f"{key}: unknown section {parts[0]!r}; choose from {sorted(sections)}")
        elif len(parts) < 2:
            problems.append(f"{key}: name a key inside the section, e.g. {key}.<name>=...")
        elif len(parts) == 2:
            merged.setdefault(parts[0], {})[parts[1]] = value
        else:
            section = merged.setdefault(parts[0], {})
            if not isinstance(section.get(parts[1]), dict):
                section[parts[1]] = {}
            section[parts[1]][".".join(parts[2:])] = value
    return merged, problems


def validate_all(cls: type[BaseModel], raw: dict[str, Any]) -> tuple[Any, list[str]]:
    """``(cls instance or None, problems)``: every problem at once, each naming its key.

    The model's rule validators append to ``context["problems"]``. A value that fails its field
    is dropped and the rest validated again (its default stands in), so the rules of that
    section and those across sections still run, as they would in one pass over all the keys.
    """
    data, problems = _copy(raw), []
    while True:
        found: list[str] = []
        try:
            obj = cls.model_validate(data, context={"problems": found})
        except ValidationError as e:
            obj = None
            found += [_problem(cls, err, raw) for err in e.errors()]
            dropped = [_drop(data, err["loc"][:2]) for err in e.errors()]
        problems += [x for x in found if x not in problems]
        if obj is not None or not any(dropped):
            return obj, problems


def _problem(cls: type[BaseModel], err: dict[str, Any], raw: dict[str, Any]) -> str:
    """One pydantic error as ``key=value: what is wrong``. Sections nest one level, so the
    field is ``loc[:2]``; deeper parts are list items and dict entries of that field."""
    loc, kind, value = err["loc"][:2], err["type"], err.get("input")
    owner = cls
    for part in loc[:-1]:
        owner = owner.model_fields[part].annotation
    field = owner.model_fields.get(loc[-1]) if loc else None
    key, given = ".".join(map(str, loc)) or "<root>", _get(raw, loc)
    if kind == "extra_forbidden":
        return f"{key}: unknown key; known keys: {sorted(owner.model_fields)}"
    if kind == "model_type":
        return f"{key}: expected a mapping, got {value!r}"
    if kind == "literal_error" and len(err["loc"]) == 2:
        return f"{key}={value!r}: choose from {list(get_args(field.annotation))}"
    if kind == "literal_error":  # an item of a list of choices
        choices = list(get_args(get_args(field.annotation)[0]))
        return (f"{key}={from_text(given, field.annotation)!r}: unknown {value!r}; "
                f"choose from {choices}")
    if kind == "string_pattern_mismatch":
        return f"{key}={value!r}: must match {err['ctx']['pattern']!r}"
    if kind in ("too_short", "string_too_short"):
        return f"{key}={value!r}: must not be empty"
    if kind in ("greater_than", "greater_than_equal", "less_than", "less_than_equal"):
        b = {k: getattr(m, k) for m in field.metadata for k in _BOUNDS if hasattr(m, k)}
        rule = " ".join(f"{_BOUNDS[k]} {v}" for k, v in b.items())
        if len(b) == 2:  # an interval: [0, 1)
            rule = (f"in {'[' if 'ge' in b else '('}{b.get('ge', b.get('gt'))}, "
                    f"{b.get('le', b.get('lt'))}{']' if 'le' in b else ')'}")
        value = float(value) if field.annotation is float else value
        hint = f" ({field.description})" if field.description else ""
        return f"{key}={value}: must be {rule}{hint}"
    if kind.endswith(("_type", "_parsing")) and field is not None:
        return f"{key}={given!r}: expected {_type_name(field.annotation)}"
    return f"{key}={value!r}: {err['msg']}"


def _type_name(tp: Any) -> str:
    """``float``, ``str | None``, ``list[str]`` (a list of choices), ``dict[str, Any]``."""
    name = tp.__name__ if isinstance(tp, type) else str(tp).replace("typing.", "")
    return re.sub(r"Literal\[[^]]*\]", "str", name)


def _get(d: Any, loc: tuple) -> Any:
    for part in loc:
        d = d.get(part) if isinstance(d, dict) else None
    return d


def _drop(d: dict[str, Any], loc: tuple) -> bool:
    """Remove the value at ``loc`` from nested ``d``; whether there was one to remove."""
    parent = _get(d, loc[:-1])
    if not loc or not isinstance(parent, dict) or loc[-1] not in parent:
        return False
    del parent[loc[-1]]
    return True


def _copy(d: Any) -> Any:
    if isinstance(d, dict):
        return {k: _copy(v) for k, v in d.items()}
    if isinstance(d, list):
        return [_copy(v) for v in d]
    return d
