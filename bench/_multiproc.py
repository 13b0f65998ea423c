"""Shared by bench/scaling.py and bench/memory.py: the machine header, accelerate launches on CPU,
and small statistics. Not a benchmark itself."""

from __future__ import annotations

import datetime
import json
import os
import platform
import socket
import statistics
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def loadavg() -> str:
    try:
        return "%.2f %.2f %.2f" % os.getloadavg()
    except OSError:
        return "n/a"


def machine_header(threads: int) -> str:
    """One line: date, CPU, cores, torch, threads and load (the in-process benches print it)."""
    import datetime

    import torch

    return (
        f"date {datetime.datetime.now().isoformat(timespec='seconds')}; cpu {cpu_model()}, {os.cpu_count()} "
        f"cores; torch {torch.__version__}, threads {threads}; load average {loadavg()}"
    )


def header(title: str) -> None:
    import torch

    print(f"# {title}")
    print(
        f"machine: {cpu_model()}, {os.cpu_count()} logical cores "
        f"(affinity {len(os.sched_getaffinity(0)) if hasattr(os, 'sched_getaffinity') else '?'}); "
        f"python {platform.python_version()}, torch {torch.__version__}"
    )
    print(f"date: {datetime.datetime.now().astimezone().isoformat(timespec='seconds')}")
    print(f"load average (1/5/15 min) before: {loadavg()}", flush=True)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def launch(nproc: int, script: str, *args: str, timeout: float = 900) -> tuple[dict, float]:
    """Run `script args` under `accelerate launch` on `nproc` CPU processes, one thread each.
    The script writes its results as JSON to the path given after `--result`; returns (that JSON,
    wall seconds of the whole launch, seen from here)."""
    import tempfile

    launcher = [
        sys.executable,
        "-m",
        "accelerate.commands.launch",
        "--num_machines",
        "1",
        "--num_processes",
        str(nproc),
        "--main_process_port",
        str(free_port()),
    ]
    if nproc > 1:
        launcher += ["--multi_gpu"]
    fd, result = tempfile.mkstemp(prefix="bench_", suffix=".json")
    os.close(fd)
    env = {
        **os.environ,
        "PYTHONUNBUFFERED": "1",
        "ACCELERATE_USE_CPU": "1",
        "OMP_NUM_THREADS": "1",
        "MKL_NUM_THREADS": "1",
        "BENCH_T0": repr(time.time()),
    }
    t0 = time.perf_counter()
    proc = subprocess.run(
        launcher + [script, *args, "--result", result],
        capture_output=True,
        text=True,
        env=env,
        timeout=timeout,
        cwd=REPO,
    )
    wall = time.perf_counter() - t0
    try:
        if proc.returncode != 0:
            raise RuntimeError(
                f"launch of {script} on {nproc} process(es) failed (exit {proc.returncode}):\n"
                f"{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}"
            )
        data = json.loads(Path(result).read_text())
    finally:
        Path(result).unlink(missing_ok=True)
    return data, wall


def med(values) -> float:
    return statistics.median(values)


def spread(values, fmt: str = "{:.2f}") -> str:
    """'median (min-max, n=k)'."""
    values = list(values)
    if len(values) == 1:
        return fmt.format(values[0])
    return f"{fmt.format(med(values))} ({fmt.format(min(values))}-{fmt.format(max(values))}, n={len(values)})"


def verdict(name: str, ok: bool) -> str:
    return f"target {name}: {'PASS' if ok else 'MISS'}"


def gather_records(record: dict) -> list[dict] | None:
    """Every rank's `record` on the main process (None elsewhere); a collective."""
    import torch.distributed as dist

    if not (dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1):
        return [record]
    out = [None] * dist.get_world_size() if dist.get_rank() == 0 else None
    dist.gather_object(record, out, dst=0)
    return out


def write_result(path: str, data) -> None:
    Path(path).write_text(json.dumps(data))
