"""What one generator step of stage 2's distribution matching costs, today's path beside the lean one, at
K = 1 and K = 4, in one run: UNet calls per step (in batch-64 equivalents, counted from the code as it
runs: every UNet forward and every forward the step back-propagates through), the feature head's encoder
calls, and seconds per step (median of interleaved repeats).

    python bench/step_cost.py [--out runs/digits] [--ks 1 4] [--steps 6] [--write]
    python bench/step_cost.py --quick        # the tiny fixtures' sizes, 2 steps (asserts nothing)

Each path's fine-tune phase is built in this process from the demo's config under --out (its stage-1
weights; built by `advdiff demo --no-stage2` if missing) on random latents of the demo's shape: the same
code as a run's step, without the phases around it. "today" is the demo's stage 2 until 2026-12-07 (the
reals in every step, five fresh rollouts per fake-score update, gradients through all K steps); "lean" is the
embedded default's recipe for K. --write puts the table into docs/RESULTS.md between its `step-cost` markers.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from quality_per_minute import TODAY, bench_config  # noqa: E402
from stage2_table import write_between_markers  # noqa: E402
from stage2_vs_control import QUICK_DEMO, QUICK_STAGE2, advdiff, run, sets  # noqa: E402

BATCH = 64  # the unit of the counts: a UNet call on 64 samples


class Counter:
    """Samples through the UNet's forward (and through its encoder, the feature head's features), split by
    whether the step back-propagates through the call (its output requires grad)."""

    def __init__(self):
        self.counts = {"forward": 0, "forward backward": 0, "encoder": 0, "encoder backward": 0}

    def install(self):
        import diffusers

        import models.feature_discriminator as fd

        unet_forward, bottleneck = diffusers.UNet2DModel.forward, fd.unet_bottleneck

        def counted_forward(module, x, *args, **kwargs):
            out = unet_forward(module, x, *args, **kwargs)
            self.add("forward", x.shape[0], out.sample.requires_grad)
            return out

        def counted_bottleneck(unet, x, *args, **kwargs):
            out = bottleneck(unet, x, *args, **kwargs)
            self.add("encoder", x.shape[0], out.requires_grad)
            return out

        diffusers.UNet2DModel.forward, fd.unet_bottleneck = counted_forward, counted_bottleneck

    def add(self, kind: str, n: int, backward: bool) -> None:
        self.counts[kind] += n
        if backward:
            self.counts[f"{kind} backward"] += n

    def take(self) -> dict:
        out = {k: v / BATCH for k, v in self.counts.items()}
        self.counts = dict.fromkeys(self.counts, 0)
        return out


def trainer_for(config: Path, k: int, path: str, quick: bool):
    """The fine-tune phase of iteration 0 for (K, path), on random latents of the run's shape."""
    import torch

    from trainer.config.load import load_config, parse_override
    from trainer.parallel.accelerator import build_accelerator
    from trainer.stage2 import setup, stratified_split

    items = [f"stage2.generation_steps={k}"]
    if path == "today":
        items += [*TODAY, f"stage2.rollout_grad_steps={k}"]
    items += QUICK_STAGE2 if quick else []
    overrides = dict(parse_override(x) for x in items)
    overrides["experiment.save_path"] = str(config.parent / "step_cost" / f"k{k}_{path}")
    s = setup(load_config(config, overrides), build_accelerator("cpu"))
    n = 64 if quick else s.cfg.stage2.num_samples
    torch.manual_seed(0)
    real = torch.randn(n, *s.latent_shape)
    init = {"raw": s.stage1.weights, "ema": s.stage1.weights}
    return s.finetune_trainer(0, real, stratified_split(n, 0.8, 0, 0, "real"), None, init)


def measure(config: Path, ks, steps: int, quick: bool) -> list[dict]:
    counter = Counter()
    counter.install()
    rows = []
    for k in ks:
        trainers = {p: trainer_for(config, k, p, quick) for p in ("today", "lean")}
        times = {p: [] for p in trainers}
        counts = {}
        for step in range(steps + 1):  # step 0 warms up; paths interleaved
            for p, tr in trainers.items():
                counter.take()
                t0 = time.perf_counter()
                tr.train_step(step)
                if step:
                    times[p].append(time.perf_counter() - t0)
                counts[p] = counter.take()
        for p in trainers:
            rows.append({"K": k, "path": p, **counts[p], "s/step": statistics.median(times[p])})
    return rows


def table(rows: list[dict]) -> str:
    out = [
        "| K | path | UNet forwards | of them back-propagated | head encoder forwards | of them "
        "back-propagated | s / step | today ÷ lean |",
        "| --- | --- | --- | --- | --- | --- | --- | --- |",
    ]
    by = {(r["K"], r["path"]): r for r in rows}
    for r in rows:
        today = by[(r["K"], "today")]["s/step"]
        ratio = f"{today / r['s/step']:.2f}×" if r["path"] == "lean" else "-"
        out.append(
            f"| {r['K']} | {r['path']} | {r['forward']:.2f} | {r['forward backward']:.2f} | "
            f"{r['encoder']:.2f} | {r['encoder backward']:.2f} | {r['s/step']:.3f} | {ratio} |"
        )
    return "\n".join(out)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--out", default=str(REPO / "runs" / "digits"))
    p.add_argument("--ks", type=int, nargs="+", default=[1, 4])
    p.add_argument("--steps", type=int, default=6)
    p.add_argument("--quick", action="store_true")
    p.add_argument("--write", action="store_true")
    args = p.parse_args(argv)
    out = Path(args.out)
    if not (out / "stage1" / "checkpoint_best.pt").is_file():
        run(advdiff("demo", "--out", str(out), "--no-stage2", *(sets(QUICK_DEMO) if args.quick else [])))
    rows = measure(bench_config(out), args.ks, 2 if args.quick else args.steps, args.quick)
    text = table(rows)
    print(text)
    if args.write:
        write_between_markers(REPO / "docs" / "RESULTS.md", text, "step-cost")
    return 0


if __name__ == "__main__":
    sys.exit(main())
