"""Loading a config: YAML files, dotted overrides (flags, --set), validation, and the embedded default."""

from __future__ import annotations

import copy
import os
import warnings
from pathlib import Path
from typing import Any

import yaml

from trainer.config.recipes import apply_recipe
from trainer.config.schema import ConfigWarning, from_dict
from trainer.config.sections import Config
from trainer.core.errors import ConfigError, UserError

DEMO_CONFIG = Path(__file__).parent / "defaults" / "digits.yaml"
# its class-conditional twin (`advdiff demo --conditional`)
CONDITIONAL_DEMO_CONFIG = Path(__file__).parent / "defaults" / "digits_conditional.yaml"

# The seed system's words for what advdiff spells otherwise (listed in docs/CONFIG.md below the field table).
# Each is read with one warning that names advdiff's spelling; what advdiff cannot honour is refused.
SEED_VALUES = {  # path -> {seed value: advdiff value}
    "scheduler.type": {"CosineScheduler": "cosine", "LinearScheduler": "linear"},
    "training.scheduler.type": {"CosineScheduler": "cosine"},
}
NO_FEATURE_MAPS = "feature-map conditioning is not supported; class labels: unet.num_class_embeds"
SEED_ONLY_VALUE = {  # path -> (values that ask for what advdiff does anyway, how it reads in YAML, why)
    "unet.cond_channels": (
        (0, None),
        "0",
        NO_FEATURE_MAPS,
    ),
    "unet.fusion_mode": (
        ("none", None),
        "none",
        NO_FEATURE_MAPS,
    ),
    "training.use_weighted_sampling": (
        (False, None),
        "false",
        "weighted sampling is not supported; rows are drawn uniformly",
    ),
}
SEED_DROPPED = {  # path -> what advdiff does instead (the key is ignored)
    "training.save_interval": "checkpoints are written at every validation: training.eval_interval (stage 0: "
    "autoencoder.training.eval_interval; stage 2: stage2.diffusion_eval_interval), in steps",
}


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


def load_config(
    path: str | os.PathLike | None = None, overrides: dict | None = None, data: dict | None = None
) -> Config:
    """Load and validate a config file; `overrides` maps dotted paths to values (flags, --set)."""
    where = str(path) if path is not None else "<config>"
    data = copy.deepcopy(data) if data is not None else (read_yaml(path) if path is not None else {})
    for key, value in (overrides or {}).items():
        apply_override(data, key, value)
    apply_recipe(data, overrides or {}, where)  # stage2.recipes: settings by step count (flags win)
    data.pop("source", None)
    read_seed_words(data, where)
    cfg = from_dict(Config, data, where)
    cfg.source = str(Path(path).resolve()) if path is not None else None
    return cfg


def _parent(data: dict, path: str) -> tuple[dict | None, str]:
    """(the mapping that holds `path`'s last key, that key); None when the path is not there."""
    *parents, leaf = path.split(".")
    node = data
    for part in parents:
        node = node.get(part) if isinstance(node, dict) else None
    return (node if isinstance(node, dict) and leaf in node else None), leaf


def _yaml(value) -> str:
    return yaml.safe_dump(value, default_flow_style=True).strip().removesuffix("...").strip()


def read_seed_words(data: dict, where: str) -> None:
    """Rewrite the seed system's spellings in `data` (in place) into advdiff's, one warning each; refuse
    the values advdiff cannot honour with one ConfigError line."""
    for path, names in SEED_VALUES.items():
        node, key = _parent(data, path)
        if node is not None and isinstance(node[key], str) and node[key] in names:
            warnings.warn(
                f"{where}: {path}: {node[key]} read as {names[node[key]]} (write {path}: {names[node[key]]})",
                ConfigWarning,
                stacklevel=3,
            )
            node[key] = names[node[key]]
    for path, (accepted, shown, why) in SEED_ONLY_VALUE.items():
        node, key = _parent(data, path)
        if node is None:
            continue
        value = node.pop(key)
        if not any(value is a or (type(value) is type(a) and value == a) for a in accepted):
            raise ConfigError(f"{where}: {path}: expected {shown} ({why}), got {_yaml(value)}")
        warnings.warn(
            f"{where}: {path}: {shown} is what advdiff always does; key ignored", ConfigWarning, stacklevel=3
        )
    for path, instead in SEED_DROPPED.items():
        node, key = _parent(data, path)
        if node is not None:
            node.pop(key)
            warnings.warn(f"{where}: {path}: ignored; {instead}", ConfigWarning, stacklevel=3)


def dump_config(cfg: Config) -> str:
    return yaml.safe_dump(cfg.to_dict(), sort_keys=False)
