"""Does stage 2 make the model better than simply training longer? The embedded digits, side by side, over
seeds: the MSE-only control against the spec's offline D and the online D, at few-step sampling (K = 4) and at
the demo's 25 steps, and discriminator guidance (no fine-tuning) at 25 steps.

    python bench/stage2_vs_control.py [--out runs/digits] [--seeds 1 2 3] [--steps 4 25]
                                      [--arms control offline online guidance] [--write]
    python bench/stage2_vs_control.py --quick        # every arm on a tiny stage 1 (asserts nothing)

Builds the demo's stage 0/1 (and its digit classifier) under --out if needed (advdiff demo --no-stage2), runs
each (K, arm, seed) into <out>_results/k<K>_<arm>_s<seed>, and prints, per K, a Markdown table of the last
summary row: mean (min-max) over seeds of the latent FD and the classifier FD (and its precision/recall),
beside stage 1 sampled with K steps and with 25 steps and the real-vs-real floor. Every stage-2 arm (the
control too) keeps the best checkpoint by latent FD and continues from it (stage2.best_metric val_latent_fd,
continue_from best), so an iteration never undoes the one before. "Separated" below a table means the
arm's worst seed beats the control's best. --write puts the tables into docs/RESULTS.md between its
`stage2-bench` markers.
"""

from __future__ import annotations

import argparse
import json
import math
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from trainer.files.read import read_csv_rows  # noqa: E402

ARMS = ("control", "offline", "online", "guidance")
COLS = [
    ("latent_fd", "latent FD"),
    ("cls_fd", "classifier FD"),
    ("cls_precision", "cls precision"),
    ("cls_recall", "cls recall"),
]
FULL_STEPS = 25
# Adversarial weight per regime: few-step sampling is far from the data and takes a strong term; at 25 steps
# the demo's own weight.
ADV_WEIGHT = {"few": 0.5, "full": 0.1}
ONLINE = [
    "discriminator.training.mode=online",
    "discriminator.training.n_critic=1",
    "discriminator.training.noise_inputs=true",
    "discriminator.config.noise_conditioned=true",
]
GUIDANCE = {"weight": 2.0, "t_min": 0.1, "t_max": 0.5}  # w: the upper end of the published 1-2
QUICK_DEMO = [
    "autoencoder.training.max_steps=10",
    "autoencoder.training.eval_interval=10",
    "training.max_steps=10",
    "training.eval_interval=10",
    "training.sample_steps=2",
    "unet.preset=micro",
]
QUICK_STAGE2 = [
    "stage2.num_samples=48",
    "stage2.num_iterations=1",
    "stage2.diffusion_max_steps=2",
    "stage2.diffusion_eval_interval=2",
    "stage2.metric_samples=32",
    "stage2.grid_samples=0",
    "stage2.val_samples=8",
    "stage2.rollout_batch_size=8",
    "discriminator.training.max_steps=2",
    "discriminator.training.batch_size=16",
]


def run(cmd):
    print("+", " ".join(cmd), flush=True)
    subprocess.run(cmd, check=True, cwd=REPO)


def advdiff(*args) -> list[str]:
    return [sys.executable, "-m", "trainer.cli", *args]


def sets(items) -> list[str]:
    return [x for item in items for x in ("--set", item)]


def arm_flags(arm: str, k: int, seed: int, folder: Path, quick: bool) -> list[str]:
    regime = "few" if k < FULL_STEPS else "full"
    flags = [
        "--seed",
        str(seed),
        "--generation_steps",
        str(k),
        *sets(
            [
                f"experiment.save_path={folder.resolve()}",
                "stage2.best_metric=val_latent_fd",
                "stage2.continue_from=best",
            ]
        ),
    ]
    # few steps: back-propagate through every sampling step; full steps: through the last one
    flags += sets([f"stage2.rollout_grad_steps={k if regime == 'few' else 1}"])
    if quick:
        flags += sets(QUICK_STAGE2)
    if arm == "control":
        return flags + ["--adversarial_weight", "0"]
    flags += ["--adversarial_weight", str(ADV_WEIGHT[regime])]
    if arm in ("online", "guidance"):
        flags += sets(ONLINE)
    return flags


def guidance_row(config: Path, folder: Path, k: int, seed: int, quick: bool) -> dict:
    """Stage 1 sampled with discriminator guidance, its D being iteration 0's noise-conditioned D of the
    online arm's run (trained on noised reals against noised stage-1 samples at K steps)."""
    d = folder / "discriminator_iter_0" / "discriminator_best.pt"
    out = folder / "guidance_row.json"
    if not out.is_file():
        # its own folder: the run's folder records the run's config, which evaluate's is not
        run(
            advdiff(
                "evaluate",
                str(config),
                "--seed",
                str(seed),
                "--generation_steps",
                str(k),
                *sets(
                    [f"experiment.save_path={(folder / 'guidance').resolve()}"]
                    + (QUICK_STAGE2 if quick else [])
                ),
                "--discriminator",
                str(d),
                "--guidance_weight",
                str(GUIDANCE["weight"]),
                "--guidance_t_min",
                str(GUIDANCE["t_min"]),
                "--guidance_t_max",
                str(GUIDANCE["t_max"]),
                "--json",
                str(out),
            )
        )
    return json.loads(out.read_text())


def last_iteration(config: Path, quick: bool) -> int:
    """The summary row a finished run ends with (= stage2.num_iterations)."""
    if quick:
        return 1
    import yaml

    return int(yaml.safe_load(config.read_text())["stage2"]["num_iterations"])


def stage1_row(config: Path, folder: Path, k: int, seed: int, quick: bool) -> dict:
    """The stage-1 model's quality row at K steps on this seed's metric noise (advdiff evaluate)."""
    out = folder / "row.json"
    if not out.is_file():
        run(
            advdiff(
                "evaluate",
                str(config),
                "--seed",
                str(seed),
                "--generation_steps",
                str(k),
                *sets([f"experiment.save_path={folder.resolve()}"] + (QUICK_STAGE2 if quick else [])),
                "--json",
                str(out),
            )
        )
    return json.loads(out.read_text())


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


def table(k: int, results: dict, full_stage1: list[dict], full_k: int, seeds) -> str:
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
    ]
    lines = ["| " + " | ".join(head) + " |", "|" + " --- |" * len(head)]
    first = next(iter(results.values()))
    lines.append(
        f"| stage 1, {k} steps | "
        + " | ".join(fmt(r[0].get(c) for r in first) for c, _ in cols)
        + " | - | - |"
    )
    if full_stage1 and k != full_k:
        lines.append(
            f"| stage 1, {full_k} steps | "
            + " | ".join(fmt(r.get(c) for r in full_stage1) for c, _ in cols)
            + " | - | - |"
        )
    names = {
        "control": "control: MSE only",
        "offline": "offline D (the spec's)",
        "online": "online D",
        "guidance": "stage 1 + discriminator guidance",
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
            + f" | {traj} | {sep} |"
        )
    return (
        f"**K = {k} DDIM steps**, seeds {list(seeds)}: mean (min–max) of the last iteration\n\n"
        + "\n".join(lines)
    )


def write_between_markers(path: Path, text: str) -> None:
    start, end = "<!-- stage2-bench:start -->", "<!-- stage2-bench:end -->"
    body = path.read_text()
    if start not in body or end not in body:
        print(f"{path}: no stage2-bench markers; not written", file=sys.stderr)
        return
    head, rest = body.split(start, 1)
    _, tail = rest.split(end, 1)
    path.write_text(f"{head}{start}\n{text}\n{end}{tail}")


def real_vs_real(config: Path) -> float:
    """FD between the held-out reals the summary uses and as many training-split reals (the floor)."""
    import numpy as np

    from trainer.config.load import load_config
    from trainer.data.manifest import split_indices
    from trainer.parallel.accelerator import build_accelerator
    from trainer.quality import Moments, fd_from_moments, features
    from trainer.stage2 import setup

    ctx = setup(load_config(config), build_accelerator("cpu"))
    ev = ctx.evaluator()
    held = ev._reals()
    train, _ = split_indices(len(ctx.rows), ctx.cfg.training.train_split, ctx.cfg.training.split_seed)
    pick = np.random.default_rng(0).choice(train, size=ev.m, replace=False)
    other = ctx.codec.encode(ctx.rows.iloc[np.sort(pick)])
    a, b = features(held), features(other)
    return fd_from_moments(Moments(a.shape[1]).add(a), Moments(b.shape[1]).add(b))


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument(
        "--out", default=None, help="demo folder (default runs/digits; --quick: a temporary folder)"
    )
    p.add_argument("--seeds", type=int, nargs="+", default=[1, 2, 3])
    p.add_argument(
        "--steps", type=int, nargs="+", default=[4, FULL_STEPS], help="DDIM steps K of each regime"
    )
    p.add_argument("--arms", nargs="+", default=list(ARMS), choices=ARMS)
    p.add_argument(
        "--quick", action="store_true", help="a tiny stage 1, one seed, K = 2 (against 3): a smoke run"
    )
    p.add_argument("--full", type=int, default=FULL_STEPS, help="DDIM steps of the stage-1 reference row")
    p.add_argument("--write", action="store_true", help="write the tables into docs/RESULTS.md")
    p.add_argument(
        "--collect",
        action="store_true",
        help="run nothing: tabulate the finished runs under --out "
        "(runs done by several bench processes side by side, e.g. one per K)",
    )
    args = p.parse_args()
    if args.quick:
        args.seeds, args.steps, args.full = args.seeds[:1], [2], 3
        out = Path(args.out or tempfile.mkdtemp(prefix="advdiff_bench_")) / "digits"
    else:
        out = Path(args.out or "runs/digits")
    if not (out / "stage1" / "samples.png").is_file():
        run(advdiff("demo", "--out", str(out), "--no-stage2", *(sets(QUICK_DEMO) if args.quick else [])))
    config = out / "config.yaml"
    results_dir = Path(str(out) + "_results")
    tables = []
    full_k = max(args.full, *args.steps)
    # the reference every regime is held against: stage 1 sampled with the most steps, on each seed's noise
    full_stage1 = [
        stage1_row(config, results_dir / f"stage1_k{full_k}_s{seed}", full_k, seed, args.quick)
        for seed in args.seeds
        if not args.collect or (results_dir / f"stage1_k{full_k}_s{seed}" / "row.json").is_file()
    ]
    for k in args.steps:
        results: dict[str, list[list[dict]]] = {}
        for seed in args.seeds:
            for arm in args.arms:
                if arm == "guidance" and k < FULL_STEPS and not args.quick:
                    continue  # guidance is the full-step regime's option
                source = "online" if arm == "guidance" else arm
                folder = results_dir / f"k{k}_{source}_s{seed}"
                summary = folder / "digits_summary.csv"
                finished = summary.is_file() and any(
                    int(r["iteration"]) == last_iteration(config, args.quick) for r in read_csv_rows(summary)
                )
                if args.collect:
                    if not finished or (arm == "guidance" and not (folder / "guidance_row.json").is_file()):
                        continue
                elif not finished:
                    run(advdiff("stage2", str(config), *arm_flags(source, k, seed, folder, args.quick)))
                rows = read_csv_rows(summary)
                if arm == "guidance":
                    rows = [rows[0], guidance_row(config, folder, k, seed, args.quick)]
                results.setdefault(arm, []).append(rows)
        if not results:
            continue
        tables.append((k, table(k, results, full_stage1, full_k, args.seeds)))
    floor = real_vs_real(config)
    text = "\n\n".join(t for _, t in sorted(tables)) + (
        f"\n\nReal vs real latent FD (held-out reals vs as many training reals): {floor:.3g}. "
        f"Command: `python bench/stage2_vs_control.py --seeds {' '.join(map(str, args.seeds))} --steps "
        f"{' '.join(map(str, args.steps))}`."
    )
    (results_dir / "table.md").write_text(text + "\n")
    print("\n" + text)
    if args.write and not args.quick:
        write_between_markers(REPO / "docs" / "RESULTS.md", text)  # README keeps a 3-line headline
    return 0


if __name__ == "__main__":
    sys.exit(main())
