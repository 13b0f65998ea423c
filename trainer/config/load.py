"""Loading a config: YAML files, dotted overrides (flags, --set), validation, and the embedded default."""
from __future__ import annotations

import copy
import os
from pathlib import Path
from typing import Any

import yaml

from trainer.config.schema import from_dict
from trainer.config.sections import Config
from trainer.core.errors import ConfigError, UserError

DEMO_CONFIG = Path(__file__).parent / "defaults" / "digits.yaml"


def parse_override(text: str) -> tuple[str, Any]:
    if "=" not in text:
        raise UserError(f"--set {text}: expected PATH=VALUE, e.g. training.batch_size=32")
    key, raw = text.split("=", 1)
    try:
        value = yaml.safe_load(raw)
    except yaml.YAMLError:
        value = raw
    return key.strip(), value


def apply_override(data: dict, key: str, value) -> None:
    node = data
    parts = key.split(".")
    for part in parts[:-1]:
        if not isinstance(node.get(part), dict):
            node[part] = {}
        node = node[part]
    node[parts[-1]] = value


def read_yaml(path: str | os.PathLike) -> dict:
    path = Path(path)
    if not path.is_file():
        raise UserError(f"{path}: config file not found")
    try:
        data = yaml.safe_load(path.read_text())
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        at = f" at line {mark.line + 1}, column {mark.column + 1}" if mark else ""
        problem = getattr(e, "problem", None) or "invalid YAML"
        raise ConfigError(f"{path}: malformed YAML{at}: {problem}") from None
    except UnicodeDecodeError:
        raise ConfigError(f"{path}: not a text file") from None
    if data is None:
        data = {}
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: expected a mapping at the top level, got {type(data).__name__}")
    return data


def load_config(path: str | os.PathLike | None = None, overrides: dict | None = None,
                data: dict | None = None) -> Config:
    """Load and validate a config file; `overrides` maps dotted paths to values (flags, --set)."""
    where = str(path) if path is not None else "<config>"
    data = copy.deepcopy(data) if data is not None else (read_yaml(path) if path is not None else {})
    for key, value in (overrides or {}).items():
        apply_override(data, key, value)
    data.pop("source", None)
    cfg = from_dict(Config, data, where)
    cfg.source = str(Path(path).resolve()) if path is not None else None
    return cfg


def dump_config(cfg: Config) -> str:
    return yaml.safe_dump(cfg.to_dict(), sort_keys=False)
