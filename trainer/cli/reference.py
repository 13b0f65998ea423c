"""The config reference of docs/CONFIG.md, generated from the config dataclasses and the seed system's
spellings that the loader reads (a test keeps it in sync)."""

from __future__ import annotations

import dataclasses
from pathlib import Path

from trainer.cli.common import one_line_errors
from trainer.cli.flags import Parser
from trainer.config.load import SEED_DROPPED, SEED_ONLY_VALUE, SEED_VALUES
from trainer.config.schema import walk_fields
from trainer.config.sections import Config
from trainer.core.errors import UserError

BEGIN, END = "<!-- config-reference:begin -->", "<!-- config-reference:end -->"


def seed_words() -> str:
    """The seed system's spellings (its original YAMLs) and how advdiff reads each; every one warns."""
    rows = ["| seed-system spelling | advdiff reads it as |", "| --- | --- |"]
    for path, names in SEED_VALUES.items():
        rows += [f"| `{path}: {old}` | `{path}: {new}` |" for old, new in names.items()]
    for path, (_, shown, why) in SEED_ONLY_VALUE.items():
        rows.append(
            f"| `{path}: {shown}` | ignored (what advdiff always does); any other value is refused: {why} |"
        )
    for path, instead in SEED_DROPPED.items():
        rows.append(f"| `{path}` | ignored: {instead} |")
    return "\n".join(rows)


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
    seed = (
        "The seed system's configs load too. Its other words for the same things are read as below, each "
        "with one `advdiff: warning:` line that names advdiff's spelling:"
    )
    return "\n".join(rows) + f"\n\n{seed}\n\n" + seed_words()


def write_reference(path: Path) -> None:
    """Replace the lines between the markers of `path` with the reference (atomically)."""
    from trainer.files import atomic

    if not path.is_file():
        raise UserError(f"--write {path}: file not found")
    text = path.read_text()
    if BEGIN not in text or END not in text:
        raise UserError(f"--write {path}: expected the markers {BEGIN} and {END}")
    head, tail = text[: text.index(BEGIN) + len(BEGIN)], text[text.index(END) :]
    atomic.write_text(f"{head}\n{config_reference()}\n{tail}", path)


def main(argv=None) -> int:
    p = Parser(
        prog="advdiff config-reference",
        description="Print the config reference of docs/CONFIG.md "
        "(Markdown), generated from the config dataclasses.",
    )
    p.add_argument(
        "--write",
        default=None,
        metavar="PATH",
        help="instead, replace the reference between the markers of this file (docs/CONFIG.md)",
    )
    args = p.parse_args(argv)
    if args.write is None:
        print(config_reference())
        return 0
    return one_line_errors(lambda: write_reference(Path(args.write)))
