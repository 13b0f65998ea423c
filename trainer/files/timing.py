"""Wall time per phase, appended to the run's `timings.csv` by the main process (atomically rewritten).

One row per finished phase: when this process started, the iteration (empty for stages 0 and 1),
the phase, its wall seconds and the process count. A killed phase writes no row; its rerun does.
`bench/e2e.py` reads the file to print the embedded default's time by phase.
"""

from __future__ import annotations

import csv
import time
from contextlib import contextmanager
from pathlib import Path

from trainer.files import atomic

FIELDS = ["run_started", "iteration", "phase", "seconds", "processes"]
_STARTED = time.strftime("%Y-%m-%dT%H:%M:%S")


def read_rows(path: Path) -> list[dict]:
    """The rows of a timings file; a torn or foreign file reads as empty (it is only a record)."""
    try:
        with open(path, newline="") as f:
            return [row for row in csv.DictReader(f) if row.get("phase")]
    except (OSError, csv.Error, UnicodeDecodeError):
        return []


@contextmanager
def phase(accelerator, path: Path, name: str, iteration: int | str = ""):
    """Time the block; on normal exit the main process appends a row to `path` (RunLayout.timings)."""
    t0 = time.perf_counter()
    yield
    if accelerator.is_main_process:
        rows = read_rows(path)
        rows.append(
            {
                "run_started": _STARTED,
                "iteration": iteration,
                "phase": name,
                "seconds": round(time.perf_counter() - t0, 3),
                "processes": accelerator.num_processes,
            }
        )
        atomic.write_csv(rows, path, FIELDS)
