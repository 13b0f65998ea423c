"""Does stage 2 improve a class-conditional model? The conditional digits (`advdiff demo --conditional`), over
seeds, at 4 DDIM steps: the demo's stage 2 (distribution matching with a projection head on the fake score)
against the MSE-only control (the same steps and lr, no other term), each at classifier-free guidance scale 1
and a larger one, beside stage 1 at 4 and at 25 steps on the same metric noise.

    python bench/conditional.py [--out runs/digits_conditional] [--seeds 1 2 3] [--scales 1 2]
        [--arms dm control lean]
    python bench/conditional.py --quick        # a tiny stage 1 and 2-step runs (asserts nothing)

Builds stage 0/1 and the digit classifier under --out if needed (advdiff demo --conditional --no-stage2),
runs each (arm, scale, seed) into <out>_results/<arm>_w<scale>_s<seed>, and prints one Markdown table per
scale: mean (min-max) over seeds of the last summary row's label fidelity (the digit classifier's accuracy on
samples generated for each label), class FD (the mean of per-class FDs in its feature space), latent FD and
classifier FD. Stage 1 at 4 steps is each run's row 0; at 25 steps `advdiff evaluate`.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from stage2_table import fmt  # noqa: E402
from stage2_vs_control import advdiff, run, sets, stage1_row  # noqa: E402

from trainer.files.read import read_csv_rows  # noqa: E402

COLS = [
    ("label_fidelity", "label fidelity"),
    ("class_fd", "class FD"),
    ("latent_fd", "latent FD"),
    ("cls_fd", "classifier FD"),
]
ARMS = {
    "dm": [],  # the demo's recipe as it is
    "lean": [  # the plain demo's K = 4 recipe (trainer/config/defaults/digits.yaml `recipes`), by flags
        "stage2.distribution_matching.n_fake=2",
        "stage2.distribution_matching.reuse_generator_samples=true",
    ],
    "control": [  # MSE only: the same generator steps and lr, no D term, no distribution matching
        "training.loss.losses=[{type: MSELoss, key: pred_noise, target: noise, weight: 1.0}]",
        "discriminator.config.type=latent",
        "discriminator.config.base_channels=32",
        "discriminator.config.num_layers=2",
        "discriminator.training.epochs=1",
    ],
}
QUICK_DEMO = [
    "autoencoder.training.max_steps=20",
    "training.max_steps=30",
    "training.eval_interval=30",
]
QUICK_STAGE2 = [
    "stage2.num_samples=64",
    "stage2.num_iterations=1",
    "stage2.diffusion_max_steps=2",
    "stage2.metric_samples=64",
    "stage2.grid_samples=0",
    "stage2.val_samples=8",
    "stage2.rollout_batch_size=8",
    "stage2.distribution_matching.n_fake=1",
]
FULL_STEPS = 25


def stage1_full(config: Path, folder: Path, seed: int, scale: float, quick: bool) -> dict:
    """Stage 1 at 25 steps and guidance `scale` on this seed's metric noise (advdiff evaluate)."""
    extra = [f"stage2.guidance_scale={scale}", *(QUICK_STAGE2 if quick else [])]
    return stage1_row(config, folder, FULL_STEPS, seed, False, extra)


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--out", default=None, help="the conditional demo's folder (built if missing)")
    p.add_argument("--seeds", type=int, nargs="+", default=[1, 2, 3])
    p.add_argument("--scales", type=float, nargs="+", default=[1.0, 2.0])
    p.add_argument("--arms", nargs="+", default=["dm", "control"], choices=list(ARMS))
    p.add_argument("--quick", action="store_true")
    args = p.parse_args()
    out = Path(args.out or tempfile.mkdtemp(prefix="advdiff_bench_")) / ("" if args.out else "digits")
    config = out / "config.yaml"
    if not (out / "stage1" / "checkpoint_best.pt").is_file():
        extra = sets(QUICK_DEMO) if args.quick else []
        run(advdiff("demo", "--conditional", "--out", str(out), "--no-stage2", *extra))
    results = out.parent / f"{out.name}_results"
    rows = {}  # (arm or "stage 1 at K", scale) -> per-seed rows
    for scale in args.scales:
        for seed in args.seeds:
            for arm in args.arms:
                folder = results / f"{arm}_w{scale:g}_s{seed}"
                summary = folder / "digits_conditional_summary.csv"  # experiment.name of the conditional demo
                if not summary.is_file() or len(read_csv_rows(summary)) < 2:
                    items = [f"experiment.save_path={folder.resolve()}", f"stage2.guidance_scale={scale}"]
                    items += ARMS[arm] + (QUICK_STAGE2 if args.quick else [])
                    run(advdiff("stage2", str(config), "--seed", str(seed), *sets(items)))
                summary_rows = read_csv_rows(summary)
                rows.setdefault((arm, scale), []).append(summary_rows[-1])
                if arm == args.arms[0]:
                    rows.setdefault(("stage 1 at 4 steps", scale), []).append(summary_rows[0])
            full = stage1_full(
                config, results / f"stage1_{FULL_STEPS}_w{scale:g}_s{seed}", seed, scale, args.quick
            )
            rows.setdefault((f"stage 1 at {FULL_STEPS} steps", scale), []).append(full)
    print()
    for scale in args.scales:
        print(f"### Guidance scale {scale:g}, seeds {' '.join(map(str, args.seeds))}\n")
        print("| model | " + " | ".join(name for _, name in COLS) + " |")
        print("| --- |" + " --- |" * len(COLS))
        for name in (f"stage 1 at {FULL_STEPS} steps", "stage 1 at 4 steps", *args.arms):
            label = {
                "dm": "stage 2 (DM + projection head), 4 steps",
                "lean": "stage 2, the lean K = 4 recipe, 4 steps",
                "control": "MSE-only control, 4 steps",
            }
            got = rows.get((name, scale), [])
            print(
                f"| {label.get(name, name)} | "
                + " | ".join(fmt(r.get(c) for r in got) for c, _ in COLS)
                + " |"
            )
        print()
        for name in args.arms:
            per_seed = [
                f"s{seed}: "
                + ", ".join(f"{c} {float(r[c]):.3g}" for c, _ in COLS if r.get(c) not in (None, ""))
                for seed, r in zip(args.seeds, rows[(name, scale)], strict=True)
            ]
            print(f"{name}: " + "; ".join(per_seed))
        print()
    return 0


if __name__ == "__main__":
    sys.exit(main())
