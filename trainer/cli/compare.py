"""`advdiff compare RUN_A RUN_B`: two runs' quality summaries side by side, per iteration."""
from __future__ import annotations

import math
import sys
from pathlib import Path

from trainer.cli.flags import Parser
from trainer.files.layout import RunLayout
from trainer.files.read import read_csv_rows
from trainer.stage2.evaluation import SUMMARY_FIELDS

# lower is better for FD; higher for precision and recall
COLUMNS = [("latent_fd", "lower"), ("precision", "higher"), ("recall", "higher"), ("pixel_fd", "lower"),
           ("pixel_precision", "higher"), ("pixel_recall", "higher"), ("cls_fd", "lower"),
           ("cls_precision", "higher"), ("cls_recall", "higher"), ("inception_fd", "lower"),
           ("inception_precision", "higher"), ("inception_recall", "higher"), ("d_acc", None), ("d_prob_fake", None)]


def find_summary(run: Path) -> Path:
    if run.is_file():
        return run
    found = RunLayout.summaries_in(run)
    if not found:
        raise FileNotFoundError(f"{run}: no {RunLayout.SUMMARY_GLOB} (is this a stage-2 experiment folder?)")
    if len(found) > 1:
        raise FileNotFoundError(f"{run}: several summaries ({', '.join(p.name for p in found)}); name one")
    return found[0]


def fmt(v) -> str:
    return "-" if v is None or (isinstance(v, float) and math.isnan(v)) else f"{v:.4g}"


def table(a_rows, b_rows, a_name="A", b_name="B") -> str:
    b_by = {int(r["iteration"]): r for r in b_rows}
    lines = [f"{'iter':>4}  {'metric':<16} {a_name[:12]:>12} {b_name[:12]:>12} {'B - A':>10}  better"]
    for a in a_rows:
        k = int(a["iteration"])
        b = b_by.get(k, {})
        for col, direction in COLUMNS:
            va, vb = a.get(col), b.get(col)
            if va is None or (isinstance(va, float) and math.isnan(va)):
                continue
            diff = vb - va if vb is not None and not math.isnan(vb) else None
            better = ""
            if diff is not None and direction and diff != 0:
                better = "B" if (diff < 0) == (direction == "lower") else "A"
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


__all__ = ["main", "table", "SUMMARY_FIELDS"]
