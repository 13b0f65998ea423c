"""`advdiff compare RUN_A RUN_B`: two runs' quality summaries side by side, per iteration."""

from __future__ import annotations

import sys
from pathlib import Path

from trainer.cli.flags import Parser
from trainer.files.layout import RunLayout
from trainer.files.read import read_csv_rows
from trainer.quality import COLUMNS, SUMMARY_FIELDS, compare_rows, fmt


def find_summary(run: Path) -> Path:
    if run.is_file():
        return run
    found = RunLayout.summaries_in(run)
    if not found:
        raise FileNotFoundError(f"{run}: no {RunLayout.SUMMARY_GLOB} (is this a stage-2 experiment folder?)")
    if len(found) > 1:
        raise FileNotFoundError(f"{run}: several summaries ({', '.join(p.name for p in found)}); name one")
    return found[0]


def table(a_rows, b_rows, a_name="A", b_name="B") -> str:
    lines = [f"{'iter':>4}  {'metric':<16} {a_name[:12]:>12} {b_name[:12]:>12} {'B - A':>10}  better"]
    for k, col, va, vb, diff, better in compare_rows(a_rows, b_rows):
        lines.append(f"{k:>4}  {col:<16} {fmt(va):>12} {fmt(vb):>12} {fmt(diff):>10}  {better}")
    return "\n".join(lines)


def main(argv=None) -> int:
    p = Parser(prog="advdiff compare", description=__doc__)
    p.add_argument("run_a", help="experiment folder (or its summary CSV): A")
    p.add_argument("run_b", help="the same for B")
    args = p.parse_args(argv)
    try:
        a, b = find_summary(Path(args.run_a)), find_summary(Path(args.run_b))
    except FileNotFoundError as e:
        print(f"advdiff: error: {e}", file=sys.stderr)
        return 2
    print(f"A = {a}\nB = {b}\n")
    print(table(read_csv_rows(a), read_csv_rows(b), "A", "B"))
    return 0


__all__ = ["main", "table", "COLUMNS", "SUMMARY_FIELDS"]
