"""DDIM timestep spacing: leading (diffusers' default, what models written before scheduler.timestep_spacing
sample with) against trailing (what a new stage-1 model stores), for the same weights at K DDIM steps.

    python bench/timestep_spacing.py --checkpoint runs/digits/stage1/checkpoint_best.pt
                                     [--config runs/digits/config.yaml] [--steps 1 2 4 25 100] [--seeds 1 2 3]
                                     [--spacings leading trailing] [--device cpu]

For each spacing, K and seed it measures the latent FD exactly as stage 2's summary does
(trainer.quality.Evaluator.latent_fd): stage2.metric_samples samples from the fixed per-seed metric noise
(training.seed = the seed) against the same held-out reals, at K DDIM steps (eta 0). The config (default:
config.yaml of the checkpoint's run folder, as `advdiff demo` writes it) gives the data, the autoencoder and
the metric; --checkpoint replaces its diffusion.stage1_checkpoint. Nothing is written: stage 2's read-only
setup (the checks of `advdiff evaluate`) is used. Prints one table, mean (min-max) over seeds per spacing
side by side, and the trailing/leading ratio of the means.
"""

from __future__ import annotations

import argparse
import dataclasses
import statistics
import sys
import time
from datetime import date
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))


def fmt(values: list[float]) -> str:
    mean = statistics.fmean(values)
    if len(values) == 1:
        return f"{mean:.3g}"
    return f"{mean:.3g} ({min(values):.3g}–{max(values):.3g})"


def measure(checkpoint: Path, config: Path, steps, seeds, spacings, device: str, log=print) -> dict:
    """{(spacing, K): [latent FD per seed]} of the checkpoint's EMA weights."""
    import torch

    from trainer.config.load import load_config
    from trainer.parallel.accelerator import build_accelerator
    from trainer.stage2 import setup

    acc = build_accelerator(device)
    fds: dict[tuple[str, int], list[float]] = {}
    for seed in seeds:
        cfg = load_config(
            config, {"diffusion.stage1_checkpoint": str(checkpoint.resolve()), "training.seed": seed}
        )
        s = setup(cfg, acc, read_only=True)  # the input checks, before any compute; writes nothing
        ev = s.evaluator()
        unet = s.stage1.unet.to(acc.device).eval()
        for k in steps:
            # the evaluator samples at its config's stage2.generation_steps
            ev.cfg = dataclasses.replace(cfg, stage2=dataclasses.replace(cfg.stage2, generation_steps=k))
            for spacing in spacings:
                ev.schedule = s.schedule.with_spacing(spacing)
                t0 = time.time()
                with torch.no_grad():
                    fd = ev.latent_fd(unet)
                fds.setdefault((spacing, k), []).append(fd)
                took = time.time() - t0
                log(f"seed {seed}, K {k}, {spacing}: latent FD {fd:.4g} ({ev.m} samples, {took:.1f}s)")
    return fds


def table(fds: dict, steps, spacings) -> str:
    head = ["K (DDIM steps)", *[f"{s}: latent FD" for s in spacings]]
    if len(spacings) == 2:
        head.append(f"{spacings[1]} / {spacings[0]}")
    lines = ["| " + " | ".join(head) + " |", "|" + " --- |" * len(head)]
    for k in steps:
        cells = [fmt(fds[(s, k)]) for s in spacings]
        if len(spacings) == 2:
            a, b = (statistics.fmean(fds[(s, k)]) for s in spacings)
            cells.append(f"{b / a:.2f}")
        lines.append(f"| {k} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument(
        "--checkpoint",
        type=Path,
        default=Path("runs/digits/stage1/checkpoint_best.pt"),
        help="the diffusion checkpoint to measure (default: the demo's stage-1 model)",
    )
    p.add_argument(
        "--config", type=Path, default=None, help="experiment YAML (default: <run folder>/config.yaml)"
    )
    p.add_argument("--steps", type=int, nargs="+", default=[1, 2, 4, 25, 100], help="DDIM steps K")
    p.add_argument("--seeds", type=int, nargs="+", default=[1, 2, 3], help="metric-noise seeds")
    p.add_argument(
        "--spacings",
        nargs="+",
        default=["leading", "trailing"],
        choices=("leading", "trailing", "linspace"),
        help="timestep spacings, side by side",
    )
    p.add_argument("--device", default="cpu", choices=("cpu", "cuda"), help="where to sample")
    args = p.parse_args(argv)
    config = args.config or args.checkpoint.resolve().parents[1] / "config.yaml"
    for path, what in ((args.checkpoint, "--checkpoint"), (config, "--config")):
        if not path.exists():
            print(f"bench/timestep_spacing.py: {what} {path}: not found", file=sys.stderr)
            return 2
    t0 = time.time()
    fds = measure(args.checkpoint, config, args.steps, args.seeds, args.spacings, args.device)
    print(
        f"\nLatent FD of {args.checkpoint} (config {config}), seeds {args.seeds}: mean (min–max); "
        f"{date.today().isoformat()}, {time.time() - t0:.0f}s\n"
    )
    print(table(fds, args.steps, args.spacings))
    return 0


if __name__ == "__main__":
    sys.exit(main())
