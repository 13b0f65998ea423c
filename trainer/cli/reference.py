"""The config reference of docs/CONFIG.md, generated from the config dataclasses (a test keeps it in sync)."""
from __future__ import annotations

import dataclasses

from trainer.config.schema import walk_fields
from trainer.config.sections import Config

BEGIN, END = "<!-- config-reference:begin -->", "<!-- config-reference:end -->"


def config_reference() -> str:
    rows = ["| field | default | meaning |", "| --- | --- | --- |"]
    for path, f in walk_fields(Config):
        if path == "source":
            continue
        if f.default is not dataclasses.MISSING:
            d = f.default
        else:
            d = f.default_factory()
        if dataclasses.is_dataclass(d) or (isinstance(d, list) and d and dataclasses.is_dataclass(d[0])):
            shown = ""
        else:
            shown = "`null`" if d is None else f"`{d}`"
        rows.append(f"| `{path}` | {shown} | {f.metadata['doc']} |")
    return "\n".join(rows)


def main(argv=None) -> int:
    print(config_reference())
    return 0
