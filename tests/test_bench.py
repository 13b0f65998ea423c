"""Smoke runs of the side-by-side benchmarks: each `--quick` run exits 0 and prints its ratio and
target lines. Never a time: the numbers depend on the machine and its load."""
import re

import pytest

from conftest import run_cli


@pytest.mark.parametrize("script, ratio", [
    ("bench/overhead.py", r"ratio ours/raw per step: \d+\.\d+x"),
    ("bench/generation.py", r"ratio ours/plain throughput \(batch \d+\): \d+\.\d+x"),
])
def test_bench_quick_runs(script, ratio):
    proc = run_cli(script, "--quick", timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert re.search(ratio, proc.stdout), proc.stdout
    assert re.search(r"^target .*: (PASS|MISS)$", proc.stdout, re.M), proc.stdout


def test_growth_quick_runs():
    """bench/growth.py measures, it has no target: each sweep prints its ratio to a proportional cost."""
    proc = run_cli("bench/growth.py", "--quick", timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert len(re.findall(r"vs proportional to N: \d+\.\d+x", proc.stdout)) == 2, proc.stdout
    assert len(re.findall(r"vs proportional to steps: \d+\.\d+x", proc.stdout)) == 2, proc.stdout
    assert re.search(r"^  tiny +\d+\.\d+ +\d+\.\d+ +\d+\.\d+ +\d+\.\d+$", proc.stdout, re.M), proc.stdout
