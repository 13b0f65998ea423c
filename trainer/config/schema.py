"""Loading nested dataclasses from plain dicts, with errors that name the YAML path.

Every config field is declared with `option(default, doc, ...)`. The loader checks types and
ranges, warns about keys it does not know (never crashing on them), and names the full path
(`training.loss.losses[1].weight`) in every error.
"""

from __future__ import annotations

import dataclasses
import types
import typing
import warnings
from typing import Any, Union

from trainer.core.errors import ConfigError


def option(
    default=dataclasses.MISSING,
    doc: str = "",
    *,
    choices=None,
    ge=None,
    gt=None,
    le=None,
    lt=None,
    factory=None,
):
    """A config field with a one-line doc and optional checks."""
    meta = {"doc": doc, "choices": choices, "ge": ge, "gt": gt, "le": le, "lt": lt}
    if factory is not None:
        return dataclasses.field(default_factory=factory, metadata=meta)
    return dataclasses.field(default=default, metadata=meta)


class ConfigWarning(UserWarning):
    """A config key that advdiff does not use."""


def _describe(tp) -> str:
    origin = typing.get_origin(tp)
    args = typing.get_args(tp)
    if origin in (Union, types.UnionType):
        inner = [a for a in args if a is not type(None)]
        return " or ".join(_describe(a) for a in inner) + (" or null" if len(inner) < len(args) else "")
    if origin is list:
        return f"a list of {_describe(args[0])}s" if args else "a list"
    if origin is dict:
        return "a mapping"
    if dataclasses.is_dataclass(tp):
        return "a mapping"
    return {int: "an integer", float: "a number", str: "a string", bool: "true or false"}.get(tp, str(tp))


def _fail(where: str, path: str, expected: str, value) -> ConfigError:
    shown = f'"{value}"' if isinstance(value, str) else repr(value)
    if isinstance(value, (dict, list)) and len(shown) > 60:
        shown = shown[:57] + "..."
    return ConfigError(f"{where}: {path}: expected {expected}, got {shown}")


def _convert(tp, value, path: str, where: str, meta: dict | None = None):
    origin = typing.get_origin(tp)
    args = typing.get_args(tp)
    if origin in (Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        inner = [a for a in args if a is not type(None)]
        errors = []
        for a in inner:
            try:
                return _convert(a, value, path, where, meta)
            except ConfigError as e:
                errors.append(e)
        if len(inner) == 1:
            raise errors[0]
        raise _fail(where, path, _describe(tp), value)
    if dataclasses.is_dataclass(tp):
        if value is None:
            value = {}
        if not isinstance(value, dict):
            raise _fail(where, path, "a mapping", value)
        return from_dict(tp, value, where, path)
    if origin is list:
        if isinstance(value, tuple):
            value = list(value)
        if not isinstance(value, list):
            raise _fail(where, path, _describe(tp), value)
        return [_convert(args[0], v, f"{path}[{i}]", where) for i, v in enumerate(value)]
    if origin is dict:
        if not isinstance(value, dict):
            raise _fail(where, path, "a mapping", value)
        ktp, vtp = args
        return {str(k): _convert(vtp, v, f"{path}.{k}", where) for k, v in value.items()}
    if tp is Any:
        return value
    if tp is bool:
        if not isinstance(value, bool):
            raise _fail(where, path, "true or false", value)
        return value
    if tp is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise _fail(where, path, _range_text("an integer", meta), value)
        _check_range(value, path, where, meta, "an integer")
        return value
    if tp is float:
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise _fail(where, path, _range_text("a number", meta), value)
        _check_range(float(value), path, where, meta, "a number")
        return float(value)
    if tp is str:
        if not isinstance(value, str):
            raise _fail(where, path, "a string", value)
        choices = (meta or {}).get("choices")
        if choices and value not in choices:
            raise _fail(where, path, "one of " + ", ".join(choices), value)
        return value
    raise TypeError(f"unsupported config type {tp} at {path}")


def _range_text(kind: str, meta: dict | None) -> str:
    meta = meta or {}
    parts = []
    if meta.get("ge") is not None:
        parts.append(f">= {meta['ge']}")
    if meta.get("gt") is not None:
        parts.append(f"> {meta['gt']}")
    if meta.get("le") is not None:
        parts.append(f"<= {meta['le']}")
    if meta.get("lt") is not None:
        parts.append(f"< {meta['lt']}")
    return kind + (" " + " and ".join(parts) if parts else "")


def _check_range(value, path, where, meta, kind):
    meta = meta or {}
    ok = True
    if meta.get("ge") is not None and not value >= meta["ge"]:
        ok = False
    if meta.get("gt") is not None and not value > meta["gt"]:
        ok = False
    if meta.get("le") is not None and not value <= meta["le"]:
        ok = False
    if meta.get("lt") is not None and not value < meta["lt"]:
        ok = False
    if value != value or value in (float("inf"), float("-inf")):
        ok = False
    if not ok:
        raise _fail(where, path, _range_text(kind, meta), value)


def from_dict(cls, data: dict, where: str, prefix: str = ""):
    """Build dataclass `cls` from `data`; unknown keys warn, bad values raise ConfigError."""
    hints = typing.get_type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls)}
    kwargs = {}
    for key, value in data.items():
        path = f"{prefix}.{key}" if prefix else str(key)
        if key not in fields:
            warnings.warn(f"{where}: {path}: unknown key, ignored", ConfigWarning, stacklevel=2)
            continue
        kwargs[key] = _convert(hints[key], value, path, where, fields[key].metadata)
    obj = cls(**kwargs)
    check = getattr(obj, "check", None)
    if check is not None:
        check(where, prefix)
    return obj


def to_dict(obj) -> Any:
    """A plain, YAML-safe dict of a config dataclass."""
    if dataclasses.is_dataclass(obj):
        return {f.name: to_dict(getattr(obj, f.name)) for f in dataclasses.fields(obj)}
    if isinstance(obj, (list, tuple)):
        return [to_dict(v) for v in obj]
    if isinstance(obj, dict):
        return {k: to_dict(v) for k, v in obj.items()}
    return obj


def walk_fields(cls, prefix: str = ""):
    """Yield (path, field) for every field of a nested config dataclass (used by docs and tests)."""
    hints = typing.get_type_hints(cls)
    for f in dataclasses.fields(cls):
        path = f"{prefix}.{f.name}" if prefix else f.name
        yield path, f
        tp = hints[f.name]
        for cand in (tp, *typing.get_args(tp)):
            if dataclasses.is_dataclass(cand):
                yield from walk_fields(cand, path)
            for sub in typing.get_args(cand):
                if dataclasses.is_dataclass(sub):
                    yield from walk_fields(sub, path + "[]")


def error_at(where: str, path: str, expected: str, value) -> ConfigError:
    """A ConfigError for cross-field checks in `check()` methods."""
    return _fail(where, path, expected, value)
