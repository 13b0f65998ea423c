"""Quality per minute of stage 2's distribution matching on the embedded digits: latent and classifier FD
against the fine-tune's wall-clock seconds and its generator steps, at K = 1 and K = 4, today's path (the
recipe the demo shipped until 2026-12-07) beside the lean one (the embedded default's recipe for K), over
training seeds, each against the teacher (stage 1 at 25 steps) on the same seed's metric noise.

    python bench/quality_per_minute.py [--out runs/digits] [--seeds 42 101 102 103] [--ks 1 4]
        [--paths today lean] [--write] [--plot docs/quality_per_minute.png]
    python bench/quality_per_minute.py --quick       # a tiny stage 1, one seed (asserts nothing)

Builds the demo's stage 0/1 under --out if needed (advdiff demo --no-stage2), runs each (K, path, seed) into
<out>_qpm/k<K>_<path>_s<seed> (a finished run is reused), and prints per K a Markdown table: per path, the
summary's latent and classifier FD after each iteration with the cumulative generator steps and fine-tune
seconds (timings.csv's diffusion phase), the last row over the teacher's, and s / generator step. --write
puts the tables into docs/RESULTS.md between its `quality-per-minute` markers; --plot draws FD against
seconds and against steps. Every path runs in this process through the command line's entry point, one
after the other: compare seconds within one run of the bench only.
"""

from __future__ import annotations

import argparse
import csv
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from stage2_table import write_between_markers  # noqa: E402
from stage2_vs_control import QUICK_DEMO, QUICK_STAGE2, advdiff, run, sets, stage1_row  # noqa: E402

from trainer.files.read import read_csv_rows  # noqa: E402

FULL_STEPS = 25
DM_TERM = "{type: DistributionMatchingLoss, key: latent, target: null, weight: 1.0}"
# The demo's stage 2 as shipped until 2026-12-07, at every K: the feature head's term at 0.5, the lr one
# cosine over 3 iterations of 50 steps, 5 fresh rollouts per fake-score update, gradients through all K
# steps, the reals in every step. Each is set explicitly, so the config's recipe for K does not apply.
TODAY = [
    "stage2.num_iterations=3",
    "stage2.diffusion_max_steps=50",
    "stage2.learning_rate=1.0e-4",
    "stage2.lr_schedule=cosine_run",
    "stage2.real_batch=always",
    "stage2.backward_simulation=false",
    "stage2.distribution_matching.n_fake=5",
    "stage2.distribution_matching.reuse_generator_samples=false",
    f"training.loss.losses=[{DM_TERM}, {{type: DiscriminatorLoss, key: latent, target: null, weight: 0.5}}]",
]
PATHS = ("today", "lean")


def bench_config(out: Path) -> Path:
    """The embedded default as it stands (its recipes per K), beside --out's own config.yaml so that its
    relative paths name the same stage 0/1 files: a folder built before a recipe changed runs today's."""
    from trainer.config.load import DEMO_CONFIG

    path = out / "bench_config.yaml"
    path.write_text(DEMO_CONFIG.read_text())
    return path


def path_flags(path: str, k: int, seed: int, folder: Path, quick: bool) -> list[str]:
    """The stage-2 command's flags of one (path, K, seed): today's settings, or none beyond K (the
    config's recipe for K)."""
    flags = ["--seed", str(seed), "--generation_steps", str(k)]
    items = [f"experiment.save_path={folder.resolve()}"]
    if path == "today":
        items += [*TODAY, f"stage2.rollout_grad_steps={k}"]
    if quick:
        items += QUICK_STAGE2
    return flags + sets(items)


def curve(folder: Path) -> list[dict]:
    """The run's summary rows with the cumulative generator steps and fine-tune seconds at each."""
    rows = read_csv_rows(next(folder.glob("*_summary.csv")))
    with open(folder / "timings.csv", newline="") as f:  # (text columns: not read_csv_rows)
        phases = [r for r in csv.DictReader(f) if r["phase"] == "diffusion"]
    seconds = {}  # per iteration, summed over the runs that worked on it (a resumed run's parts)
    for r in phases:
        seconds[int(r["iteration"])] = seconds.get(int(r["iteration"]), 0.0) + float(r["seconds"])
    steps = {}
    for k in seconds:
        history = read_csv_rows(next(folder.glob(f"*_metrics_iter_{k}.csv")))
        steps[k] = int(float(history[-1]["step"]))
    out, total_s, total_steps = [], 0.0, 0
    for row in rows:
        it = int(float(row["iteration"]))
        if it > 0:
            total_s += seconds[it - 1]
            total_steps += steps[it - 1]
        out.append({**row, "seconds": total_s, "steps": total_steps})
    return out


def fmt(x: float) -> str:
    return f"{x:.3g}"


def k_table(k: int, results: dict, teachers: dict, seeds: list[int]) -> str:
    """One K's Markdown table: a row per (path, seed)."""
    head = (
        f"**K = {k}**: latent FD (classifier FD) after each iteration, at cumulative generator steps and "
        f"fine-tune seconds; the last row over the teacher's (stage 1 at {FULL_STEPS} steps, same seed)\n\n"
        "| path | seed | teacher latent (cls) | latent FD per iteration | cls FD per iteration | steps | "
        "seconds | s / step | last ÷ teacher latent, cls |\n| --- | --- | --- | --- | --- | --- | --- | "
        "--- | --- |"
    )
    lines = [head]
    for path in PATHS:
        for seed in seeds:
            rows = results.get((k, path, seed))
            if not rows:
                continue
            t = teachers[seed]
            last = rows[-1]
            per_step = last["seconds"] / max(last["steps"], 1)
            ratio = f"{float(last['latent_fd']) / t['latent_fd']:.2f}, {_cls_ratio(last, t)}"
            lines.append(
                f"| {path} | {seed} | {fmt(t['latent_fd'])} ({fmt(t.get('cls_fd', float('nan')))}) | "
                + " → ".join(fmt(float(r["latent_fd"])) for r in rows)
                + " | "
                + " → ".join(fmt(float(r.get("cls_fd") or "nan")) for r in rows)
                + f" | {' / '.join(str(r['steps']) for r in rows[1:])} | "
                + " / ".join(f"{r['seconds']:.0f}" for r in rows[1:])
                + f" | {per_step:.2f} | {ratio} |"
            )
    return "\n".join(lines)


def _cls_ratio(last: dict, teacher: dict) -> str:
    if not last.get("cls_fd") or "cls_fd" not in teacher:
        return "-"
    return f"{float(last['cls_fd']) / teacher['cls_fd']:.2f}"


def plot(results: dict, path: Path) -> None:
    """FD against seconds and against steps, a panel per K and axis, a line per (path, seed)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    ks = sorted({k for k, _, _ in results})
    fig, axes = plt.subplots(len(ks), 2, figsize=(10, 3.6 * len(ks)), squeeze=False)
    for row, k in enumerate(ks):
        for (kk, p, seed), rows in sorted(results.items()):
            if kk != k:
                continue
            style = {"color": "tab:blue" if p == "lean" else "tab:grey", "alpha": 0.8}
            fd = [float(r["latent_fd"]) for r in rows]
            label = f"{p} s{seed}"
            axes[row, 0].plot([r["seconds"] for r in rows], fd, marker="o", label=label, **style)
            axes[row, 1].plot([r["steps"] for r in rows], fd, marker="o", label=label, **style)
        for col, xlabel in enumerate(("fine-tune seconds", "generator steps")):
            ax = axes[row, col]
            ax.set(xlabel=xlabel, ylabel="latent FD", yscale="log", title=f"K = {k}")
        axes[row, 1].legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=90)
    print(f"plot written to {path}")


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--out", default=str(REPO / "runs" / "digits"))
    p.add_argument("--seeds", type=int, nargs="+", default=[42, 101, 102, 103])
    p.add_argument("--ks", type=int, nargs="+", default=[1, 4])
    p.add_argument("--paths", nargs="+", default=list(PATHS), choices=PATHS)
    p.add_argument("--quick", action="store_true")
    p.add_argument("--write", action="store_true")
    p.add_argument("--plot", default=None)
    args = p.parse_args(argv)
    out = Path(args.out)
    seeds = args.seeds[:1] if args.quick else args.seeds
    if not (out / "stage1" / "checkpoint_best.pt").is_file():
        run(advdiff("demo", "--out", str(out), "--no-stage2", *(sets(QUICK_DEMO) if args.quick else [])))
    config = bench_config(out)
    root = out.parent / f"{out.name}_qpm"
    teachers = {s: stage1_row(config, root / f"teacher_s{s}", FULL_STEPS, s, args.quick) for s in seeds}
    results = {}
    for k in args.ks:
        for path in args.paths:
            for seed in seeds:
                folder = root / f"k{k}_{path}_s{seed}"
                run(advdiff("stage2", str(config), *path_flags(path, k, seed, folder, args.quick)))
                results[(k, path, seed)] = curve(folder)
    tables = "\n\n".join(k_table(k, results, teachers, seeds) for k in args.ks)
    print(tables)
    if args.plot:
        plot(results, Path(args.plot))
    if args.write:
        write_between_markers(REPO / "docs" / "RESULTS.md", tables, "quality-per-minute")
    return 0


if __name__ == "__main__":
    sys.exit(main())
