"""What the run report reads and compares (trainer/quality/report.py): the summary's quality columns and
their directions, two summaries compared row by row, the resolved config of a run folder, a CSV as text."""

from __future__ import annotations

import csv
import math
from pathlib import Path

import yaml

from trainer.files.layout import RunLayout

# the summary's quality columns; lower is better for FD, higher for precision and recall
COLUMNS = [
    ("latent_fd", "lower"),
    ("precision", "higher"),
    ("recall", "higher"),
    ("pixel_fd", "lower"),
    ("pixel_precision", "higher"),
    ("pixel_recall", "higher"),
    ("cls_fd", "lower"),
    ("cls_precision", "higher"),
    ("cls_recall", "higher"),
    ("class_fd", "lower"),  # a class-conditional model's (docs/CONDITIONAL.md)
    ("label_fidelity", "higher"),
    ("inception_fd", "lower"),
    ("inception_precision", "higher"),
    ("inception_recall", "higher"),
    ("d_acc", None),
    ("d_prob_fake", None),
]


def missing(v) -> bool:
    return v is None or (isinstance(v, float) and math.isnan(v))


def compare_rows(a_rows: list[dict], b_rows: list[dict]):
    """(iteration, column, a, b, b - a, "A"/"B"/"") for every quality value of A; the last names the
    better run."""
    b_by = {int(r["iteration"]): r for r in b_rows}
    for a in a_rows:
        k = int(a["iteration"])
        b = b_by.get(k, {})
        for col, direction in COLUMNS:
            va, vb = a.get(col), b.get(col)
            if missing(va):
                continue
            diff = vb - va if not missing(vb) else None
            better = ""
            if diff is not None and direction and diff != 0:
                better = "B" if (diff < 0) == (direction == "lower") else "A"
            yield k, col, va, vb, diff, better


def fmt(v) -> str:
    return "-" if missing(v) else f"{v:.4g}"


# -- reading a run folder (names and iterations: RunLayout.name_in, RunLayout.iterations_in)
# -------------------
def read_config(layout: RunLayout) -> dict | None:
    """The resolved config: the demo's config.yaml, else the one the newest checkpoint carries."""
    if layout.config.is_file():
        try:
            data = yaml.safe_load(layout.config.read_text())
            return data if isinstance(data, dict) else None
        except (OSError, yaml.YAMLError):
            return None
    from trainer.core.errors import UserError
    from trainer.files.read import torch_load

    found = layout.found_diffusion_checkpoints("latest")
    candidates = [found[k] for k in sorted(found, reverse=True)] + [layout.stage1_checkpoint("best")]
    for path in candidates:
        if path.is_file():
            try:
                blob = torch_load(path, "checkpoint")
            except UserError:
                continue
            if isinstance(blob, dict) and isinstance(blob.get("config"), dict):
                return blob["config"]
    return None


def csv_table(path: Path) -> tuple[list[str], list[list[str]]]:
    """A CSV's header and rows as the text in the file (a torn last line is shown as it is)."""
    try:
        with open(path, newline="") as f:
            rows = list(csv.reader(f))
    except (OSError, csv.Error, UnicodeDecodeError):
        return [], []
    return (rows[0], rows[1:]) if rows else ([], [])
