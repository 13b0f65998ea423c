"""Atomic file writes: a temporary file in the same folder, fsync, then rename.

A reader never sees a half-written output, and a crash leaves the previous version intact.
"""
from __future__ import annotations

import csv
import io
import os
from pathlib import Path
from typing import Callable, Iterable, Mapping

import torch

from trainer.core import faults


def _fsync_dir(path: Path) -> None:
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def atomic_write(path: str | os.PathLike, write: Callable[[io.BufferedWriter], None]) -> Path:
    """Write `path` through `write(fileobj)` so that it appears whole or not at all."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp.{os.getpid()}")
    try:
        with open(tmp, "wb") as f:
            write(faults.probe(f, path))
            f.flush()
            os.fsync(f.fileno())
        faults.before_rename(path)
        os.replace(tmp, path)
    finally:
        if tmp.exists():
            tmp.unlink()
    _fsync_dir(path.parent)
    return path


def save_torch(obj, path: str | os.PathLike) -> Path:
    return atomic_write(path, lambda f: torch.save(obj, f))


def write_text(text: str, path: str | os.PathLike) -> Path:
    return atomic_write(path, lambda f: f.write(text.encode("utf-8")))


def write_csv(rows: Iterable[Mapping], path: str | os.PathLike, fieldnames: list[str] | None = None) -> Path:
    """Rewrite a whole CSV atomically (appending in place could leave a torn last line)."""
    rows = list(rows)
    if fieldnames is None:
        fieldnames = []
        for row in rows:
            fieldnames.extend(k for k in row if k not in fieldnames)
    buf = io.StringIO()
    writer = csv.DictWriter(buf, fieldnames=fieldnames, lineterminator="\n")
    writer.writeheader()
    for row in rows:
        writer.writerow({k: _fmt(row.get(k)) for k in fieldnames})
    return write_text(buf.getvalue(), path)


def _fmt(value):
    if isinstance(value, float):
        return f"{value:.6g}"
    return value


def save_png(array, path: str | os.PathLike) -> Path:
    """Save an HxW or HxWxC uint8 numpy array as PNG, atomically."""
    from PIL import Image

    img = Image.fromarray(array)
    return atomic_write(path, lambda f: img.save(f, format="PNG"))


def remove_stale_temps(folder: str | os.PathLike) -> list[Path]:
    """Delete the temp files (`.NAME.tmp.PID`) that `atomic_write`s killed mid-write left under `folder`.
    Call it on the main process at the start of a run, before anything is written there."""
    import re

    folder, removed = Path(folder), []
    if not folder.is_dir():
        return removed
    pattern = re.compile(r"\..+\.tmp\.\d+")
    for p in folder.rglob(".*.tmp.*"):
        if pattern.fullmatch(p.name) and p.is_file() and not p.is_symlink():
            try:
                p.unlink()
                removed.append(p)
            except FileNotFoundError:
                pass
    return removed
