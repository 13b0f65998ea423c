"""stage2.recipes: settings by step count (docs/STAGE2.md#a-recipe-per-step-count).

A config may carry, under stage2.recipes, one mapping of settings per generation_steps value:

    stage2:
      generation_steps: 4
      recipes:
        1: {stage2.lr_schedule: constant, "training.loss.losses[DiscriminatorLoss].weight": 0.05}

When the run's stage2.generation_steps (after flags and --set) has a recipe, its settings replace the file's
own values; a flag or --set of the same path, or of a section above it, still wins. A path is a dotted
config path from the top; `losses[Type]` names every loss term of that type. Recipes are read before
validation, so a recipe's value is checked like any other, and an unknown path is refused in one line
naming the recipe.
"""

from __future__ import annotations

import re

from trainer.core.errors import ConfigError

TERM_PATH = re.compile(r"^(?P<list>[a-z_]+)\[(?P<type>[A-Za-z_][A-Za-z0-9_]*)\]$")


def _known_paths() -> set[str]:
    from trainer.config.schema import walk_fields
    from trainer.config.sections import Config

    return {path for path, _ in walk_fields(Config)}


def _step_count(data: dict) -> int:
    from trainer.config.sections_stage2 import Stage2Config

    s2 = data.get("stage2") if isinstance(data.get("stage2"), dict) else {}
    return s2.get("generation_steps", Stage2Config.generation_steps)


def recipe_for(data: dict, where: str) -> tuple[str, dict] | None:
    """(its key, the settings) of the recipe for the config's generation_steps, None where there is none;
    the recipes' shape is checked first (a mapping of step counts to mappings)."""
    s2 = data.get("stage2")
    recipes = s2.get("recipes") if isinstance(s2, dict) else None
    if recipes is None:
        return None
    if not isinstance(recipes, dict):
        raise ConfigError(f"{where}: stage2.recipes: expected a mapping of step counts to settings")
    for key, settings in recipes.items():
        if isinstance(key, bool) or not str(key).isdigit() or int(key) < 1:
            raise ConfigError(f"{where}: stage2.recipes: expected step counts >= 1 as keys, got {key!r}")
        if not isinstance(settings, dict):
            raise ConfigError(f"{where}: stage2.recipes.{key}: expected a mapping of config paths to values")
    k = _step_count(data)
    for key, settings in recipes.items():
        if int(key) == k:
            return str(key), settings
    return None


def apply_recipe(data: dict, overrides: dict, where: str) -> None:
    """Apply the recipe for the config's step count to `data` (in place), except the paths in `overrides`."""
    found = recipe_for(data, where)
    if found is None:
        return
    key, settings = found
    known = _known_paths()
    for path, value in settings.items():
        at = f"{where}: stage2.recipes.{key}: {path}"
        shape = re.sub(r"\[[A-Za-z0-9_]+\]", "[]", str(path))
        if shape not in known or shape.startswith("stage2.recipes"):
            raise ConfigError(f"{at}: not a config field (docs/CONFIG.md lists them)")
        if not _overridden(str(path), overrides):
            _set(data, str(path).split("."), value, at)


def _overridden(path: str, overrides: dict) -> bool:
    """Whether a flag or --set names the path or a section above it (training.loss.losses set whole
    keeps the recipe off its terms' weights)."""
    parts = re.sub(r"\[[A-Za-z0-9_]+\]", "", path).split(".")
    return path in overrides or any(".".join(parts[:i]) in overrides for i in range(1, len(parts) + 1))


def _set(node: dict, parts: list[str], value, at: str) -> None:
    """Set the dotted path in `data`, `name[Type]` selecting every item of list `name` with that type."""
    head, rest = parts[0], parts[1:]
    term = TERM_PATH.match(head)
    if term is None:
        if not rest:
            node[head] = value
            return
        if not isinstance(node.get(head), dict):
            node[head] = {}
        _set(node[head], rest, value, at)
        return
    items = node.get(term["list"])
    chosen = [x for x in items or [] if isinstance(x, dict) and x.get("type") == term["type"]]
    if not chosen or not rest:
        raise ConfigError(f"{at}: the config has no {term['list']} item of type {term['type']}")
    for item in chosen:
        _set(item, rest, value, at)
