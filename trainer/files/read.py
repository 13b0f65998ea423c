"""Tolerant reads of what a run wrote: CSV rows (a torn last line is dropped) and torch files (memory-
mapped, weights only; a truncated or foreign file is one line naming it)."""
from __future__ import annotations

import csv
import math
import zipfile
from pathlib import Path

import torch

from trainer.core.errors import UserError


def read_csv_rows(path) -> list[dict]:
    """CSV rows as dicts of floats; a torn last line (a crash mid-write elsewhere) is dropped."""
    path = Path(path)
    if not path.is_file():
        return []
    rows = []
    with open(path, newline="") as f:
        for row in csv.DictReader(f):
            try:
                rows.append({k: float(v) if v not in ("", None) else math.nan for k, v in row.items()})
            except (TypeError, ValueError):
                break
    return rows


def torch_load(path: Path, what: str):
    """torch.load, memory-mapped (nothing read that is not needed); a truncated or foreign file is one line."""
    if not zipfile.is_zipfile(path):
        raise UserError(f"{path}: unreadable {what} (truncated, or not written by torch.save)")
    try:
        return torch.load(path, map_location="cpu", weights_only=True, mmap=True)
    except Exception as e:
        raise UserError(f"{path}: unreadable {what} ({type(e).__name__})") from None
