"""Tolerant reads of what a run wrote: CSV rows (a torn last line is dropped) and torch files (memory-
mapped, weights only; a truncated or foreign file is one line naming it).

Every load here is weights only: a run folder someone else shared or changed can hold a pickle that runs
code when unpickled unrestricted. A file the weights-only loader refuses is an `UnsafeFileError` that
names the object it refused."""

from __future__ import annotations

import contextlib
import csv
import importlib
import math
import pickle
import re
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


class UnsafeFileError(UserError):
    """A torch file holding an object the weights-only loader refuses (code, or a class it does not know)."""


def _refusal(path: Path, what: str, e: Exception) -> UnsafeFileError | None:
    """The one-line error for a weights-only refusal, or None when `e` is some other failure."""
    text = str(e)
    if not isinstance(e, pickle.UnpicklingError) or "Weights only load failed" not in text:
        return None
    found = re.search(r"GLOBAL ([\w.]+)", text)
    holds = f"holds {found.group(1)}" if found else "holds an object"
    return UnsafeFileError(
        f"{path}: {what} {holds}, which a weights-only load refuses (written by another "
        "program or version, or changed since): not loaded"
    )


def torch_load(path: Path, what: str, mmap: bool = True):
    """torch.load, weights only and memory-mapped (nothing read that is not needed; mmap=False reads it all,
    for tensors that are updated in place); a truncated or foreign file is one line, an object the
    weights-only loader refuses an UnsafeFileError."""
    if not zipfile.is_zipfile(path):
        raise UserError(f"{path}: unreadable {what} (truncated, or not written by torch.save)")
    try:
        return torch.load(path, map_location="cpu", weights_only=True, mmap=mmap)
    except Exception as e:
        raise _refusal(path, what, e) or UserError(
            f"{path}: unreadable {what} ({type(e).__name__})"
        ) from None


# The plain-data classes DeepSpeed pickles into its optimizer states (loss scaler, ZeRO stage, fragment
# addresses of flattened parameters): allowed, besides torch's own, when checking an engine checkpoint.
DEEPSPEED_STATE_CLASSES = (
    "deepspeed.runtime.fp16.loss_scaler.LossScaler",
    "deepspeed.runtime.fp16.loss_scaler.DynamicLossScaler",
    "deepspeed.runtime.zero.config.ZeroStageEnum",
    "deepspeed.utils.tensor_fragment.fragment_address",
)


def _classes(names) -> list:
    found = []
    for name in names:
        module, _, attr = name.rpartition(".")
        try:
            found.append(getattr(importlib.import_module(module), attr))
        except (ImportError, AttributeError):
            pass  # not installed, or not in this version: its files cannot name it either
    return found


def check_torch_files(folder: Path, what: str, then: str = "", allowed=DEEPSPEED_STATE_CLASSES) -> None:
    """Every `*.pt` under `folder` passes a weights-only load (memory-mapped: the tensors are not read),
    with the classes named in `allowed` allowed besides torch's own. For folders another library loads
    unrestricted (DeepSpeed's engine checkpoints): a file that passes can run no code there.
    One line naming the first file that fails, `then` appended (what to do about it)."""
    extra = _classes(allowed)
    safe_globals = getattr(torch.serialization, "safe_globals", None)
    try:
        if extra and safe_globals is None:
            raise UserError(f"{folder}: checking {what} before it is loaded needs torch >= 2.5")
        for path in sorted(Path(folder).rglob("*.pt")):
            with safe_globals(extra) if extra else contextlib.nullcontext():
                torch_load(path, what)
    except UserError as e:
        raise type(e)(f"{e}{then}") from None
