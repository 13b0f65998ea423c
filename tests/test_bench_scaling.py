"""Smoke runs of bench/scaling.py and bench/memory.py (issue 7, 1c/1d): each finishes with --quick and
prints its ratio and target lines. No time or memory figure is asserted (the machine is shared)."""
import re

from conftest import run_cli


def test_scaling_quick_prints_efficiency(digits_manifest):
    proc = run_cli("bench/scaling.py", "--quick", "--digits", str(digits_manifest.parent), timeout=300)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    out = proc.stdout
    for phase in ("a", "b", "a+b"):
        assert re.search(rf"^efficiency {re.escape(phase)}\s+= T1 / \(2 x T2\) = [\d.]+%", out, re.M), out
    assert re.search(r"^target scaling efficiency a\+b >= 90% .*: (PASS|MISS)$", out, re.M), out
    assert "gather transfer" in out and "write" in out and "load average after" in out
    assert "P=1 and P=2 wrote identical latents: True" in out


def test_memory_quick_prints_ratios():
    proc = run_cli("bench/memory.py", "--quick", timeout=300)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    out = proc.stdout
    assert re.search(r"^\s+N latents MB \| main peak-base x latents", out, re.M), out
    assert re.search(r"^\s+2048\s+128.0 \|\s+[\d.]+\s+[\d.]+\s+[\d.]+ \|\s+[\d.]+\s+[\d.]+", out, re.M), out
    assert re.search(r"^target main process peak - baseline <= 1.5x .*: (PASS|MISS)$", out, re.M), out
    assert re.search(r"^target non-main peak - baseline <= 1.5x .*: (PASS|MISS)$", out, re.M), out
