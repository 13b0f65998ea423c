"""Smoke runs of bench/scaling.py and bench/memory.py (issue 7, 1c/1d): each finishes with --quick and
prints its ratio and target lines. No time or memory figure is asserted (the machine is shared); what is
checked is that each ratio parses into a finite positive number, agrees with the figures it is computed
from (within their printed rounding) and with its target line, whose PASS/MISS agrees with the number
and the stated target."""

import re

import pytest
from bench_output import NUM, bench_targets, ratio_bounds, within_rounding
from helpers import run_cli

pytestmark = pytest.mark.slow  # multi-process benchmark runs


def test_scaling_quick_prints_efficiency(digits_manifest):
    proc = run_cli("bench/scaling.py", "--quick", "--digits", str(digits_manifest.parent), timeout=300)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    out = proc.stdout
    for phase in ("a", "b", "a+b"):
        assert re.search(rf"^efficiency {re.escape(phase)}\s+= T1 / \(2 x T2\) = [\d.]+%", out, re.M), out
    assert re.search(r"^target scaling efficiency a\+b >= 90% .*: (PASS|MISS)$", out, re.M), out
    assert "gather transfer" in out and "write" in out and "load average after" in out
    assert "P=1 and P=2 wrote identical latents: True" in out
    targets = bench_targets(out)
    assert [(t.what, t.op, t.limit, t.unit) for t in targets] == [
        (f"scaling efficiency {what}", ">=", 90.0, "%") for what in ("a+b", "phase a", "phase b")
    ], out
    effs = dict(re.findall(rf"^efficiency (a\+b|a|b) += T1 / \(2 x T2\) = ({NUM})%", out, re.M))
    assert effs == {t.what.split()[-1]: t.measured_text for t in targets}, out
    # efficiency = median T1 / (2 x median T2), from the table of phase wall times (median first)
    walls = re.findall(rf"^  (a|b|a\+b)(?: [\w+]+)? +P=1 ({NUM})(?: \([^)]*\))? +P=2 ({NUM})", out, re.M)
    assert [phase for phase, _, _ in walls] == ["a", "b", "a+b"], out
    for phase, t1, t2 in walls:
        low, high = ratio_bounds(t1, t2)
        assert within_rounding(effs[phase], 50 * low, 50 * high), (phase, t1, t2, effs[phase])


def test_memory_quick_prints_ratios():
    proc = run_cli("bench/memory.py", "--quick", timeout=300)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    out = proc.stdout
    assert re.search(r"^\s+N latents MB \| main peak-base x latents", out, re.M), out
    assert re.search(r"^\s+2048\s+128.0 \|\s+[\d.]+\s+[\d.]+\s+[\d.]+ \|\s+[\d.]+\s+[\d.]+", out, re.M), out
    assert re.search(r"^target main process peak - baseline <= 1.5x .*: (PASS|MISS)$", out, re.M), out
    assert re.search(r"^target non-main peak - baseline <= 1.5x .*: (PASS|MISS)$", out, re.M), out
    targets = bench_targets(out)
    assert [(t.what, t.op, t.limit, t.unit) for t in targets] == [
        ("main process peak - baseline", "<=", 1.5, "x"),
        ("non-main peak - baseline", "<=", 1.5, "x"),
    ], out
    nproc = int(re.search(r"; (\d+) processes, ", out).group(1))
    row = re.search(
        rf"^\s+2048\s+({NUM}) \|\s+({NUM})\s+({NUM})\s+{NUM} \|\s+({NUM})\s+({NUM})\s+{NUM} \|", out, re.M
    )
    assert row, out
    latents, main_mb, main_x, other_mb, other_x = row.groups()
    # the target lines report the largest N's row: main against all the latents, the other rank its shard
    assert (targets[0].measured_text, targets[1].measured_text) == (main_x, other_x), out
    assert within_rounding(main_x, *ratio_bounds(main_mb, latents)), row.group(0)
    assert 2048 % nproc == 0 and within_rounding(
        other_x, *ratio_bounds(other_mb, f"{float(latents) / nproc:.3f}")
    ), row.group(0)
