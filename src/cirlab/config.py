"""Configs are dataclasses: strict loading from dicts, YAML/JSON presets and type-checked ``--set`` overrides.

Every config in cirlab is a (possibly nested) dataclass. ``from_dict`` rejects unknown keys and wrong types,
``apply_overrides`` applies ``a.b=value`` strings the same way, so a typo in a preset or on the command line is an
error that names the key instead of a silently ignored setting.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import types
import typing
from pathlib import Path
from typing import Any, TypeVar

from cirlab.io import atomic_write_text

C = TypeVar("C")

BUDGET = "budget"
"""Field-metadata key marking a compute budget (``budget_field``): ``"steps"`` or ``"items"``."""


class ConfigError(ValueError):
    """A config key is unknown, or a value has the wrong type."""


def to_dict(cfg: Any) -> dict[str, Any]:
    """Converts a dataclass config (recursively) into plain JSON-serialisable containers."""
    if not dataclasses.is_dataclass(cfg):
        raise TypeError(f"expected a dataclass instance, got {type(cfg).__name__}")
    return _plain(dataclasses.asdict(cfg))


def _plain(obj: Any) -> Any:
    # Tuples become lists so that JSON and YAML (safe_dump) both serialise every config.
    if isinstance(obj, dict):
        return {k: _plain(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_plain(v) for v in obj]
    return obj


def _field_types(cls: type) -> dict[str, Any]:
    hints = typing.get_type_hints(cls)
    return {f.name: hints[f.name] for f in dataclasses.fields(cls) if f.init}


def _coerce(value: Any, tp: Any, key: str) -> Any:
    """Checks ``value`` against annotation ``tp`` and converts where lossless (int -> float, list -> tuple)."""
    if tp is Any:
        return value
    origin = typing.get_origin(tp)
    args = typing.get_args(tp)
    if origin in (typing.Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        errors = []
        for arg in args:
            if arg is type(None):
                continue
            try:
                return _coerce(value, arg, key)
            except ConfigError as err:
                errors.append(str(err))
        raise ConfigError(f"{key}: {value!r} matches none of {tp}")
    if origin is typing.Literal:
        if value not in args:
            raise ConfigError(f"{key}: {value!r} is not one of {list(args)}")
        return value
    if origin in (list, tuple):
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"{key}: expected a list, got {value!r}")
        if origin is tuple and len(args) == 2 and args[1] is Ellipsis:
            return tuple(_coerce(v, args[0], f"{key}[{i}]") for i, v in enumerate(value))
        if origin is tuple and args:
            if len(args) != len(value):
                raise ConfigError(f"{key}: expected {len(args)} items, got {len(value)}")
            return tuple(_coerce(v, a, f"{key}[{i}]") for i, (a, v) in enumerate(zip(args, value, strict=True)))
        item = args[0] if args else Any
        out = [_coerce(v, item, f"{key}[{i}]") for i, v in enumerate(value)]
        return tuple(out) if origin is tuple else out
    if origin is dict:
        if not isinstance(value, dict):
            raise ConfigError(f"{key}: expected a mapping, got {value!r}")
        kt, vt = args if args else (Any, Any)
        return {_coerce(k, kt, key): _coerce(v, vt, f"{key}.{k}") for k, v in value.items()}
    if dataclasses.is_dataclass(tp):
        if isinstance(value, tp):
            return value
        if not isinstance(value, dict):
            raise ConfigError(f"{key}: expected a mapping for {tp.__name__}, got {value!r}")
        return from_dict(tp, value, prefix=f"{key}.")
    if tp is float:
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ConfigError(f"{key}: expected a number, got {value!r}")
        return float(value)
    if tp is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise ConfigError(f"{key}: expected an integer, got {value!r}")
        return value
    if tp is bool:
        if not isinstance(value, bool):
            raise ConfigError(f"{key}: expected true/false, got {value!r}")
        return value
    if tp is str:
        if not isinstance(value, str):
            raise ConfigError(f"{key}: expected a string, got {value!r}")
        return value
    if isinstance(tp, type) and not isinstance(value, tp):
        raise ConfigError(f"{key}: expected {tp.__name__}, got {value!r}")
    return value


def from_dict(cls: type[C], data: dict[str, Any], prefix: str = "") -> C:
    """Builds dataclass ``cls`` from ``data``; unknown keys and wrong types raise ``ConfigError``."""
    if not isinstance(data, dict):
        raise ConfigError(f"{prefix or 'config'}: expected a mapping, got {type(data).__name__}")
    fields = _field_types(cls)
    unknown = sorted(set(data) - set(fields))
    if unknown:
        raise ConfigError(f"unknown config key(s) {', '.join(prefix + k for k in unknown)}; known: {', '.join(fields)}")
    kwargs = {k: _coerce(v, fields[k], prefix + k) for k, v in data.items()}
    return cls(**kwargs)


def _parse_value(text: str) -> Any:
    """Parses an override value as YAML (numbers, booleans, lists, null); bare words stay strings."""
    import yaml

    try:
        value = yaml.safe_load(text)
    except yaml.YAMLError:
        return text
    if isinstance(value, str):
        # YAML 1.1 reads "3e-4" (no dot) as a string; numbers written that way are common on command lines.
        for number in (int, float):
            try:
                return number(text)
            except ValueError:
                pass
    return value


def _accepts_str(tp: Any) -> bool:
    return tp is str or (typing.get_origin(tp) in (typing.Union, types.UnionType) and str in typing.get_args(tp))


def apply_overrides(cfg: C, overrides: list[str] | tuple[str, ...]) -> C:
    """Returns a copy of ``cfg`` with ``key.sub=value`` overrides applied, type-checked against the fields.

    Raises:
        ConfigError: for a malformed override, an unknown key or a value of the wrong type.
    """
    data = to_dict(cfg)
    for item in overrides:
        if "=" not in item:
            raise ConfigError(f"override {item!r} is not of the form key=value")
        key, raw = item.split("=", 1)
        key = key.strip()
        parts = key.split(".")
        node_cls: Any = type(cfg)
        node = data
        for depth, part in enumerate(parts):
            fields = _field_types(node_cls) if dataclasses.is_dataclass(node_cls) else {}
            if part not in fields:
                where = ".".join(parts[:depth]) or "config"
                raise ConfigError(f"unknown config key {key!r} ({part!r} not in {where}; known: {', '.join(fields)})")
            tp = fields[part]
            if depth == len(parts) - 1:
                value = _parse_value(raw)
                if _accepts_str(tp):
                    # A string field keeps the raw text ("123" stays "123"); only an explicit null clears it.
                    value = None if value is None and raw.lower() in ("null", "none", "~", "") else raw
                coerced = _coerce(value, tp, key)
                node[part] = to_dict(coerced) if dataclasses.is_dataclass(tp) else coerced
            else:
                if not dataclasses.is_dataclass(tp):
                    raise ConfigError(f"config key {'.'.join(parts[: depth + 1])!r} has no sub-keys")
                node_cls, node = tp, node[part]
    return from_dict(type(cfg), data)


def load_config(cls: type[C], path: str | Path) -> C:
    """Loads a YAML or JSON preset into dataclass ``cls``; errors name the file."""
    import yaml

    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path}: config file not found")
    text = path.read_text(encoding="utf-8")
    try:
        data = json.loads(text) if path.suffix == ".json" else yaml.safe_load(text)
    except (json.JSONDecodeError, yaml.YAMLError) as err:
        raise ConfigError(f"{path}: cannot parse: {err}") from None
    try:
        return from_dict(cls, data or {})
    except ConfigError as err:
        raise ConfigError(f"{path}: {err}") from None


def save_config(cfg: Any, path: str | Path) -> None:
    """Writes ``cfg`` as JSON or YAML (by suffix) atomically."""
    path = Path(path)
    data = to_dict(cfg)
    if path.suffix in (".yaml", ".yml"):
        import yaml

        atomic_write_text(path, yaml.safe_dump(data, sort_keys=False))
    else:
        atomic_write_text(path, json.dumps(data, indent=2) + "\n")


def budget_field(default: int, kind: str) -> Any:
    """A dataclass field holding a compute budget that a dry run may cap (``shrink_budgets``).

    Args:
        default: the field's default.
        kind: ``"steps"`` (optimisation steps: capped at the dry run's steps) or ``"items"`` (how many items are
            processed, 0 meaning all of them: capped at the dry run's sample limit).
    """
    if kind not in ("steps", "items"):
        raise ValueError(f"budget kind must be 'steps' or 'items', got {kind!r}")
    return dataclasses.field(default=default, metadata={BUDGET: kind})


def shrink_budgets(cfg: C, steps: int, items: int) -> C:
    """A copy of the dataclass ``cfg`` (nested dataclasses included) with every ``budget_field`` capped: ``steps``
    fields at ``steps``, ``items`` fields at ``items`` (an ``items`` value of 0, meaning all, becomes ``items``).
    Anything that is not a dataclass is returned as it is."""
    if not dataclasses.is_dataclass(cfg) or isinstance(cfg, type):
        return cfg
    changes: dict[str, Any] = {}
    for f in dataclasses.fields(cfg):
        if not f.init:
            continue
        value = getattr(cfg, f.name)
        kind = f.metadata.get(BUDGET)
        if kind == "steps":
            changes[f.name] = min(value, steps)
        elif kind == "items":
            changes[f.name] = min(value, items) if value else items
        elif dataclasses.is_dataclass(value):
            changes[f.name] = shrink_budgets(value, steps, items)
    return dataclasses.replace(cfg, **changes)


def config_digest(obj: Any, length: int = 12) -> str:
    """A short SHA-1 of a JSON-able value (configs as ``to_dict`` gives them, ids, seeds): the name of a
    content-addressed folder, equal whenever the value is. Values JSON cannot encode enter as ``str(value)``."""
    return hashlib.sha1(json.dumps(obj, sort_keys=True, default=str).encode()).hexdigest()[:length]
