"""End to end: the embedded default (`advdiff demo`, the README's first command) by phase.

    python bench/e2e.py [--quick] [--device cpu] [--conditional]

Runs the demo in a fresh temporary folder as a user would, then prints its `timings.csv` (written by
the trainer itself: one row per finished phase; the one-step companion run's rows after them) with each
phase's share of the wall time. What the
phases do not cover is start-up (interpreter, imports, data preparation) and the plots and grids
between phases. --quick shrinks every stage (about a minute) to check the script. --conditional times the
class-conditional twin (`advdiff demo --conditional`).
"""

from __future__ import annotations

import argparse
import csv
import os
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
QUICK = [
    "autoencoder.training.max_steps=40",
    "training.max_steps=60",
    "training.eval_interval=30",
    "stage2.num_samples=128",
    "stage2.num_iterations=1",
    "stage2.diffusion_epochs=1",
    "discriminator.training.epochs=1",
    "stage2.metric_samples=64",
    "stage2.grid_samples=16",
]


def machine() -> str:
    model = (
        next(
            (
                line.split(":", 1)[1].strip()
                for line in open("/proc/cpuinfo")
                if line.startswith("model name")
            ),
            platform.processor(),
        )
        if os.path.exists("/proc/cpuinfo")
        else platform.processor()
    )
    import torch

    return f"{model}, {os.cpu_count()} cores, torch {torch.__version__}, {time.strftime('%Y-%m-%d')}"


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true")
    p.add_argument("--device", default="auto")
    p.add_argument("--conditional", action="store_true", help="advdiff demo --conditional")
    args = p.parse_args()
    out = Path(tempfile.mkdtemp(prefix="advdiff_e2e_")) / "digits"
    cmd = [sys.executable, "-m", "trainer.cli", "demo", "--out", str(out), "--device", args.device]
    cmd += ["--conditional"] if args.conditional else []
    for item in QUICK if args.quick else []:
        cmd += ["--set", item]
    load_before = os.getloadavg()[0]
    t0 = time.perf_counter()
    proc = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True)
    wall = time.perf_counter() - t0
    if proc.returncode != 0:
        print(proc.stderr[-3000:], file=sys.stderr)
        return proc.returncode
    rows = list(csv.DictReader(open(out / "timings.csv", newline="")))
    companion = out / "one_step" / "timings.csv"  # the demo's stage 2 again at one step
    if companion.is_file():
        rows += [
            {**r, "phase": f"one-step run: {r['phase']}"} for r in csv.DictReader(open(companion, newline=""))
        ]
    print(
        f"machine: {machine()}; load average before/after: "
        f"{load_before:.2f}/{os.getloadavg()[0]:.2f} (above 0.5 the numbers are shared with other work)"
    )
    print(f"command: {' '.join(cmd[1:])}{'  (--quick sizes)' if args.quick else ''}\n")
    print("| phase | iteration | seconds | share of wall |")
    print("| --- | --- | --- | --- |")
    covered = 0.0
    for r in rows:
        s = float(r["seconds"])
        covered += s
        print(f"| {r['phase']} | {r['iteration']} | {s:.1f} | {100 * s / wall:.0f}% |")
    print(
        f"| start-up, data, plots and grids (the rest) | | "
        f"{wall - covered:.1f} | {100 * (wall - covered) / wall:.0f}% |"
    )
    print(f"| **total wall** | | **{wall:.1f}** | 100% |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
