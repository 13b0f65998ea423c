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


def write_folder(path: str | os.PathLike, fill: Callable[[Path], None]) -> Path:
    """Write a whole folder through `fill(tmp_folder)`, then swap it in: a reader sees the old folder or the
    new one, never a half-written one (a crash leaves at worst a hidden temporary folder beside it)."""
    import shutil

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp.{os.getpid()}")
    old = path.with_name(f".{path.name}.old.{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    try:
        tmp.mkdir()
        fill(tmp)
        if path.exists():
            os.replace(path, old)
        os.replace(tmp, path)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
        shutil.rmtree(old, ignore_errors=True)
    _fsync_dir(path.parent)
    return path


def save_torch(obj, path: str | os.PathLike) -> Path:
    return atomic_write(path, lambda f: torch.save(obj, f))


_PLAIN = (str, int, float, bool, type(None), torch.dtype, torch.device)


def plain(obj, where: str = "state"):
    """`obj` in the types a weights-only torch.load reads back (tensors, dicts, lists, tuples, str, int,
    float, bool, None), for files read with weights_only=True: numpy scalars, enums and subclasses of the
    plain types (np.float64, IntEnum) become the plain value, numpy arrays tensors, paths str, sets
    sorted lists. Anything else is a TypeError naming where it sits (a bug: the file could not be read)."""
    import enum
    from collections import OrderedDict

    import numpy as np

    if type(obj) in _PLAIN or isinstance(obj, (torch.Tensor, torch.Size)):
        return obj
    if isinstance(obj, np.generic):
        return obj.item()
    if isinstance(obj, np.ndarray):
        return torch.from_numpy(obj.copy())
    if isinstance(obj, enum.Enum):
        return plain(obj.value, where)
    if isinstance(obj, os.PathLike):
        return os.fspath(obj)
    for base in (int, float, str):
        if isinstance(obj, base):
            return base(obj)
    if isinstance(obj, Mapping):
        items = {plain(k, where): plain(v, f"{where}[{k!r}]") for k, v in obj.items()}
        return OrderedDict(items) if isinstance(obj, OrderedDict) else items
    if isinstance(obj, (list, tuple)):
        items = [plain(v, f"{where}[{i}]") for i, v in enumerate(obj)]
        return tuple(items) if isinstance(obj, tuple) else items
    if isinstance(obj, (set, frozenset)):
        return sorted(plain(v, where) for v in obj)
    raise TypeError(
        f"{where}: a {type(obj).__module__}.{type(obj).__qualname__} cannot be kept in a file read "
        "with weights_only=True; store it as tensors, dicts, lists, str, int, float, bool or None"
    )


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
