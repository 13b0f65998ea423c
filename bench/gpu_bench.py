"""The GPU path, measured through the trainer's own code (run by bench/gpu.sh, one part per process).

  python bench/gpu_bench.py gen   --precision bf16 --n 5000 --steps 100 --batch 500 \
      [--channels_last] [--compile]
  python bench/gpu_bench.py train --precision bf16 [--no-tf32]
  python bench/gpu_bench.py repro

Each part builds a synthetic experiment in a temporary folder (a randomly initialised `unet64_d4` at
16x32x32 latents exported in stage 1's format, pre-embedded random "real" latents, the experiment config
`experiments/stage2_discriminator_unet64_d4.yaml` for everything else), runs the real stage-2 code on it and
prints one JSON line per measurement (also appended to --out). Random weights change nothing about
speed or memory. `--device cpu` with `--smoke` runs the same code in seconds on a CPU.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

import numpy as np  # noqa: E402
import torch  # noqa: E402


def experiment(root: Path, n_real: int, preset: str, latent: tuple, overrides: dict):
    """Write a stage-1 checkpoint and a manifest of latent files; return the loaded config."""
    from models.autoencoder import LatentScaling
    from models.unet import build_unet, unet_config
    from models.unet import preset as unet_preset
    from trainer.config.load import load_config
    from trainer.diffusion.checkpoints import export_blob
    from trainer.diffusion.schedule import Schedule
    from trainer.files import atomic

    c, s = latent[0], latent[1]
    spec = unet_preset(preset, in_channels=c, out_channels=c, sample_size=s)
    torch.manual_seed(0)
    unet = build_unet(spec)
    lat_dir = root / "latents"
    lat_dir.mkdir(parents=True)
    rows = ["image_path,latent_path,is_empty,is_augmented"]
    for i in range(n_real):
        torch.save(torch.randn(latent), lat_dir / f"{i}.pt")
        rows.append(f",latents/{i}.pt,False,False")
    (root / "manifest.csv").write_text("\n".join(rows) + "\n")
    base = {
        "diffusion.stage1_checkpoint": str(root / "stage1.pt"),
        "dataset.manifest": str(root / "manifest.csv"),
        "autoencoder.checkpoint": None,
        "experiment.save_path": str(root / "out"),
        "stage2.grid_samples": 0,
        "training.use_amp": False,
        "training.num_workers": 0,
        **overrides,
    }
    cfg = load_config(REPO / "experiments" / "stage2_discriminator_unet64_d4.yaml", base)
    weights = {k: v.detach().clone() for k, v in unet.state_dict().items()}
    sch = Schedule(cfg.scheduler.type, cfg.scheduler.num_steps, cfg.scheduler.prediction_type).to_dict()
    atomic.save_torch(
        export_blob(
            unet_config(spec),
            weights,
            LatentScaling(1.0, 0.0),
            0,
            {},
            schedule=sch,
            autoencoder=None,
            config=cfg.to_dict(),
            dest=root / "stage1.pt",
            raw_weights=weights,
        ),
        root / "stage1.pt",
    )
    return cfg


def sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize()


def peak_gib(device) -> float | None:
    return torch.cuda.max_memory_allocated() / 2**30 if device.type == "cuda" else None


def reset_peak(device):
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats()


def setup(args, overrides=None):
    from trainer.parallel.accelerator import apply_performance, build_accelerator

    root = Path(tempfile.mkdtemp(prefix="advdiff_gpu_"))
    n_real = 64 if args.smoke else 512
    preset = "tiny" if args.smoke else "unet64_d4"
    latent = (4, 8, 8) if args.smoke else (16, 32, 32)
    ov = {
        "training.mixed_precision": args.precision,
        "performance.tf32": not args.no_tf32,
        "performance.channels_last": bool(getattr(args, "channels_last", False)),
        "stage2.num_samples": n_real,
        **(overrides or {}),
    }
    if args.smoke:
        ov.update(
            {
                "discriminator.config.latent_channels": 4,
                "discriminator.config.num_layers": 2,
                "discriminator.config.base_channels": 16,
            }
        )
    cfg = experiment(root, n_real, preset, latent, ov)
    apply_performance(cfg.performance)
    acc = build_accelerator(args.device, args.precision)
    from trainer.stage2 import setup as stage2_setup

    return cfg, acc, stage2_setup(cfg, acc)


def emit(args, record: dict):
    record = {"date": time.strftime("%Y-%m-%d"), **record}
    line = json.dumps(record)
    print(line, flush=True)
    if args.out:
        with open(args.out, "a") as f:
            f.write(line + "\n")


def part_gen(args):
    from trainer.parallel.accelerator import prepare_module
    from trainer.stage2 import generate_own

    cfg, acc, ctx = setup(args)
    unet = ctx.stage1.new_unet()
    unet = prepare_module(unet.to(acc.device).eval(), cfg.performance, acc)
    sampler = torch.compile(unet) if args.compile else unet
    shape = ctx.latent_shape
    t0 = time.perf_counter()
    warm = min(args.batch, args.n)
    generate_own(
        acc,
        sampler,
        ctx.schedule.ddim(),
        range(warm),
        shape,
        seed=1,
        k=0,
        steps=args.steps,
        eta=0.0,
        batch_size=args.batch,
    )  # warm-up (and the compile, if any)
    sync(acc.device)
    warm_s = time.perf_counter() - t0
    reset_peak(acc.device)
    t0 = time.perf_counter()
    z = generate_own(
        acc,
        sampler,
        ctx.schedule.ddim(),
        range(args.n),
        shape,
        seed=0,
        k=0,
        steps=args.steps,
        eta=0.0,
        batch_size=args.batch,
    )
    sync(acc.device)
    dt = time.perf_counter() - t0
    emit(
        args,
        {
            "part": "gen",
            "precision": args.precision,
            "tf32": not args.no_tf32,
            "channels_last": args.channels_last,
            "compile": args.compile,
            "n": args.n,
            "steps": args.steps,
            "batch": args.batch,
            "seconds": round(dt, 2),
            "samples_per_s": round(args.n / dt, 1),
            "seconds_for_5000": round(dt * 5000 / args.n, 1),
            "warmup_s": round(warm_s, 1),
            "peak_gib": peak_gib(acc.device),
            "finite": bool(torch.isfinite(z).all()),
            "device": torch.cuda.get_device_name() if acc.device.type == "cuda" else "cpu",
        },
    )
    acc.end_training()


def part_train(args):
    from trainer.stage2 import stratified_split

    cfg, acc, ctx = setup(
        args,
        {
            "stage2.generation_steps": args.steps,
            "training.batch_size": args.train_batch,
            "discriminator.training.batch_size": 2 * args.train_batch,
        },
    )
    n = cfg.stage2.num_samples
    real = torch.randn(n, *ctx.latent_shape)
    fake = torch.randn(n, *ctx.latent_shape)
    real_train = stratified_split(n, 0.8, 0, 0, "real")
    fake_train = stratified_split(n, 0.8, 0, 0, "fake")
    results = {}
    for phase in ("d", "g"):
        reset_peak(acc.device)
        if phase == "d":
            trainer = ctx.discriminator_trainer(0, real, fake, real_train, fake_train)
            n_steps = args.d_steps
        else:
            d = results.pop("d_model")
            init = {"raw": ctx.stage1.weights, "ema": ctx.stage1.weights}
            trainer = ctx.finetune_trainer(0, real, real_train, d, init)
            n_steps = args.g_steps
        for s in range(2):  # warm-up
            trainer.train_step(s)
        sync(acc.device)
        t0 = time.perf_counter()
        for s in range(2, 2 + n_steps):
            trainer.train_step(s)
        sync(acc.device)
        dt = time.perf_counter() - t0
        emit(
            args,
            {
                "part": f"train_{'discriminator' if phase == 'd' else 'diffusion'}",
                "precision": args.precision,
                "tf32": not args.no_tf32,
                "channels_last": args.channels_last,
                "batch": cfg.discriminator.training.batch_size if phase == "d" else cfg.training.batch_size,
                "generation_steps": args.steps,
                "steps": n_steps,
                "steps_per_s": round(n_steps / dt, 3),
                "peak_gib": peak_gib(acc.device),
                "device": torch.cuda.get_device_name() if acc.device.type == "cuda" else "cpu",
            },
        )
        if phase == "d":
            results["d_model"] = trainer.d
        acc.free_memory()
    acc.end_training()


def part_repro(args):
    """Generation twice (bit-identical?), and 3 training steps twice with and without
    training.deterministic (the switch is applied in a fresh process by gpu.sh)."""
    from trainer.parallel.accelerator import set_deterministic
    from trainer.stage2 import generate_own, stratified_split

    set_deterministic(args.deterministic)
    steps, n_gen = (3, 8) if args.smoke else (20, 64)
    cfg, acc, ctx = setup(args, {"stage2.generation_steps": steps, "training.batch_size": args.train_batch})
    unet = ctx.stage1.new_unet()
    unet = unet.to(acc.device).eval()
    z = [
        generate_own(
            acc,
            unet,
            ctx.schedule.ddim(),
            range(n_gen),
            ctx.latent_shape,
            seed=0,
            k=0,
            steps=steps,
            eta=0.0,
            batch_size=n_gen,
        )
        for _ in range(2)
    ]
    n = cfg.stage2.num_samples
    real = torch.randn(n, *ctx.latent_shape, generator=torch.Generator().manual_seed(0))
    real_train = stratified_split(n, 0.8, 0, 0, "real")
    from models.discriminator import build_discriminator

    weights = []
    for _ in range(2):
        torch.manual_seed(0)
        d = build_discriminator(cfg.discriminator.config)
        init = {"raw": ctx.stage1.weights, "ema": ctx.stage1.weights}
        tr = ctx.finetune_trainer(0, real, real_train, d, init)
        for s in range(3):
            tr.train_step(s)
        weights.append(torch.cat([p.detach().float().flatten().cpu() for p in tr.unet.parameters()]))
        acc.free_memory()
    emit(
        args,
        {
            "part": "repro",
            "precision": args.precision,
            "deterministic": args.deterministic,
            "generation_bitwise_equal": bool(torch.equal(z[0], z[1])),
            "generation_max_abs_diff": float((z[0] - z[1]).abs().max()),
            "training_bitwise_equal": bool(torch.equal(weights[0], weights[1])),
            "training_max_abs_diff": float((weights[0] - weights[1]).abs().max()),
            "device": torch.cuda.get_device_name() if acc.device.type == "cuda" else "cpu",
        },
    )
    acc.end_training()


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("part", choices=("gen", "train", "repro"))
    p.add_argument("--precision", default="bf16", choices=("no", "bf16", "fp16"))
    p.add_argument("--no-tf32", dest="no_tf32", action="store_true")
    p.add_argument("--channels_last", action="store_true")
    p.add_argument("--compile", action="store_true")
    p.add_argument("--deterministic", action="store_true")
    p.add_argument("--n", type=int, default=5000)
    p.add_argument("--steps", type=int, default=100)
    p.add_argument("--batch", type=int, default=500)
    p.add_argument(
        "--train_batch", type=int, default=32, help="diffusion batch (D batch: twice this, half real)"
    )
    p.add_argument("--d_steps", type=int, default=50)
    p.add_argument("--g_steps", type=int, default=10)
    p.add_argument("--device", default="cuda", choices=("cuda", "cpu"))
    p.add_argument("--smoke", action="store_true", help="tiny sizes (CPU check of the script itself)")
    p.add_argument(
        "--out", default=os.environ.get("OUT") and os.path.join(os.environ["OUT"], "gpu_results.jsonl")
    )
    args = p.parse_args()
    if args.smoke:  # the same code paths at toy sizes
        args.n, args.steps, args.batch = min(args.n, 16), min(args.steps, 3), min(args.batch, 8)
        args.train_batch, args.d_steps, args.g_steps = min(args.train_batch, 8), min(args.d_steps, 3), 2
    np.random.seed(0)
    {"gen": part_gen, "train": part_train, "repro": part_repro}[args.part](args)


if __name__ == "__main__":
    main()
