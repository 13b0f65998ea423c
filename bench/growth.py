"""How generation's cost grows with N, DDIM steps and model size (issue 7, item 3), measured.

    python bench/growth.py [--quick] [--repeats R]

Runs trainer.stage2.generation.generate_own (stage 2's generation, one process, one thread) three ways:
  N:      the `tiny` UNet at 4x8x8, 10 DDIM steps, N = 128, 256, 512 (batch 32);
  steps:  the same model, N = 64, steps = 10, 20, 40;
  size:   UNet presets micro .. unet64_d4 at 4x16x16, N = 32, 4 steps, each model's forward FLOPs
          counted with torch.utils.flop_counter.
Each point is the median of R runs (process CPU time). For N and steps the script prints the time
against a straight line through the smallest point (a ratio of 1.00 = cost exactly proportional);
for size it prints the time per sample-step against the model's GFLOP per sample-step, so a user can
scale from one preset to another. No pass/fail: this is a measurement for docs/PERFORMANCE.md.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))
sys.path.insert(0, str(Path(__file__).resolve().parent))
from _multiproc import machine_header  # noqa: E402


def timed(fn, repeats: int) -> float:
    fn()  # warm-up (allocator, oneDNN primitive cache)
    times = []
    for _ in range(repeats):
        c0 = time.process_time()
        fn()
        times.append(time.process_time() - c0)
    return statistics.median(times)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--quick", action="store_true", help="smoke run (~20 s): two points per sweep, 1 repeat")
    p.add_argument("--repeats", type=int, default=None, help="runs per point (default 3, quick 1)")
    a = p.parse_args(argv)

    import torch

    torch.set_num_threads(1)
    from models.unet import build_unet, preset
    from trainer.diffusion.schedule import Schedule
    from trainer.parallel.accelerator import build_accelerator
    from trainer.stage2 import generate_own

    print(machine_header(1), flush=True)
    repeats = a.repeats or (1 if a.quick else 3)
    acc = build_accelerator("cpu")
    ddim = Schedule("cosine", 1000, "v_prediction").ddim()

    def model(name: str, channels: int, size: int):
        torch.manual_seed(0)
        return build_unet(preset(name, in_channels=channels, out_channels=channels, sample_size=size)).eval()

    def run(unet, n: int, steps: int, shape: tuple):
        return lambda: generate_own(
            acc, unet, ddim, range(n), shape, seed=0, k=0, steps=steps, eta=0.0, batch_size=32
        )

    shape = (4, 8, 8)
    tiny = model("tiny", 4, 8)
    print(f"\n[N] tiny UNet, latents {shape}, 10 DDIM steps, batch 32; {repeats} run(s) per point, CPU s")
    ns = [64, 128] if a.quick else [128, 256, 512]
    base = None
    for n in ns:
        t = timed(run(tiny, n, 10, shape), repeats)
        base = base or t / ns[0]
        print(
            f"  N {n:>5}: {t:7.3f} s   {t / n * 1e3:6.2f} ms per fake   "
            f"vs proportional to N: {t / (base * n):.2f}x"
        )

    print(f"\n[steps] tiny UNet, latents {shape}, N 64, batch 32")
    steps_list = [5, 10] if a.quick else [10, 20, 40]
    base = None
    for s in steps_list:
        t = timed(run(tiny, 64, s, shape), repeats)
        base = base or t / steps_list[0]
        print(
            f"  steps {s:>3}: {t:7.3f} s   {t / (64 * s) * 1e3:6.3f} ms per sample-step   "
            f"vs proportional to steps: {t / (base * s):.2f}x"
        )

    from torch.utils.flop_counter import FlopCounterMode

    shape = (4, 16, 16)
    names = ["micro", "tiny"] if a.quick else ["micro", "tiny", "unet32_d3", "unet48_d3", "unet64_d4"]
    print(f"\n[size] latents {shape}, N 32, 4 DDIM steps, batch 32")
    print(
        f"  {'preset':<10} {'params M':>8} {'GFLOP/sample-step':>17} "
        f"{'ms/sample-step':>14} {'ms per GFLOP':>12}"
    )
    for name in names:
        unet = model(name, shape[0], shape[1])
        with FlopCounterMode(display=False) as fc, torch.no_grad():
            unet(torch.zeros(1, *shape), 500)
        gflop = fc.get_total_flops() / 1e9
        t = timed(run(unet, 32, 4, shape), repeats)
        per = t / (32 * 4) * 1e3
        params = sum(q.numel() for q in unet.parameters()) / 1e6
        print(f"  {name:<10} {params:>8.2f} {gflop:>17.3f} {per:>14.2f} {per / gflop:>12.1f}")
    acc.end_training()
    return 0


if __name__ == "__main__":
    sys.exit(main())
