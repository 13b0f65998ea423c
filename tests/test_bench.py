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
