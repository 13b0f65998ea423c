"""The headline of a stage-2 run folder: the teacher (the stage-1 model at training.sample_steps), this run's
latest result at its K steps and, in a demo's few-step run, its one-step companion's (RunLayout.companion),
in latent FD and classifier FD, each also divided by the teacher's (below 1: better than the teacher).

Every number is read from the folder: the teacher row (RunLayout.teacher_summary, measured as the summary's
rows are: stage2.outputs.teacher_row), the last row of each summary, and each run's K from its
stage2_run.json. `advdiff demo` prints the table as its last lines, report.html opens with it."""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

from trainer.files.layout import RunLayout
from trainer.files.read import read_csv_rows
from trainer.quality.report_data import missing

HEADER = ["", "steps", "latent FD", "÷ teacher", "classifier FD", "÷ teacher"]
COLUMNS = ("latent_fd", "cls_fd")  # the two distances shown, each with its ratio to the teacher's


@dataclass(frozen=True)
class HeadlineRow:
    label: str
    steps: int | None  # DDIM steps the model was sampled with (None: not known)
    values: dict  # {column of COLUMNS: its value, None or NaN where not measured}


def headline_rows(root, name: str | None = None) -> list[HeadlineRow]:
    """The teacher first (its values missing where no teacher row was written), then this run's latest
    summary row and the companion's, where they have one."""
    root = Path(root)
    layout = RunLayout(root, name or RunLayout.name_in(root) or "")
    teacher = read_csv_rows(layout.teacher_summary)
    t = teacher[0] if teacher else {}
    rows = [HeadlineRow("teacher (stage 1)", _int(t.get("steps")), {c: t.get(c) for c in COLUMNS})]
    own = _latest(layout, "stage 2")
    if own is not None:
        rows.append(own)
    companion = layout.companion
    if (companion / layout.run_record.name).is_file():
        other = _latest(RunLayout(companion, RunLayout.name_in(companion) or ""), "stage 2, one-step run")
        if other is not None:
            rows.append(other)
    return rows


def _latest(layout: RunLayout, label: str) -> HeadlineRow | None:
    """The last summary row of a run folder as a headline row (None: no summary yet)."""
    summary = read_csv_rows(layout.summary) if layout.name else []
    if not summary:
        return None
    last = summary[-1]
    k = _int(last.get("iteration"))
    label = f"{label}, iteration {k - 1}" if k else f"{label}, start (stage 1)"  # row 0: the stage-1 model
    return HeadlineRow(label, run_steps(layout), {c: last.get(c) for c in COLUMNS})


def run_steps(layout: RunLayout) -> int | None:
    """The DDIM steps a stage-2 run samples its summary rows with (stage2_run.json), or None."""
    try:
        return int(json.loads(layout.run_record.read_text())["fields"]["stage2.generation_steps"])
    except (OSError, ValueError, KeyError, TypeError):
        return None


def _int(v) -> int | None:
    return None if missing(v) else int(v)


def fd_text(v) -> str:
    """A distance to 3 significant digits, trailing zeros kept (23.0, not 23; whole numbers from 100 on);
    "-" where not measured."""
    if missing(v):
        return "-"
    return f"{v:.0f}" if abs(v) >= 100 else f"{v:#.3g}".rstrip(".")  # 99.96: "100.", read "100"


def ratio_text(v, teacher) -> str:
    """v / teacher to 2 decimals; "-" where either is not measured or the teacher's is not positive."""
    if missing(v) or missing(teacher) or teacher <= 0:
        return "-"
    return f"{v / teacher:.2f}"


def headline_cells(rows: list[HeadlineRow]) -> list[list[str]]:
    """One list of cell texts per row, in HEADER's order; the ratios divide by the first row (the teacher)."""
    teacher = rows[0].values if rows else {}
    out = []
    for row in rows:
        cells = [row.label, "-" if row.steps is None else str(row.steps)]
        for col in COLUMNS:
            cells += [fd_text(row.values.get(col)), ratio_text(row.values.get(col), teacher.get(col))]
        out.append(cells)
    return out


def headline_text(rows: list[HeadlineRow]) -> str:
    """The rows as a Markdown table with aligned columns (labels left, numbers right)."""
    table = [HEADER, *headline_cells(rows)]
    widths = [max(len(r[i]) for r in table) for i in range(len(HEADER))]

    def line(cells):
        parts = [
            c.ljust(w) if i == 0 else c.rjust(w) for i, (c, w) in enumerate(zip(cells, widths, strict=True))
        ]
        return "| " + " | ".join(parts) + " |"

    rule = "| " + " | ".join("-" * w for w in widths) + " |"
    return "\n".join([line(table[0]), rule, *(line(r) for r in table[1:])])
