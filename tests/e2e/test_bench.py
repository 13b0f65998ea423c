"""Smoke runs of the side-by-side benchmarks: each `--quick` run exits 0 and prints its ratio and
target lines. Never a time: the numbers depend on the machine and its load. What is checked is what
must hold whatever the timings: every ratio parses into a finite positive number, agrees with the
figures it is computed from (within their printed rounding) and with the target line, whose PASS/MISS
agrees with the number and the stated target; and the benches' correctness checks pass."""

import re

import pytest
from bench_output import NUM, bench_targets, number, ratio_bounds, rounding, within_rounding
from helpers import run_cli


def check_verdict_block(out: str, clock: str, target) -> None:
    """The overhead benches' verdict block on `clock`: the ratio it prints is the target line's and agrees
    with the two medians above it (within their printed rounding)."""
    block = re.search(
        rf"^  {clock} \(verdict\):\n    ours  median +({NUM}) ms/step.*\n    raw   median +({NUM}) "
        rf"ms/step.*\n    ratio ours/raw per step: ({NUM})x",
        out,
        re.M,
    )
    assert block, out
    ours, raw, ratio = block.groups()
    assert ratio == target.measured_text, (ratio, target.line)
    assert within_rounding(ratio, *ratio_bounds(ours, raw)), (ours, raw, ratio)


def check_overhead(out: str) -> None:
    clock = re.search(r"^verdict on (process CPU time|wall time) per step$", out, re.M)
    assert clock, out
    clock = clock.group(1)
    targets = bench_targets(out)
    # --quick measures the short rollout alone, against ours/raw <= 1.03x on the verdict's clock
    assert [(t.what, t.op, t.limit, t.unit) for t in targets] == [
        (f"ours/raw {'cpu' if clock == 'process CPU time' else 'wall'} time per step", "<=", 1.03, "x")
    ], out
    assert "[short rollout (10 DDIM steps)]" in targets[0].line
    check_verdict_block(out, clock, targets[0])


def check_lean_overhead(out: str) -> None:
    # the two sides make the same calls per step: the lean K = 1 step as bench/step_cost.py counts it
    calls = re.findall(r"^  (ours|raw) calls per step \(batch-64 units\): (.*)$", out, re.M)
    lean = "UNet forwards 6.00 (back-propagated 3.00), head encoder 5.00 (back-propagated 5.00)"
    assert calls == [("ours", lean), ("raw", lean)], out
    assert re.search(r"^same calls: PASS$", out, re.M), out
    targets = bench_targets(out)
    assert [(t.what, t.op, t.limit, t.unit) for t in targets] == [
        ("ours/raw cpu time per step", "<=", 1.05, "x")
    ], out
    check_verdict_block(out, "process CPU time", targets[0])


def check_generation(out: str) -> None:
    targets = bench_targets(out)
    assert [(t.what, t.op, t.limit, t.unit) for t in targets] == [
        ("ours/plain throughput", ">=", 1.0, "x")
    ], out
    m = re.search(rf"^ratio ours/plain throughput \(batch (\d+)\): ({NUM})x by (cpu|wall) time", out, re.M)
    assert m, out
    batch, ratio, clock = m.groups()
    assert number(ratio) and ratio == targets[0].measured_text, (ratio, targets[0].line)
    # the verdict's table: samples/s of the plain loop and of ours at that batch, and ours' ratio to plain
    what = "process CPU time" if clock == "cpu" else "wall time"
    table = out.split(f"samples/s = N / {what} of one run (verdict)\n", 1)[1].split("\n\n", 1)[0]
    plain = re.search(
        rf"^\| plain diffusers, no_grad, batch {batch} +\| +({NUM}) \|[^|]+\| ({NUM})x \|", table, re.M
    )
    own = re.search(rf"^\| ours, batch {batch} +\| +({NUM}) \|[^|]+\| ({NUM})x \|", table, re.M)
    assert plain and own, table
    assert plain.group(2) == "1.000" and own.group(2) == ratio, table
    assert within_rounding(ratio, *ratio_bounds(own.group(1), plain.group(1))), table
    # not a time: ours and the plain loop make the same fakes from the same noise
    same = re.search(r"^correctness \(same noise, max abs diff <= (\S+)\): (\S+): (PASS|FAIL)$", out, re.M)
    assert same and same.group(3) == "PASS" and float(same.group(2)) <= float(same.group(1)) == 1e-5, out


CHECKS = {
    "bench/overhead.py": check_overhead,
    "bench/lean_overhead.py": check_lean_overhead,
    "bench/generation.py": check_generation,
}


@pytest.mark.parametrize(
    "script, ratio",
    [
        pytest.param("bench/overhead.py", r"ratio ours/raw per step: \d+\.\d+x", marks=pytest.mark.slow),
        pytest.param("bench/lean_overhead.py", r"ratio ours/raw per step: \d+\.\d+x", marks=pytest.mark.slow),
        ("bench/generation.py", r"ratio ours/plain throughput \(batch \d+\): \d+\.\d+x"),
    ],
)
def test_bench_quick_runs(script, ratio):
    proc = run_cli(script, "--quick", timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert re.search(ratio, proc.stdout), proc.stdout
    assert re.search(r"^target .*: (PASS|MISS)$", proc.stdout, re.M), proc.stdout
    CHECKS[script](proc.stdout)


@pytest.mark.slow
def test_growth_quick_runs():
    """bench/growth.py measures, it has no target: each sweep prints its ratio to a proportional cost."""
    proc = run_cli("bench/growth.py", "--quick", timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert len(re.findall(r"vs proportional to N: \d+\.\d+x", proc.stdout)) == 2, proc.stdout
    assert len(re.findall(r"vs proportional to steps: \d+\.\d+x", proc.stdout)) == 2, proc.stdout
    assert re.search(r"^  tiny +\d+\.\d+ +\d+\.\d+ +\d+\.\d+ +\d+\.\d+$", proc.stdout, re.M), proc.stdout
    out = proc.stdout
    for sweep, per, points in (("N", "fake", 64), ("steps", "sample-step", 64)):
        rows = re.findall(
            rf"^  {sweep} +(\d+): +({NUM}) s +({NUM}) ms per {per} +vs proportional to {sweep}: "
            rf"({NUM})x$",
            out,
            re.M,
        )
        assert len(rows) == 2, out
        for x, seconds, ms, _ in rows:  # ms per fake = t / N, per sample-step = t / (64 x steps)
            count, t, dt = (int(x) if sweep == "N" else points * int(x)), number(seconds), rounding(seconds)
            assert within_rounding(ms, (t - dt) * 1e3 / count, (t + dt) * 1e3 / count), (sweep, x, out)
        (_, _, ms0, r0), (_, _, ms1, r1) = rows
        assert r0 == "1.00", (sweep, out)  # the sweep's smallest point is the reference line
        assert within_rounding(r1, *ratio_bounds(ms1, ms0)), (
            sweep,
            out,
        )  # the cost per unit against the first's
    from models.unet import build_unet, count_parameters, preset

    sizes = re.findall(rf"^  (\w+) +({NUM}) +({NUM}) +({NUM}) +({NUM})$", out, re.M)
    assert [name for name, *_ in sizes] == ["micro", "tiny"], out
    for name, params, gflop, ms, per_gflop in sizes:
        expected = count_parameters(build_unet(preset(name, in_channels=4, out_channels=4, sample_size=16)))
        assert params == f"{expected / 1e6:.2f}", (name, params, expected)
        assert within_rounding(per_gflop, *ratio_bounds(ms, gflop)), (name, out)


@pytest.mark.slow
def test_stage2_vs_control_quick_runs(tmp_path):
    """The stage-2 comparison bench end to end on a tiny stage 1: every arm runs at both step counts and lands
    in its table (a smoke run: no quality number is asserted, only that each cell is a number). --quick runs
    K = 2 (every arm, guidance included) and holds it against stage 1 at 3 steps."""
    G = rf"{NUM}(?:e[+-]\d+)?"  # a number as :.3g prints it
    proc = run_cli("bench/stage2_vs_control.py", "--quick", "--out", str(tmp_path), timeout=900)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    out = proc.stdout
    for k in (2,):
        block = out.split(f"**K = {k} DDIM steps**", 1)[1].split("\n\n", 2)[1]
        rows = {
            re.sub(r" \(\d+ seeds?\)$", "", line.split("|")[1].strip()): [
                c.strip() for c in line.split("|")[2:-1]
            ]
            for line in block.splitlines()[2:]
        }  # below the header and its rule
        assert {
            "control: MSE only",
            "offline D (the spec's)",
            "online D",
            "stage 1 + discriminator guidance",
            "distribution matching (DM)",
            "DM + MSE off the sampler's t",
            "DM + feature D",
            f"stage 1, {k} steps",
        } <= set(rows), block
        header = [c.strip() for c in block.splitlines()[0].split("|")[1:-1]]
        assert header[:3] == ["arm", "latent FD", "classifier FD"], header
        for name, cells in rows.items():
            for cell in cells[:2]:  # latent FD and classifier FD: a finite number, or a mean (min-max)
                assert re.fullmatch(rf"{G}( \({G}–{G}\))?", cell), (name, cell)
        assert header[-2:] == [
            "worst seed ÷ stage 1 at full steps (latent, cls)",
            "s / iteration vs offline D",
        ]
        for name, cells in rows.items():
            if re.fullmatch(r"stage 1, \d+ steps", name):
                continue
            assert re.fullmatch(rf"{G}, {G}", cells[-2]), (name, cells)  # its worst seed against the teacher
            if name != "stage 1 + discriminator guidance":
                assert re.fullmatch(r"\d+\.\d\d×", cells[-1]), (name, cells)  # its cost against the offline D
        for name in ("distribution matching (DM)", "DM + MSE off the sampler's t", "DM + feature D"):
            # stage 1 and its 2 iterations (continue_from: latest)
            assert rows[name][-4].count("→") == 2, rows[name]
    assert re.search(rf"^Real vs real latent FD .*: {G}\.", out, re.M), out
    assert (tmp_path / "digits_results" / "table.md").is_file()
