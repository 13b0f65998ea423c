"""Scaling of stage 2's phases a and b (issue 7, item 1c): the same N on 1 vs 2 CPU processes.

    python bench/scaling.py [--quick] [--strict] [--repeats R] [--n N] [--steps S]

Phase a: sharded DDIM generation of N fakes (trainer.stage2.generate_own), gathered to the main process,
written there and handed back per rank (trainer.stage2.produce_gathered). Phase b: sharded AE encoding of N
real digits images (trainer.data.latents.encode_local, scaled as stage 2's LatentCodec does), gathered and
written the same way. Each launch is `ACCELERATE_USE_CPU=1 accelerate launch --num_processes P [--multi_gpu]`
of this file in worker mode, one thread per process (OMP_NUM_THREADS=1, torch.set_num_threads(1)); timers
inside the processes bracket each phase between barriers, so interpreter start-up, imports and accelerate's
launch are reported separately and not counted. P=1 and P=2 launches alternate, R repeats each; medians are
reported with (min-max).

Efficiency = T1 / (2 x T2) per phase and for a+b; target >= 90%. The gather and the write are
timed by wrapping trainer.parallel.collectives.gather_shards and trainer.files.atomic.save_torch (the code
under test is otherwise called unchanged); the gather's time is split into waiting for the slower rank (shard
imbalance) and the transfer itself. Exit status is 0 whether the targets pass or miss, unless
--strict.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import _multiproc as mp  # noqa: E402

SHAPE = (4, 8, 8)  # the digits AE: 32x32x1 -> 8x8x4
SEED = 42


# -- worker: runs inside each accelerate-launched process ----------------------------------------------
def worker(a) -> int:
    t_script = time.time()
    import torch

    torch.set_num_threads(1)
    import pandas as pd

    import trainer.files.atomic as tio
    import trainer.parallel.collectives as collectives
    import trainer.stage2 as shards
    from models.autoencoder import LatentScaling, build_autoencoder
    from models.unet import build_unet, preset
    from trainer.data.latents import encode_local
    from trainer.diffusion.schedule import Schedule
    from trainer.parallel.accelerator import build_accelerator
    from trainer.parallel.collectives import barrier, shard_range

    t_imports = time.time()
    acc = build_accelerator("cpu")
    rank, world = acc.process_index, acc.num_processes
    torch.manual_seed(0)
    unet = build_unet(preset(a.preset)).eval()
    ae = build_autoencoder().eval()
    ddim = Schedule("cosine", 1000, "v_prediction").ddim()
    scaling = LatentScaling(scale=1.3, shift=0.1)
    manifest = Path(a.manifest)
    paths = [str(manifest.parent / p) for p in pd.read_csv(manifest)["image_path"]]
    n = a.n
    own = shard_range(n, rank, world)
    out = Path(a.out)
    pc = time.perf_counter

    # instrument the gather and the write; everything else is called as the trainer calls it
    events: dict[str, list] = {}
    real_gather, real_save = collectives.gather_shards, tio.save_torch

    def timed(name, fn):
        def wrapper(*args, **kwargs):
            t0 = pc()
            try:
                return fn(*args, **kwargs)
            finally:
                events.setdefault(name, []).append((t0, pc()))

        return wrapper

    collectives.gather_shards = timed("gather", real_gather)
    tio.save_torch = timed("write", real_save)
    t_setup = time.time()

    rec = {
        "rank": rank,
        "world": world,
        "threads": torch.get_num_threads(),
        "own": len(own),
        "startup": t_script - float(os.environ.get("BENCH_T0", t_script)),
        "imports": t_imports - t_script,
        "setup": t_setup - t_imports,
        "affinity": sorted(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else None,
    }

    def control():
        """Machine ceiling: a fixed amount of plain UNet work per process (not split across ranks), all
        ranks at once; at 2 free cores it takes as long at P=2 as at P=1."""
        x = torch.randn(a.gen_batch, *SHAPE)
        barrier()
        t0, c0 = pc(), time.process_time()
        with torch.inference_mode():
            for i in range(a.control):
                unet(x, 999 - i % 1000)
        return pc() - t0, time.process_time() - c0

    rec["control"] = [control()]

    def phase(name: str, compute) -> dict:
        """One phase through the trainer's produce_gathered: compute(dest) makes this rank's rows."""
        marks = {}

        def fill(dest):
            compute(dest)
            marks["t1"], marks["c1"] = pc(), time.process_time()

        barrier()
        t0, c0 = pc(), time.process_time()
        shards.produce_gathered(acc, n, own, SHAPE, out / name, fill)
        t2, c2 = pc(), time.process_time()
        return {
            "start": t0,
            "compute_end": marks["t1"],
            "end": t2,
            "cpu": marks["c1"] - c0,
            "cpu_all": c2 - c0,
            "gather": events["gather"][-1],
            "write": events.get("write", [None])[-1],
        }

    # phase a: fakes
    rec["a"] = phase(
        "fake_latents.pt",
        lambda dest: shards.generate_own(
            acc,
            unet,
            ddim,
            own,
            SHAPE,
            seed=SEED,
            k=0,
            steps=a.steps,
            eta=0.0,
            batch_size=a.gen_batch,
            out=dest,
        ),
    )
    # phase b: reals (N rows drawn with replacement from the 1,797 digits)
    rows = shards.choose_real_rows(len(paths), n, SEED, 0, True)[own.start : own.stop]

    def encode(dest):
        encode_local(
            ae,
            [paths[i] for i in rows],
            [None] * len(rows),
            size=32,
            channels=1,
            latent_shape=SHAPE,
            batch_size=a.enc_batch,
            device=acc.device,
            out=dest,
        )
        scaling.to_model_(dest)

    rec["b"] = phase("real_latents.pt", encode)
    rec["control"].append(control())
    records = mp.gather_records(rec)
    if acc.is_main_process:
        mp.write_result(a.result, records)
    acc.end_training()
    return 0


def phase_times(records: list[dict], ph: str) -> dict:
    """Wall, compute, imbalance wait, gather transfer and write of one phase, seen by the main process."""
    main = records[0][ph]
    wall = main["end"] - main["start"]
    compute = [r[ph]["compute_end"] - r[ph]["start"] for r in records]
    last_in = max(r[ph]["gather"][0] for r in records)  # the last rank to reach the gather
    g0, g1 = main["gather"]
    w = main["write"]
    return {
        "wall": wall,
        "compute_main": compute[0],
        "compute_other": compute[-1],
        "wait": max(0.0, last_in - g0),
        "transfer": g1 - max(g0, last_in),
        "write": (w[1] - w[0]) if w else 0.0,
        "cpu_share": min(r[ph]["cpu"] / max(r[ph]["compute_end"] - r[ph]["start"], 1e-9) for r in records),
        "cpu_sum": sum(r[ph]["cpu_all"] for r in records),
    }


# -- driver --------------------------------------------------------------------------------------------
def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true", help="a ~40 s smoke run (small N, 1 repeat)")
    p.add_argument("--strict", action="store_true", help="exit 1 when a target is missed")
    p.add_argument(
        "--repeats", type=int, default=None, help="launches per process count (default 3; quick 1)"
    )
    p.add_argument("--n", type=int, default=None, help="N fakes and N reals (default 4096; quick 256)")
    p.add_argument("--steps", type=int, default=None, help="DDIM steps (default 10; quick 3)")
    p.add_argument("--preset", default="tiny", help="UNet preset (models/unet.py); default tiny")
    p.add_argument(
        "--gen-batch", type=int, default=32, help="generation batch per process (config default 32)"
    )
    p.add_argument("--enc-batch", type=int, default=64, help="encode batch per process (config default 64)")
    p.add_argument(
        "--control",
        type=int,
        default=None,
        help="UNet forwards per process in the machine-ceiling control, run before and after the "
        "phases in every launch (default 100; quick 20)",
    )
    p.add_argument(
        "--digits",
        help="folder of the digits data set, built there by trainer.data.digits.build_digits "
        "unless it holds one already (default: a temp folder; building takes 5-30 s)",
    )
    p.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--manifest", help=argparse.SUPPRESS)
    p.add_argument("--out", help=argparse.SUPPRESS)
    p.add_argument("--result", help=argparse.SUPPRESS)
    a = p.parse_args(argv)
    if a.worker:
        return worker(a)

    import tempfile

    import torch

    repeats = a.repeats or (1 if a.quick else 3)
    n = a.n or (256 if a.quick else 4096)
    steps = a.steps or (3 if a.quick else 10)
    control = a.control or (20 if a.quick else 100)
    mp.header("bench/scaling.py: stage 2 phases a (generate) and b (encode) on 1 vs 2 processes")
    print(
        f"N={n} fakes and N reals; {a.preset} UNet, {steps} DDIM steps, generation batch {a.gen_batch}, "
        f"encode batch {a.enc_batch}; latents {SHAPE}; 1 thread per process; {repeats} launch(es) per P"
    )

    from trainer.data.digits import build_digits

    results: dict[int, list] = {1: [], 2: []}
    launch_wall: dict[int, list] = {1: [], 2: []}
    with tempfile.TemporaryDirectory(prefix="bench_scaling_") as tmp:
        tmp = Path(tmp)
        manifest = build_digits(Path(a.digits) if a.digits else tmp / "digits")
        for rep in range(repeats):
            for nproc in (1, 2) if rep % 2 == 0 else (2, 1):
                out = tmp / f"p{nproc}"
                out.mkdir(exist_ok=True)
                recs, wall = mp.launch(
                    nproc,
                    str(Path(__file__).resolve()),
                    "--worker",
                    "--n",
                    str(n),
                    "--steps",
                    str(steps),
                    "--preset",
                    a.preset,
                    "--gen-batch",
                    str(a.gen_batch),
                    "--enc-batch",
                    str(a.enc_batch),
                    "--control",
                    str(control),
                    "--manifest",
                    str(manifest),
                    "--out",
                    str(out),
                )
                results[nproc].append(recs)
                launch_wall[nproc].append(wall)
                a_t, b_t = phase_times(recs, "a"), phase_times(recs, "b")
                print(
                    f"  repeat {rep + 1}, P={nproc}: a {a_t['wall']:.2f} s, b {b_t['wall']:.2f} s "
                    f"(launch {wall:.1f} s; load {mp.loadavg()})",
                    flush=True,
                )
        # the measured path must give the same latents at both world sizes
        same = all(
            torch.allclose(
                torch.load(tmp / "p1" / f, weights_only=True),
                torch.load(tmp / "p2" / f, weights_only=True),
                atol=1e-5,
            )
            for f in ("fake_latents.pt", "real_latents.pt")
        )
        assert all(r["threads"] == 1 for recs in results.values() for run in recs for r in run)

    print(f"load average after: {mp.loadavg()}")
    print(f"P=1 and P=2 wrote identical latents: {same}")
    print()
    T = {P: {ph: [phase_times(run, ph) for run in results[P]] for ph in "ab"} for P in (1, 2)}

    def col(P, ph, key):
        return [t[key] for t in T[P][ph]]

    def tot(P):
        return [x["wall"] + y["wall"] for x, y in zip(T[P]["a"], T[P]["b"], strict=True)]

    print("phase wall times, seconds, median (min-max):")
    for ph, name in (("a", "a generate+gather+write"), ("b", "b encode+gather+write")):
        print(f"  {name:<26} P=1 {mp.spread(col(1, ph, 'wall'))}   P=2 {mp.spread(col(2, ph, 'wall'))}")
    print(f"  {'a+b':<26} P=1 {mp.spread(tot(1))}   P=2 {mp.spread(tot(2))}")
    print()
    effs = {}
    for ph, t1, t2 in (
        ("a", col(1, "a", "wall"), col(2, "a", "wall")),
        ("b", col(1, "b", "wall"), col(2, "b", "wall")),
        ("a+b", tot(1), tot(2)),
    ):
        eff = mp.med(t1) / (2 * mp.med(t2))
        paired = [x / (2 * y) for x, y in zip(t1, t2, strict=True)]
        effs[ph] = eff
        print(
            f"efficiency {ph:<3} = T1 / (2 x T2) = {eff:.1%}  "
            f"(per repeat pair: {mp.spread(paired, '{:.1%}')})"
        )
    print()
    print("at P=2, share of the main process's phase wall time (median):")
    for ph in "ab":
        walls = col(2, ph, "wall")
        for key, label in (
            ("transfer", "gather transfer"),
            ("wait", "gather wait (imbalance)"),
            ("write", "write"),
        ):
            shares = [t[key] / w for t, w in zip(T[2][ph], walls, strict=True)]
            print(
                f"  phase {ph} {label:<24} {mp.spread(shares, '{:.1%}')}  "
                f"({mp.spread(col(2, ph, key), '{:.3f}')} s)"
            )
        print(
            f"  phase {ph} rank compute time main/other  {mp.spread(col(2, ph, 'compute_main'))} / "
            f"{mp.spread(col(2, ph, 'compute_other'))} s; "
            f"lowest CPU share of a rank {mp.spread(col(2, ph, 'cpu_share'), '{:.0%}')}"
        )
    print()
    print(
        "contention (the cores are shared with other users' processes; CPU share = process CPU time / wall "
        "time during the phase's compute):"
    )
    for ph in "ab":
        s1, s2 = col(1, ph, "cpu_share"), col(2, ph, "cpu_share")
        work = mp.med(col(1, ph, "cpu_sum")) / mp.med(col(2, ph, "cpu_sum"))
        adj = effs[ph] * mp.med(s1) / mp.med(s2)
        print(
            f"  phase {ph}: CPU share per process P=1 {mp.spread(s1, '{:.0%}')}, P=2 (lower rank) "
            f"{mp.spread(s2, '{:.0%}')}; work efficiency CPU-s(P=1) / CPU-s(both ranks, P=2) = {work:.1%}; "
            f"wall efficiency scaled by the CPU-share ratio = {adj:.1%}"
        )
    # the control: per launch, the slowest rank's mean of its before/after runs
    ctl = {
        P: [max(sum(c[0] for c in r["control"]) / len(r["control"]) for r in run) for run in results[P]]
        for P in (1, 2)
    }
    ceiling = mp.med(ctl[1]) / mp.med(ctl[2])
    print(
        f"  machine ceiling (control: {control} UNet forwards of {a.gen_batch} per process, "
        f"alone vs 2 at once): "
        f"T1 / T2 = {ceiling:.1%}  (P=1 {mp.spread(ctl[1])} s, P=2 {mp.spread(ctl[2])} s); "
        f"phase a+b efficiency relative to it = {effs['a+b'] / ceiling:.1%}"
    )
    aff = sorted({tuple(r["affinity"] or ()) for P in (1, 2) for run in results[P] for r in run})
    print(f"  CPU affinity of the processes: {aff}")
    for P in (1, 2):
        recs = [r for run in results[P] for r in run if r["rank"] == 0]
        print(
            f"not counted, P={P}: "
            f"launcher+interpreter start {mp.spread([r['startup'] for r in recs], '{:.1f}')} s, "
            f"imports {mp.spread([r['imports'] for r in recs], '{:.1f}')} s, accelerator+models "
            f"{mp.spread([r['setup'] for r in recs], '{:.1f}')} s; "
            f"whole launch {mp.spread(launch_wall[P], '{:.1f}')} s"
        )
    print()
    ok = effs["a+b"] >= 0.9
    print(mp.verdict(f"scaling efficiency a+b >= 90% (measured {effs['a+b']:.1%})", ok))
    for ph in "ab":
        print(mp.verdict(f"scaling efficiency phase {ph} >= 90% (measured {effs[ph]:.1%})", effs[ph] >= 0.9))
    if a.strict and not (ok and same):
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
