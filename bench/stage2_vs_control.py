"""Does stage 2 beat simply training longer? The embedded digits default, stage 2 in both
generator-loss modes against the MSE-only control arm (same data, seeds and steps), over seeds.

    python bench/stage2_vs_control.py [--out runs/digits] [--seeds 1 2] [-- extra stage-2 flags]

Builds the demo's stage 0/1 under --out if needed (advdiff demo --no-stage2), then runs each arm
into <out>_results/<arm>_s<seed>, and prints a Markdown table of the last iteration's summary row
(mean and spread over seeds) beside the stage-1 baseline and a real-vs-real reference.
"""
from __future__ import annotations

import argparse
import statistics
import subprocess
import sys
from pathlib import Path

from trainer.files.read import read_csv_rows

ARMS = {"rollout": ["--generator_loss_mode", "rollout"], "x0_pred": ["--generator_loss_mode", "x0_pred"],
        "control": ["--control"]}
COLS = ["latent_fd", "precision", "recall", "pixel_fd", "pixel_precision", "pixel_recall", "d_prob_fake"]


def run(cmd):
    print("+", " ".join(cmd), flush=True)
    subprocess.run(cmd, check=True)


def real_vs_real(config: Path) -> float:
    """FD between the held-out reals the summary uses and as many training-split reals."""
    import numpy as np

    from trainer.config.load import load_config
    from trainer.stage2.metrics import Moments, features, fd_from_moments
    from trainer.dist.accelerator import build_accelerator
    from trainer.stage2.run import setup

    ctx = setup(load_config(config), build_accelerator("cpu"))
    ev = ctx.evaluator()
    held = ev._reals()
    from trainer.data.manifest import split_indices

    train, _ = split_indices(len(ctx.rows), ctx.cfg.training.train_split, ctx.cfg.training.split_seed)
    pick = np.random.default_rng(0).choice(train, size=ev.m, replace=False)
    other = ctx.codec.encode(ctx.rows.iloc[np.sort(pick)])
    a, b = features(held), features(other)
    return fd_from_moments(Moments(a.shape[1]).add(a), Moments(b.shape[1]).add(b))


def fmt(values):
    if not values:
        return "-"
    mean = statistics.fmean(values)
    if len(values) == 1:
        return f"{mean:.3g}"
    return f"{mean:.3g} ({min(values):.3g}–{max(values):.3g})"


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", default="runs/digits")
    p.add_argument("--seeds", type=int, nargs="+", default=[1, 2])
    p.add_argument("--arms", nargs="+", default=list(ARMS), choices=list(ARMS))
    p.add_argument("--tag", default="", help="suffix of the result folders, for variants run with extra flags")
    p.add_argument("extra", nargs="*", help="extra stage-2 flags (after --)")
    args = p.parse_args()
    out = Path(args.out)
    if not (out / "stage1" / "samples.png").is_file():
        run(["advdiff", "demo", "--out", str(out), "--no-stage2"])
    config = out / "config.yaml"
    results = Path(str(out) + "_results")
    finals, baselines = {}, []
    for seed in args.seeds:
        for arm in args.arms:
            folder = results / f"{arm}{args.tag}_s{seed}"
            flags = ["--seed", str(seed), "--set", f"experiment.save_path={folder.resolve()}", *ARMS[arm]]
            if arm == "control":  # --control appends _control to the folder: name it directly instead
                flags = ["--seed", str(seed), "--set", f"experiment.save_path={folder.resolve()}",
                         "--adversarial_weight", "0"]
            run(["advdiff", "stage2", str(config), *flags, *args.extra])
            rows = read_csv_rows(folder / "digits_summary.csv")
            finals.setdefault(arm, []).append(rows[-1])
            baselines.append(rows[0])
    ref = real_vs_real(config)
    last = int(max(r["iteration"] for rs in finals.values() for r in rs))
    lines = [f"| arm (iteration {last}) | " + " | ".join(COLS) + " |", "|" + " --- |" * (len(COLS) + 1)]
    lines.append("| stage 1 (iteration 0) | " + " | ".join(fmt([r[c] for r in baselines]) for c in COLS) + " |")
    for arm, rows in finals.items():
        name = {"control": "control: MSE only", "rollout": "stage 2, rollout", "x0_pred": "stage 2, x0_pred"}[arm]
        lines.append(f"| {name} | " + " | ".join(fmt([r[c] for r in rows]) for c in COLS) + " |")
    table = "\n".join(lines)
    text = (f"{table}\n\nseeds {args.seeds}; mean (min–max). Real vs real latent FD (held-out vs as many "
            f"training reals): {ref:.3g}.\n")
    (results / f"table{args.tag}.md").write_text(text)
    print(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
