"""Generation: our sharded DDIM fakes against a plain diffusers loop, same model, N, steps and batch.

    python bench/generation.py [--quick] [--threads N] [--repeats R] [--compile] [--strict]
    python bench/generation.py --preset unet32_d3 --shape 16,32,32 -n 64     # a bigger model

"ours" is `trainer.stage2.generation.generate_own` as stage 2 runs it at 1 process (per-sample seeded noise,
`trainer.diffusion.sampling.ddim_sample` under inference mode, channels-last input on CPU, accelerate's
autocast context, results copied to the CPU). "plain" is the loop a diffusers user writes:
`torch.no_grad()`, one torch.Generator, batch by batch `scheduler.set_timesteps(steps)` and, for
each t, `unet(x, t).sample` then `scheduler.step(...)`. Both use one random-init UNet2DModel preset
(default `tiny` on 4x8x8 latents) and a DDIMScheduler with the stage-1 defaults (cosine schedule,
1000 steps, v_prediction, eta 0). Variants (ours with contiguous input as before, with a
channels-last module too, other batch sizes, torch.compile; plain under inference mode or with
channels-last input) are timed in the same interleaved rounds, each round rotating the order. The
tables show medians (by process CPU time and by wall time), spreads and the throughput ratio against
plain at the default batch; the verdict uses CPU time with one torch thread (the default), wall
time with several.

Correctness: the fakes of ours and of the plain loop fed the same noise must agree within 1e-5.
Exit code 0 whatever the result unless --strict.
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

TARGET = 1.0  # our throughput / plain diffusers throughput, at least
TOLERANCE = 1e-5


def plain_scheduler():
    """The DDIM a diffusers user configures for this model: the stage-1 defaults, spelled out."""
    from diffusers import DDIMScheduler

    return DDIMScheduler(
        num_train_timesteps=1000,
        beta_schedule="squaredcos_cap_v2",
        prediction_type="v_prediction",
        clip_sample=False,
        set_alpha_to_one=True,
    )


def plain_generate(
    unet,
    scheduler,
    n: int,
    shape: tuple,
    steps: int,
    batch_size: int,
    *,
    noise=None,
    grad_mode=None,
    memory_format=None,
):
    """The plain diffusers loop, batch for batch; noise from one generator unless given."""
    import torch

    gen = torch.Generator().manual_seed(0)
    out = []
    with (grad_mode or torch.no_grad)():
        for s in range(0, n, batch_size):
            b = min(batch_size, n - s)
            x = noise[s : s + b] if noise is not None else torch.randn((b, *shape), generator=gen)
            if memory_format is not None:
                x = x.contiguous(memory_format=memory_format)
            scheduler.set_timesteps(steps)
            for t in scheduler.timesteps:
                x = scheduler.step(unet(x, t).sample, t, x).prev_sample
            out.append(x)
    return torch.cat(out)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument(
        "--quick", action="store_true", help="smoke run (~30 s): fewer samples, rounds and variants"
    )
    p.add_argument(
        "--threads",
        type=int,
        default=1,
        help="torch threads (default 1: on a shared machine, more threads than idle cores make "
        "OpenMP barriers stall and the timings erratic)",
    )
    p.add_argument("--repeats", type=int, default=None, help="interleaved rounds (default 5, quick 3)")
    p.add_argument("--preset", default="tiny", help="UNet preset (default tiny)")
    p.add_argument("--shape", default="4,8,8", help="latent shape C,H,W (default 4,8,8)")
    p.add_argument(
        "-n", "--num_samples", type=int, default=None, help="fakes per run (default 256, quick 64)"
    )
    p.add_argument("--steps", type=int, default=None, help="DDIM steps (default 10)")
    p.add_argument("--batch_size", type=int, default=32, help="the compared batch size (stage-2 default 32)")
    p.add_argument("--batches", default=None, help="other batch sizes for ours (default 64,128; quick 128)")
    p.add_argument(
        "--compile", action="store_true", help="also time torch.compile (compile time reported apart)"
    )
    p.add_argument(
        "--strict", action="store_true", help="exit 1 when the target or the correctness check fails"
    )
    args = p.parse_args(argv)

    import torch

    from models.unet import build_unet, preset
    from trainer.diffusion import sampling
    from trainer.diffusion.noise import per_sample_noise
    from trainer.diffusion.schedule import Schedule
    from trainer.parallel.accelerator import build_accelerator
    from trainer.stage2 import generate_own

    torch.set_num_threads(args.threads)
    print(machine_header(args.threads), flush=True)
    shape = tuple(int(x) for x in args.shape.split(","))
    n = args.num_samples or (64 if args.quick else 256)
    steps = args.steps or 10
    repeats = args.repeats or (3 if args.quick else 5)
    batches = [int(b) for b in (args.batches or ("128" if args.quick else "64,128")).split(",") if b]
    base = args.batch_size

    torch.manual_seed(0)
    spec = preset(args.preset, in_channels=shape[0], out_channels=shape[0], sample_size=shape[1])
    unet = build_unet(spec).eval()
    acc = build_accelerator("cpu")
    ours_ddim = Schedule("cosine", 1000, "v_prediction").ddim()  # as stage 2 builds its samplers
    sched = plain_scheduler()
    params = sum(p.numel() for p in unet.parameters())
    print(
        f"UNet {args.preset} ({params / 1e6:.2f}M params), latents {shape}, N {n}, {steps} DDIM steps, "
        f"batch {base}, v_prediction, eta 0",
        flush=True,
    )

    def ours(model, batch):
        return lambda: generate_own(
            acc, model, ours_ddim, range(n), shape, seed=42, k=0, steps=steps, eta=0.0, batch_size=batch
        )

    # correctness: the same noise through both loops
    noise = per_sample_noise(range(n), shape, 42, "fake", 0)
    a = ours(unet, base)()
    b = plain_generate(unet, sched, n, shape, steps, base, noise=noise)
    diff = float((a - b).abs().max())
    same = diff <= TOLERANCE
    print(
        f"correctness: max |ours - plain| on the same noise = {diff:.3g} (tolerance {TOLERANCE:g}): "
        f"{'OK' if same else 'FAIL'}",
        flush=True,
    )

    variants = {
        f"plain diffusers, no_grad, batch {base}": lambda: plain_generate(unet, sched, n, shape, steps, base),
        f"ours, batch {base}": ours(unet, base),
    }
    if not args.quick:

        def ours_contiguous():  # ours as it was before CPU sampling went channels-last
            sampling.CPU_CHANNELS_LAST = False
            try:
                return ours(unet, base)()
            finally:
                sampling.CPU_CHANNELS_LAST = True

        variants[f"ours, contiguous input, batch {base}"] = ours_contiguous
        variants[f"plain diffusers, inference_mode, batch {base}"] = lambda: plain_generate(
            unet, sched, n, shape, steps, base, grad_mode=torch.inference_mode
        )
        variants[f"plain diffusers, channels_last input, batch {base}"] = lambda: plain_generate(
            unet, sched, n, shape, steps, base, memory_format=torch.channels_last
        )
        cl = build_unet(spec).eval()
        cl.load_state_dict(unet.state_dict())
        cl = cl.to(memory_format=torch.channels_last)
        variants[f"ours, channels_last module too, batch {base}"] = ours(cl, base)
    for bs in batches:
        if bs != base:
            variants[f"ours, batch {bs}"] = ours(unet, bs)
    if args.compile:
        compiled = torch.compile(unet)
        t0 = time.perf_counter()
        try:
            ours(compiled, base)()
            print(f"torch.compile: first pass (compile + run) {time.perf_counter() - t0:.1f} s", flush=True)
            variants[f"ours, torch.compile, batch {base}"] = ours(compiled, base)
        except Exception as e:  # no compiler toolchain, unsupported op: report, keep going
            print(f"torch.compile: failed ({type(e).__name__}: {str(e).splitlines()[0][:100]})", flush=True)

    names = list(variants)
    for name in names:  # warm-up
        variants[name]()
    # With one thread a run's work is this process's CPU time, which other processes on a shared machine
    # barely disturb; wall time also counts the time they hold the core. The verdict uses CPU time with
    # one thread and wall time with several (CPU time would count OpenMP's spinning there).
    clock = "cpu" if args.threads == 1 else "wall"
    times = {(name, c): [] for name in names for c in ("cpu", "wall")}
    for r in range(repeats):
        order = names[r % len(names) :] + names[: r % len(names)]  # rotate: no variant always first
        for name in order:
            w0, c0 = time.perf_counter(), time.process_time()
            variants[name]()
            times[name, "cpu"].append(time.process_time() - c0)
            times[name, "wall"].append(time.perf_counter() - w0)
    plain_name, ours_name = names[0], names[1]
    width = max(len(x) for x in names)
    ratios = {}
    for c in ("cpu", "wall"):
        what = "process CPU time" if c == "cpu" else "wall time"
        plain_med = statistics.median(times[plain_name, c])
        print(
            f"\n{repeats} interleaved rounds, samples/s = N / {what} of one run"
            + (" (verdict)" if c == clock else "")
        )
        print(f"| {'variant':{width}} | samples/s (median) | spread (min-max) | vs plain | per-round ratio |")
        print(f"| {'-' * width} | ---: | ---: | ---: | ---: |")
        for name in names:
            med = statistics.median(times[name, c])
            rate = [n / t for t in times[name, c]]
            per_round = statistics.median(
                tp / t for t, tp in zip(times[name, c], times[plain_name, c], strict=True)
            )
            ratios[name, c] = plain_med / med
            print(
                f"| {name:{width}} | {n / med:10.1f} | {min(rate):.1f}-{max(rate):.1f} | "
                f"{ratios[name, c]:.3f}x | {per_round:.3f}x |"
            )
    ratio = ratios[ours_name, clock]
    ok = ratio >= TARGET
    print(
        f"\nratio ours/plain throughput (batch {base}): {ratio:.3f}x by {clock} time "
        f"({ratios[ours_name, 'wall' if clock == 'cpu' else 'cpu']:.3f}x "
        f"by {'wall' if clock == 'cpu' else 'cpu'} time)"
    )
    print(f"target ours/plain throughput >= {TARGET:.2f}x: {ratio:.3f}x: {'PASS' if ok else 'MISS'}")
    print(
        f"correctness (same noise, max abs diff <= {TOLERANCE:g}): {diff:.3g}: {'PASS' if same else 'FAIL'}"
    )
    return 1 if args.strict and not (ok and same) else 0


if __name__ == "__main__":
    sys.exit(main())
