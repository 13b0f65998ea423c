"""The stage-2 comparison bench's tables (bench/stage2_vs_control.py): per K, mean (min-max) over seeds of the
last summary row per arm, the latent FD per iteration, separation from the control, the worst seed against
the teacher at full steps, and the cost per iteration against the offline D."""

from __future__ import annotations

import csv
import math
import statistics
import sys
from pathlib import Path

COLS = [
    ("latent_fd", "latent FD"),
    ("cls_fd", "classifier FD"),
    ("cls_precision", "cls precision"),
    ("cls_recall", "cls recall"),
]


def fmt(values) -> str:
    values = [float(v) for v in values if v not in (None, "") and not math.isnan(float(v))]
    if not values:
        return "-"
    mean = statistics.fmean(values)
    if len(values) == 1:
        return f"{mean:.3g}"
    return f"{mean:.3g} ({min(values):.3g}–{max(values):.3g})"


def trajectory(runs: list[list[dict]]) -> str:
    """Mean latent FD per iteration over seeds: 41 → 13 → 12."""
    n = min(len(r) for r in runs)
    return " → ".join(f"{statistics.fmean(float(r[i]['latent_fd']) for r in runs):.3g}" for i in range(n))


def separation(arm_rows: list[dict], control_rows: list[dict], col: str) -> str:
    a = [float(r[col]) for r in arm_rows if r.get(col) not in (None, "")]
    c = [float(r[col]) for r in control_rows if r.get(col) not in (None, "")]
    if not a or not c:
        return "-"
    return "yes" if max(a) < min(c) else "no"


def worst_ratio(rows: list[dict], full_stage1: list[dict]) -> str:
    """Per seed, the arm's value over stage 1's at full steps on the same seed's metric noise; the largest."""
    if len(rows) != len(full_stage1):
        return "-"
    out = []
    for col in ("latent_fd", "cls_fd"):
        pairs = [(r.get(col), f.get(col)) for r, f in zip(rows, full_stage1, strict=True)]
        if any(a in (None, "") or b in (None, "") for a, b in pairs):
            out.append("-")
            continue
        out.append(f"{max(float(a) / float(b) for a, b in pairs):.2f}")
    return ", ".join(out)


def seconds_per_iteration(folder: Path) -> float | None:
    """The run's mean wall time per iteration: generation, encoding, D and diffusion phases (timings.csv)."""
    path = folder / "timings.csv"
    if not path.is_file():
        return None
    per: dict[str, float] = {}
    with open(path, newline="") as f:
        rows = list(csv.DictReader(f))  # text columns (run_started, phase): not read_csv_rows' floats
    for r in rows:
        if r.get("iteration") not in (None, "") and r.get("phase") != "quality summary" and r.get("seconds"):
            per[r["iteration"]] = per.get(r["iteration"], 0.0) + float(r["seconds"])
    return statistics.fmean(per.values()) if per else None


def cost(arm: str, folders: dict, k: int) -> str:
    def mean(a):
        values = [v for v in (seconds_per_iteration(f) for f in folders.get((k, a), [])) if v is not None]
        return statistics.fmean(values) if values else None

    mine, ref = mean("online" if arm == "guidance" else arm), mean("offline")
    return "-" if arm == "guidance" or mine is None or ref is None else f"{mine / ref:.2f}×"


def table(k: int, results: dict, full_stage1: list[dict], full_k: int, seeds, folders: dict) -> str:
    cols = [
        (c, name)
        for c, name in COLS
        if any(
            r.get(c) not in (None, "") for rs in results.values() for run_rows in rs for r in run_rows[-1:]
        )
    ]
    head = [
        "arm",
        *[name for _, name in cols],
        "latent FD per iteration",
        "separated from control (latent, cls)",
        "worst seed ÷ stage 1 at full steps (latent, cls)",
        "s / iteration vs offline D",
    ]
    lines = ["| " + " | ".join(head) + " |", "|" + " --- |" * len(head)]
    first = next(iter(results.values()))
    lines.append(
        f"| stage 1, {k} steps | "
        + " | ".join(fmt(r[0].get(c) for r in first) for c, _ in cols)
        + " | - | - | "
        + worst_ratio([r[0] for r in first], full_stage1)
        + " | - |"
    )
    if full_stage1 and k != full_k:
        lines.append(
            f"| stage 1, {full_k} steps | "
            + " | ".join(fmt(r.get(c) for r in full_stage1) for c, _ in cols)
            + " | - | - | - | - |"
        )
    names = {
        "control": "control: MSE only",
        "offline": "offline D (the spec's)",
        "online": "online D",
        "guidance": "stage 1 + discriminator guidance",
        "dm": "distribution matching (DM)",
        "dm_mse": "DM + MSE off the sampler's t",
        "dm_features": "DM + feature D",
        "dm_features_tuned": "DM + feature D at 0.5, lr cosine over the run",
    }
    control = [r[-1] for r in results.get("control", [])]
    for arm, runs in results.items():
        last = [r[-1] for r in runs]
        traj = trajectory(runs) if arm != "guidance" else "-"
        sep = (
            "-"
            if arm == "control"
            else ", ".join(separation(last, control, c) for c in ("latent_fd", "cls_fd"))
        )
        lines.append(
            f"| {names[arm]} ({len(runs)} seed{'s' if len(runs) > 1 else ''}) | "
            + " | ".join(fmt(r.get(c) for r in last) for c, _ in cols)
            + f" | {traj} | {sep} | {worst_ratio(last, full_stage1)} | {cost(arm, folders, k)} |"
        )
    return (
        f"**K = {k} DDIM steps**, seeds {list(seeds)}: mean (min–max) of the last iteration\n\n"
        + "\n".join(lines)
    )


def write_between_markers(path: Path, text: str, name: str = "stage2-bench") -> None:
    start, end = f"<!-- {name}:start -->", f"<!-- {name}:end -->"
    body = path.read_text()
    if start not in body or end not in body:
        print(f"{path}: no {name} markers; not written", file=sys.stderr)
        return
    head, rest = body.split(start, 1)
    _, tail = rest.split(end, 1)
    path.write_text(f"{head}{start}\n{text}\n{end}{tail}")
