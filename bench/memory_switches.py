"""`python bench/memory.py --switches`: what one UNet training step adds to memory under each memory switch
(training.gradient_checkpointing, training.gradient_accumulation_steps); the method is in bench/memory.py's
docstring. Each switch runs in a fresh process (`bench/memory.py --switch-worker`)."""

from __future__ import annotations

import os
import sys
import time
from pathlib import Path

import _multiproc as mp
from memory import MB, SHAPE, maxrss, rss_now

# (label, gradient checkpointing, micro-batches) of --switches
SWITCHES = [
    ("plain", False, 1),
    ("checkpointing", True, 1),
    ("accumulation 2", False, 2),
    ("accumulation 4", False, 4),
    ("checkpointing + accumulation 4", True, 4),
]


def switch_worker(a) -> int:
    """One measured training step in this process (see the module docstring); prints one JSON line."""
    import json

    import torch

    torch.set_num_threads(a.threads)
    from models.unet import build_unet, preset

    cuda = a.device == "cuda"
    torch.manual_seed(0)
    unet = build_unet(preset(a.model, in_channels=SHAPE[0], out_channels=SHAPE[0], sample_size=SHAPE[1]))
    unet = unet.to(a.device).train()
    if a.checkpointing:
        unet.enable_gradient_checkpointing()
    opt = torch.optim.AdamW(unet.parameters(), lr=1e-4)
    x = torch.randn(a.batch, *SHAPE, device=a.device)
    t = torch.randint(0, 1000, (a.batch,), device=a.device)

    def step(xs, ts, micro):
        for xm, tm in zip(
            xs.chunk(micro), ts.chunk(micro), strict=True
        ):  # each micro-batch's graph is freed by its backward
            loss = unet(xm, tm).sample.float().pow(2).mean() * (len(xm) / len(xs))
            loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=False)  # keep the gradient buffers: they are not what the switches change

    step(x[:1], t[:1], 1)  # warm-up: gradients and Adam's state allocated, kernels chosen
    if cuda:
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
    else:
        base = rss_now()
    step(x, t, a.micro)
    peak = (torch.cuda.max_memory_allocated() if cuda else maxrss()) - base
    t0 = time.perf_counter()  # timed: a second step, its shapes warm
    step(x, t, a.micro)
    if cuda:
        torch.cuda.synchronize()
    seconds = time.perf_counter() - t0
    params = sum(p.numel() for p in unet.parameters())
    print(json.dumps({"peak": peak, "seconds": seconds, "params": params}))
    return 0


def switches_main(a) -> int:
    import json
    import subprocess

    if a.quick:
        a.model, a.batch = "micro", 8
    mp.header("bench/memory.py --switches: what one UNet training step adds to memory, per memory switch")
    measure = (
        "peak resident set (ru_maxrss) - resident set after the warm-up"
        if a.device == "cpu"
        else "torch.cuda.max_memory_allocated - memory allocated after the warm-up"
    )
    print(
        f"UNet preset {a.model} at {SHAPE[0]}x{SHAPE[1]}x{SHAPE[2]} latents, fp32, global batch {a.batch}, "
        f"device {a.device}, {a.threads} thread(s); measure: {measure}"
    )
    rows = []
    for label, checkpointing, micro in SWITCHES:
        cmd = [
            sys.executable,
            str(Path(__file__).resolve().parent / "memory.py"),
            "--switch-worker",
            "--model",
            a.model,
            "--batch",
            str(a.batch),
            "--micro",
            str(micro),
            "--device",
            a.device,
            "--threads",
            str(a.threads),
        ]
        if checkpointing:
            cmd.append("--checkpointing")
        env = {**os.environ, "OMP_NUM_THREADS": str(a.threads)}
        proc = subprocess.run(cmd, capture_output=True, text=True, env=env, cwd=mp.REPO, timeout=1800)
        if proc.returncode != 0:
            print(proc.stdout[-2000:] + proc.stderr[-2000:])
            return 1
        rec = json.loads(proc.stdout.strip().splitlines()[-1])
        rows.append((label, micro, rec))
        print(
            f"  {label}: {rec['peak'] / MB:.0f} MB, {rec['seconds']:.2f} s; load {mp.loadavg()}", flush=True
        )
    print(
        f"parameters: {rows[0][2]['params'] / 1e6:.2f}M ({rows[0][2]['params'] * 4 / MB:.0f} MB in fp32; the "
        "gradients and Adam's two moments, 3x that, are in the baseline)"
    )
    print()
    base_peak, base_s = rows[0][2]["peak"], rows[0][2]["seconds"]
    head = (
        f"{'switch':<32} {'micro-batch':>11} {'step adds MB':>12} {'x plain':>8} "
        f"{'2nd step s':>10} {'x plain':>8}"
    )
    print(head)
    print("-" * len(head))
    for label, micro, rec in rows:
        print(
            f"{label:<32} {a.batch // micro:>11} {rec['peak'] / MB:>12.0f} {rec['peak'] / base_peak:>8.2f} "
            f"{rec['seconds']:>10.2f} {rec['seconds'] / base_s:>8.2f}"
        )
    print(f"load average after: {mp.loadavg()}")
    return 0
