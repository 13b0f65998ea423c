"""Crash safety under SIGKILL: a 2-process stage-2 run is killed (kill -9, the launcher and both
workers at once) at >= 10 random named points spread over every phase, rerun after each kill, and
finally run to completion.

An uninterrupted run with ADVDIFF_FAULT_TRACE lists every point (trainer/core/faults.py) and gives the
reference outputs. The points are drawn with ADVDIFF_FAULT_SEED (printed; set it to replay a failure)
so that every category appears (generation, encoding, latent gather/write, D step, diffusion step,
checkpoint write, CSV write, picture write, summary, a half-written temp file) in both iterations,
and are visited in the reference's order. After each kill: the run died at that point, every file
loads and every CSV parses. Each (re)run redoes nothing that was finished (saved latents reused, a
finished D not retrained, training resumes at its saved step, summary rows not re-measured). The
final outputs equal the uninterrupted run's, and no temp file is left behind.
"""

import random
import signal
import time
from pathlib import Path

import pytest
import yaml
from fault_runs import (
    FAULT_LIST,
    ITERATIONS,
    SEED,
    assert_same_outputs,
    candidates,
    category,
    check_no_redo,
    check_outputs_load,
    choose_points,
    iteration_of,
    launch,
    progress,
    read_trace,
    superseded,
    temps,
)
from helpers import stage2_config


# -- the test ------------------------------------------------------------------------------------------
def fault_config(root: Path, manifest, ae, ckpt) -> Path:
    """Two iterations, N=16, 2 generation and 2 encode batches per process, 6 D and 6 diffusion
    steps per iteration with a checkpoint every 2: kills land before, inside and between states. The D is
    online (it also trains during the fine-tune, on noise-conditioned inputs, with R1), so the kills inside
    the diffusion phase land between and inside online D updates too."""
    path = stage2_config(
        root,
        manifest,
        ae,
        ckpt,
        stage2={
            "num_samples": 16,
            "num_iterations": ITERATIONS,
            "diffusion_epochs": 6,
            "diffusion_eval_interval": 2,
            "generation_batch_size": 4,
            "val_samples": 4,
            "grid_samples": 4,
            "metric_samples": 16,
        },
        discriminator={
            "epochs": 2,
            "eval_interval": 2,
            "mode": "online",
            "noise_inputs": True,
            "r1_gamma": 0.1,
            "warm_start": True,
        },
    )
    data = yaml.safe_load(path.read_text())
    data["autoencoder"]["encode_batch_size"] = 4
    data["discriminator"]["config"]["noise_conditioned"] = True
    path.write_text(yaml.safe_dump(data))
    return path


@pytest.mark.slow
def test_sigkill_at_random_points_then_resume_matches_uninterrupted(
    tmp_path, digits_manifest, small_ae, stage1_ckpt
):
    t0 = time.time()
    ref_cfg = fault_config(tmp_path / "ref", digits_manifest, small_ae, stage1_ckpt)
    ref_trace = tmp_path / "ref" / "trace.txt"
    rc = launch(ref_cfg, tmp_path / "ref" / "log.txt", ref_trace)
    assert rc == 0, (tmp_path / "ref" / "log.txt").read_text()[-4000:]
    trace = read_trace(ref_trace)
    if FAULT_LIST == "all":
        points = [n for n in candidates(trace) if not superseded(n, trace)]
    elif FAULT_LIST:
        points = sorted(FAULT_LIST.split(","), key=trace.index)
    else:
        points = choose_points(trace, random.Random(SEED))
    print(
        f"\nfault injection: ADVDIFF_FAULT_SEED={SEED}, {len(points)} of {len(trace)} points "
        f"(uninterrupted run {time.time() - t0:.0f}s):"
    )
    for p in points:
        print(f"  {category(p):15s} iteration {iteration_of(trace)[trace.index(p)]}  {p}")

    cfg = fault_config(tmp_path / "faulty", digits_manifest, small_ae, stage1_ckpt)
    out = tmp_path / "faulty" / "out"
    for i, point in enumerate(points + [None]):
        when = f"run {i} ({'killed at ' + point if point else 'to completion'}, seed {SEED})"
        before = progress(out)
        run_trace, log = tmp_path / "faulty" / f"trace_{i}.txt", tmp_path / "faulty" / f"log_{i}.txt"
        t_run = time.time()
        rc = launch(cfg, log, run_trace, at=point)
        seen = read_trace(run_trace)
        tail = log.read_text()[-3000:]
        if point is not None:
            assert rc != 0, f"{when}: the run completed without reaching {point} (its name is not stable?)"
            assert rc == -signal.SIGKILL, (
                f"{when}: expected the launcher to die of SIGKILL, got exit {rc}:\n{tail}"
            )
            assert seen and seen[-1] == point, f"{when}: the last point passed was {seen[-1:]}, not {point}"
        else:
            assert rc == 0, f"{when}: exit {rc}:\n{tail}"
        print(f"  run {i}: {time.time() - t_run:.1f}s, {len(seen)} points")
        check_no_redo(before, seen, when)
        check_outputs_load(out, when)
        if point is not None and point.startswith(("partial:", "write:")):
            assert temps(out), f"{when}: a kill inside an atomic write left no temp file"
    assert not temps(out), f"temp files left behind: {temps(out)}"
    assert_same_outputs(tmp_path / "ref" / "out", out)
    print(f"  total {time.time() - t0:.0f}s")


def test_stale_temp_files_are_removed_and_nothing_else(tmp_path):
    from trainer.files import atomic

    keep = [tmp_path / "a.pt", tmp_path / ".hidden", tmp_path / "x.tmp.5", tmp_path / "sub" / ".b.csv.tmp.x"]
    stale = [tmp_path / ".a.pt.tmp.123", tmp_path / "sub" / ".b.csv.tmp.77"]
    for p in keep + stale:
        p.parent.mkdir(parents=True, exist_ok=True)
        p.write_text("x")
    assert sorted(atomic.remove_stale_temps(tmp_path)) == sorted(stale)
    assert all(p.exists() for p in keep) and not any(p.exists() for p in stale)
    assert atomic.remove_stale_temps(tmp_path / "missing") == []


def test_point_names_are_scoped_to_the_checkpoint_that_writes_them(tmp_path):
    from trainer.core import faults
    from trainer.files import atomic

    trace = tmp_path / "trace.txt"
    faults.configure(trace=str(trace))
    try:
        faults.phase("k0")
        atomic.write_text("x", tmp_path / "d" / "once.txt")
        faults.step("stage2_d0", 3, tmp_path / "d" / "state.pt")
        atomic.write_text("x", tmp_path / "d" / "history.csv")
        atomic.save_torch({"a": 1}, tmp_path / "d" / "state.pt")  # the stage's state ends the step's scope
        atomic.write_text("x", tmp_path / "d" / "after.png")
    finally:
        faults.configure()
    assert trace.read_text().splitlines() == [
        "phase:k0",
        "partial:d/once.txt",
        "write:d/once.txt",
        "step:stage2_d0:3",
        "partial:stage2_d0:3:d/history.csv",
        "write:stage2_d0:3:d/history.csv",
        "partial:stage2_d0:3:d/state.pt",
        "write:stage2_d0:3:d/state.pt",
        "partial:d/after.png",
        "write:d/after.png",
    ]
    atomic.write_text("x", tmp_path / "d" / "off.txt")  # off again: nothing traced
    assert "off" not in trace.read_text()
