"""Peak memory of stage 2's fake generation + gather + write against N (issue 7, item 1d).

    python bench/memory.py [--quick] [--strict] [--sizes 1024 4096 16384] [--model stub|micro]

One `ACCELERATE_USE_CPU=1 accelerate launch --multi_gpu --num_processes 2` per N runs, on every rank, the
trainer's own path: trainer.stage2.produce_gathered with trainer.stage2.generate_own (per-sample noise, DDIM,
1 step by default) making its shard of N fakes of 16x32x32 latents, gathered to the main process, written
there (atomic torch.save) and handed back per rank, as stage 2 does. The model is a stub by default: a module
with UNet2DModel's call signature, `unet(sample, timestep).sample`, returning `0.5 * sample`, so what is
measured is the latents' handling, not the model (`--model micro` uses the real micro preset at 16 channels
instead; slow at 16k).

Per process: baseline = resident set (VmRSS) after imports, accelerator and model; peak =
getrusage(RUSAGE_SELF).ru_maxrss at the end (and after generation alone). The table gives peak minus
baseline against the size of the latents: the main process's against all N it writes
(N x 16 x 32 x 32 x 4 bytes; target <= 1.5x at the largest N), the other rank's against its own
shard (target <= 1.5x and flat in N/P: it never holds more than its block). Exit status 0 whether
the targets pass or miss, unless --strict.

    python bench/memory.py --switches [--quick] [--model unet64_d4] [--batch 32] [--device cpu|cuda]

The memory switches (training.gradient_checkpointing, training.gradient_accumulation_steps): one training
step of a UNet preset at 16x32x32 latents, as the trainers take it (N micro-batches of batch/N, each
forward and backward, gradients adding up, then one AdamW step), for plain, checkpointing, accumulation
2 and 4, and both; each in a fresh process. A warm-up step at batch 1 first allocates the gradients and
Adam's state, so what is measured is what the step adds on top: activations and temporaries. CPU: peak
resident set (ru_maxrss) minus the resident set after the warm-up. CUDA: torch.cuda.max_memory_allocated
minus the allocated memory after the warm-up (written for a GPU, not yet run on one).
"""

from __future__ import annotations

import argparse
import resource
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import _multiproc as mp  # noqa: E402

SHAPE = (16, 32, 32)
BYTES_PER = 4 * SHAPE[0] * SHAPE[1] * SHAPE[2]
MB = 1024 * 1024


def rss_now() -> int:
    """Current resident set in bytes (VmRSS)."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) * 1024
    return 0


def maxrss() -> int:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # kB on Linux


def worker(a) -> int:
    import torch

    torch.set_num_threads(1)
    import trainer.stage2 as shards
    from trainer.diffusion.schedule import Schedule
    from trainer.parallel.accelerator import build_accelerator
    from trainer.parallel.collectives import barrier, shard_range

    acc = build_accelerator("cpu")
    rank, world = acc.process_index, acc.num_processes
    if a.model == "stub":
        from types import SimpleNamespace

        class StubUNet(torch.nn.Module):
            """UNet2DModel's call signature and output type; a new tensor per call, as a real model's."""

            def forward(self, sample, timestep):
                return SimpleNamespace(sample=sample * 0.5)

        unet = StubUNet()
    else:
        from models.unet import build_unet, preset

        torch.manual_seed(0)
        unet = build_unet(
            preset(a.model, in_channels=SHAPE[0], out_channels=SHAPE[0], sample_size=SHAPE[1])
        ).eval()
    ddim = Schedule("cosine", 1000, "v_prediction").ddim()
    n = a.n
    own = shard_range(n, rank, world)
    out = Path(a.out)
    # warm the path on a few full batches per rank, so what does not grow with N (one batch's noise, model
    # output and DDIM temporaries, allocator pools, gloo buffers) is in the baseline
    warm_n = (
        3 * a.batch * world
    )  # 3 batches: glibc moves same-size blocks from mmap to the heap after the first free
    warm_own = shard_range(warm_n, rank, world)
    warm = shards.produce_gathered(
        acc,
        warm_n,
        warm_own,
        SHAPE,
        out / "warm.pt",
        lambda dest: shards.generate_own(
            acc,
            unet,
            ddim,
            warm_own,
            SHAPE,
            seed=1,
            k=0,
            steps=a.steps,
            eta=0.0,
            batch_size=a.batch,
            out=dest,
        ),
    )
    del warm
    barrier()
    base_rss, base_max = rss_now(), maxrss()
    marks = {}

    def fill(dest):
        shards.generate_own(
            acc, unet, ddim, own, SHAPE, seed=42, k=0, steps=a.steps, eta=0.0, batch_size=a.batch, out=dest
        )
        marks["gen_max"], marks["t1"] = maxrss(), time.perf_counter()

    t0 = time.perf_counter()
    fake = shards.produce_gathered(acc, n, own, SHAPE, out / "fake_latents.pt", fill)
    t2 = time.perf_counter()
    gen_max, t1 = marks["gen_max"], marks["t1"]
    assert fake.shape[0] == len(own)
    rec = {
        "rank": rank,
        "world": world,
        "own": len(own),
        "base_rss": base_rss,
        "base_max": base_max,
        "gen_max": gen_max,
        "end_max": maxrss(),
        "gen_s": t1 - t0,
        "write_s": t2 - t1,
    }
    records = mp.gather_records(rec)
    if acc.is_main_process:
        f = out / "fake_latents.pt"
        mp.write_result(a.result, {"records": records, "file_bytes": f.stat().st_size})
        f.unlink()
    acc.end_training()
    return 0


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true", help="a ~20 s smoke run (one launch, N = 2048)")
    p.add_argument("--strict", action="store_true", help="exit 1 when a target is missed")
    p.add_argument("--sizes", type=int, nargs="+", default=None, help="values of N (default 1024 4096 16384)")
    p.add_argument(
        "--model",
        default="stub",
        help="stub (default) or a UNet preset name, e.g. micro (--switches: a preset, default unet64_d4)",
    )
    p.add_argument("--steps", type=int, default=1, help="DDIM steps (default 1)")
    p.add_argument(
        "--batch",
        type=int,
        default=32,
        help="generation batch per process (config default 32); --switches: the global training batch",
    )
    p.add_argument("--processes", type=int, default=2)
    p.add_argument("--switches", action="store_true", help="the memory switches' table instead (see above)")
    p.add_argument("--device", default="cpu", help="--switches: cpu (default) or cuda")
    p.add_argument("--threads", type=int, default=2, help="--switches: torch threads per process (default 2)")
    p.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--switch-worker", dest="switch_worker", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--micro", type=int, default=1, help=argparse.SUPPRESS)
    p.add_argument("--checkpointing", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--n", type=int, help=argparse.SUPPRESS)
    p.add_argument("--out", help=argparse.SUPPRESS)
    p.add_argument("--result", help=argparse.SUPPRESS)
    a = p.parse_args(argv)
    if a.worker:
        return worker(a)
    if a.switch_worker or a.switches:
        import memory_switches

        if a.switch_worker:
            return memory_switches.switch_worker(a)
        if a.model == "stub":
            a.model = "unet64_d4"
        return memory_switches.switches_main(a)

    import tempfile

    sizes = a.sizes or ([2048] if a.quick else [1024, 4096, 16384])
    mp.header("bench/memory.py: peak RSS of fake generation + gather + write against N")
    model = (
        "stub module (UNet2DModel call signature, returns 0.5 * sample)"
        if a.model == "stub"
        else f"{a.model} UNet preset at {SHAPE[0]} channels"
    )
    print(
        f"latents {SHAPE} fp32 ({BYTES_PER // 1024} KiB each); "
        f"{a.processes} processes, 1 thread each; model: "
        f"{model}; {a.steps} DDIM step(s), generation batch {a.batch}"
    )
    rows = []
    with tempfile.TemporaryDirectory(prefix="bench_memory_") as tmp:
        for n in sizes:
            data, wall = mp.launch(
                a.processes,
                str(Path(__file__).resolve()),
                "--worker",
                "--n",
                str(n),
                "--model",
                a.model,
                "--steps",
                str(a.steps),
                "--batch",
                str(a.batch),
                "--out",
                tmp,
            )
            recs = data["records"]
            assert data["file_bytes"] >= n * BYTES_PER
            rows.append((n, recs, wall))
            print(
                f"  N={n}: launch {wall:.1f} s (generation {recs[0]['gen_s']:.1f} s, gather+write "
                f"{recs[0]['write_s']:.1f} s); load {mp.loadavg()}",
                flush=True,
            )
    print(f"load average after: {mp.loadavg()}")
    print()
    print(
        "MB = 2^20 bytes; 'peak - base' = ru_maxrss at the end - VmRSS before generating; "
        "'gen' = the same, after generation alone"
    )
    head = (
        f"{'N':>6} {'latents MB':>10} | {'main peak-base':>14} {'x latents':>9} {'(gen)':>6} | "
        f"{'other peak-base':>15} {'x shard':>7} {'(gen)':>6} | {'main base':>9} {'other base':>10}"
    )
    print(head)
    print("-" * len(head))
    main_ratios, other_ratios, fit_main, fit_other = [], [], [], []
    for n, recs, _ in rows:
        m, others = recs[0], recs[1:]
        lat = n * BYTES_PER
        m_d, m_g = m["end_max"] - m["base_rss"], m["gen_max"] - m["base_rss"]
        main_ratios.append(m_d / lat)
        fit_main.append((lat, m_d))
        line = f"{n:>6} {lat / MB:>10.1f} | {m_d / MB:>14.1f} {m_d / lat:>9.2f} {m_g / lat:>6.2f} | "
        if others:
            o = max(others, key=lambda r: r["end_max"] - r["base_rss"])
            shard = o["own"] * BYTES_PER
            o_d, o_g = o["end_max"] - o["base_rss"], o["gen_max"] - o["base_rss"]
            other_ratios.append(o_d / shard)
            fit_other.append((shard, o_d))
            line += f"{o_d / MB:>15.1f} {o_d / shard:>7.2f} {o_g / shard:>6.2f} | "
        else:
            line += f"{'-':>15} {'-':>7} {'-':>6} | "
        line += f"{m['base_rss'] / MB:>9.0f} {(others[0]['base_rss'] / MB if others else 0):>10.0f}"
        print(line)
    if len(rows) > 1:

        def slope(pts):
            (x0, y0), (x1, y1) = pts[0], pts[-1]
            return (y1 - y0) / (x1 - x0), (y0 - (y1 - y0) / (x1 - x0) * x0) / MB

        sm, cm = slope(fit_main)
        line = (
            f"growth between the smallest and largest N: main {sm:.2f} x the latents written "
            f"(+ {cm:.0f} MB that does not grow with N)"
        )
        if fit_other:
            so, co = slope(fit_other)
            line += f"; other rank {so:.2f} x its own shard (+ {co:.0f} MB)"
        print(line)
    world = rows[0][1][0]["world"]
    if world > 1:
        print(
            "(the design's floor for the main process: the gathered result, 1x; it generates its own block "
            "inside it)"
        )
    print()
    ok_main = main_ratios[-1] <= 1.5
    print(
        mp.verdict(
            f"main process peak - baseline <= 1.5x the latents it writes at N={rows[-1][0]} "
            f"(measured {main_ratios[-1]:.2f}x)",
            ok_main,
        )
    )
    ok = ok_main
    if other_ratios:
        ok_other = other_ratios[-1] <= 1.5
        print(
            mp.verdict(
                f"non-main peak - baseline <= 1.5x its own shard at N={rows[-1][0]} "
                f"(measured {other_ratios[-1]:.2f}x; all N: "
                f"{', '.join(f'{r:.2f}' for r in other_ratios)})",
                ok_other,
            )
        )
        ok = ok and ok_other
    if a.strict and not ok:
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
