"""The fault-injection machinery test_faults.py drives: the seeded choice of kill points from an
uninterrupted run's trace, the 2-process launch (killed with SIGKILL at a point), and the checks after each
kill (everything loads, nothing finished is redone, the final outputs equal the reference's)."""

import csv
import json
import os
import random
import signal
import subprocess
import sys
import time
import uuid
from pathlib import Path

import pytest
import torch
from helpers import REPO, free_port

SEED = int(os.environ.get("ADVDIFF_FAULT_SEED", "1234"))
NUM_POINTS = max(10, int(os.environ.get("ADVDIFF_FAULT_POINTS", "10")))
# replay or probe: these comma-separated points instead of random ones ("all": every unique point)
FAULT_LIST = os.environ.get("ADVDIFF_FAULT_LIST", "")
RUN_TIMEOUT = 300
ITERATIONS = 2
REQUIRED = (
    "generation",
    "encoding",
    "latents",
    "d_step",
    "diffusion_step",
    "checkpoint",
    "csv",
    "picture",
    "summary",
)

pytestmark = pytest.mark.skipif(
    not Path("/proc/self/environ").exists(),
    reason="the kill and the leftover-process check read /proc (Linux)",
)


def category(name: str) -> str:
    kind, _, rest = name.partition(":")
    if kind == "gen":
        return "generation"
    if kind == "encode":
        return "summary" if rest.startswith("summary") else "encoding"
    if kind == "phase":
        return "summary" if rest.startswith("summary") else "iteration"
    if kind == "step":
        return "d_step" if rest.startswith("stage2_d") else "diffusion_step"
    if kind == "gather" or rest.endswith("_latents.pt"):
        return "latents"
    if "summary" in rest:
        return "summary"
    return {"pt": "checkpoint", "csv": "csv", "png": "picture"}.get(rest.rsplit(".", 1)[-1], "other")


def iteration_of(trace: list[str]) -> list[int]:
    """The stage-2 iteration each trace line belongs to (a new one starts at `phase:k{k}`)."""
    out, k = [], 0
    for name in trace:
        if name.startswith("phase:k"):
            k = int(name[len("phase:k") :])
        out.append(k)
    return out


def superseded(name: str, earlier: list[str]) -> bool:
    """True for the summary picture's write after a kill in that same write: its CSV, written just
    before, already holds the row, so a rerun does not draw that picture again (the next row's, or
    the end of the iteration, redraws it)."""
    return (
        name.startswith("write:summary")
        and name.endswith(".png")
        and "partial:" + name[len("write:") :] in earlier
    )


def candidates(trace: list[str]) -> list[str]:
    """Names the kills can target: those that occur once in the trace."""
    counts = {n: trace.count(n) for n in trace}
    return [n for n in trace if counts[n] == 1]


def choose_points(trace: list[str], rng: random.Random) -> list[str]:
    """>= NUM_POINTS names, unique in the trace, covering every category, a half-written temp file and
    every iteration, in the trace's order."""
    its = iteration_of(trace)
    cands = candidates(trace)
    chosen = []

    def pick(pool):
        pool = [
            n
            for n in pool
            if n not in chosen and not superseded(n, chosen) and not any(superseded(c, [n]) for c in chosen)
        ]
        if pool:
            chosen.append(rng.choice(pool))

    for cat in REQUIRED:
        pool = [n for n in cands if category(n) == cat]
        assert pool, f"no point of category {cat} in the trace"
        pick(pool)
    if not any(n.startswith("partial:") for n in chosen):
        pick([n for n in cands if n.startswith("partial:")])
    for k in range(ITERATIONS):
        if not any(its[trace.index(n)] == k for n in chosen):
            pick([n for n in cands if its[trace.index(n)] == k])
    while len(chosen) < NUM_POINTS:
        pick(cands)
    return sorted(chosen, key=trace.index)


# -- launching ---------------------------------------------------------------------------------------
def _marked(marker: str) -> list[int]:
    """Live processes started for this run (their environment carries the marker)."""
    pids, needle = [], f"ADVDIFF_FAULT_RUN={marker}".encode()
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                with open(f"/proc/{entry}/environ", "rb") as f:
                    if needle in f.read().split(b"\0"):
                        pids.append(int(entry))
            except OSError:
                pass
    return pids


def launch(cfg: Path, log: Path, trace: Path, at: str | None = None) -> int:
    """`accelerate launch` with 2 CPU processes in a new session; returns the launcher's return code."""
    marker = uuid.uuid4().hex
    env = {k: v for k, v in os.environ.items() if not k.startswith("ADVDIFF_FAULT_")}
    env.update(
        PYTHONUNBUFFERED="1",
        ACCELERATE_USE_CPU="1",
        OMP_NUM_THREADS="1",
        ADVDIFF_FAULT_RUN=marker,
        ADVDIFF_FAULT_TRACE=str(trace),
    )
    if at is not None:
        env["ADVDIFF_FAULT_AT"] = at
    cmd = [
        sys.executable,
        "-m",
        "accelerate.commands.launch",
        "--num_machines",
        "1",
        "--num_processes",
        "2",
        "--multi_gpu",
        "--main_process_port",
        str(free_port()),
        "-m",
        "trainer.stage2",
        str(cfg),
        "--device",
        "cpu",
    ]
    with open(log, "w") as out:
        proc = subprocess.Popen(
            cmd, stdout=out, stderr=subprocess.STDOUT, env=env, cwd=REPO, start_new_session=True
        )
        try:
            rc = proc.wait(timeout=RUN_TIMEOUT)
        except subprocess.TimeoutExpired:
            rc = None
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
    deadline = time.time() + 10
    while _marked(marker) and time.time() < deadline:  # SIGKILLed processes may take a moment to go
        time.sleep(0.1)
    left = _marked(marker)
    for pid in left:
        os.kill(pid, signal.SIGKILL)
    tail = log.read_text()[-4000:]
    assert rc is not None, f"run timed out after {RUN_TIMEOUT}s (fault point {at}):\n{tail}"
    assert not left, f"processes {left} of the run survived it (fault point {at}):\n{tail}"
    return rc


def read_trace(path: Path) -> list[str]:
    return path.read_text().splitlines() if path.is_file() else []


# -- what is on disk ---------------------------------------------------------------------------------
def temps(out: Path) -> list[Path]:
    return sorted(p for p in out.rglob(".*.tmp.*"))


def check_outputs_load(out: Path, when: str) -> None:
    """Every output (temp files aside) loads: .pt with torch, .csv parses with one width, .png decodes."""
    from PIL import Image

    for p in sorted(out.rglob("*")):
        if not p.is_file() or p.name.startswith("."):
            continue
        rel = p.relative_to(out)
        try:
            if p.suffix == ".pt":
                torch.load(p, map_location="cpu", weights_only=True)
            elif p.suffix == ".csv":
                with open(p, newline="") as f:
                    rows = list(csv.reader(f))
                assert rows and all(len(r) == len(rows[0]) for r in rows), "ragged rows"
                import pandas as pd

                pd.read_csv(p)
            elif p.suffix == ".png":
                with Image.open(p) as im:
                    im.load()
            elif p.suffix == ".json":
                json.loads(p.read_text())
        except Exception as e:  # noqa: BLE001 - reported with the file and the moment
            pytest.fail(f"{when}: {rel} does not load: {type(e).__name__}: {e}")


def progress(out: Path) -> dict:
    """What is finished on disk, per iteration: latents, D and diffusion steps, summary rows."""
    state = {}
    for k in range(ITERATIONS):
        folder = out / f"discriminator_iter_{k}"
        d_state = folder / "discriminator_state.pt"
        d = torch.load(d_state, weights_only=True) if d_state.is_file() else None
        g_state = out / "checkpoints" / f"t2_iter_{k}_checkpoint_latest.pt"
        g = torch.load(g_state, weights_only=True) if g_state.is_file() else None
        state[k] = {
            "fake": (folder / "fake_latents.pt").is_file(),
            "real": (folder / "real_latents.pt").is_file(),
            "d_step": d["step"] if d else 0,
            "d_done": bool(d and d["complete"]),
            "g_step": g["state"]["step"] if g else 0,
            "g_done": bool(g and g["complete"]),
        }
    summary = out / "t2_summary.csv"
    rows = list(csv.DictReader(open(summary, newline=""))) if summary.is_file() else []
    state["summary_rows"] = {int(float(r["iteration"])) for r in rows}
    return state


def check_no_redo(before: dict, trace: list[str], when: str) -> None:
    """Nothing finished before this run was done again in it; training resumed at the saved steps."""

    def first_step(stage):
        steps = [int(n.rsplit(":", 1)[1]) for n in trace if n.startswith(f"step:{stage}:")]
        return steps[0] if steps else None

    for k in range(ITERATIONS):
        b = before[k]
        if b["fake"]:
            assert not [n for n in trace if n.startswith(f"gen:k{k}:")], (
                f"{when}: iteration {k}'s saved fakes regenerated"
            )
        if b["real"]:
            assert not [n for n in trace if n.startswith(f"encode:k{k}:")], (
                f"{when}: iteration {k}'s saved reals re-encoded"
            )
        if b["g_done"]:
            assert f"phase:k{k}" not in trace, f"{when}: finished iteration {k} entered again"
        d0, g0 = first_step(f"stage2_d{k}"), first_step(f"stage2_g{k}")
        if b["d_done"]:
            assert d0 is None, f"{when}: the finished D of iteration {k} was trained again (from step {d0})"
        elif d0 is not None:
            assert d0 == b["d_step"], (
                f"{when}: D of iteration {k} restarted at step {d0}, saved at {b['d_step']}"
            )
        if b["g_done"]:
            assert g0 is None, f"{when}: finished diffusion phase of iteration {k} trained again"
        elif g0 is not None:
            assert g0 == b["g_step"], (
                f"{when}: diffusion phase of iteration {k} restarted at step {g0}, saved at {b['g_step']}"
            )
    for r in before["summary_rows"]:
        assert f"phase:summary{r}" not in trace, f"{when}: summary row {r} measured again"


# -- comparing with the uninterrupted run --------------------------------------------------------------
def assert_same_outputs(ref: Path, out: Path) -> None:
    import numpy as np
    import pandas as pd
    from PIL import Image

    def listing(root):
        return {str(p.relative_to(root)) for p in root.rglob("*") if p.is_file()}

    assert listing(out) == listing(ref), listing(out) ^ listing(ref)
    for rel in sorted(listing(ref)):
        if rel == "timings.csv":  # wall-clock record: a killed phase has no row, its rerun adds one
            continue
        a, b = ref / rel, out / rel
        if rel.endswith("_latents.pt"):
            assert torch.equal(torch.load(a), torch.load(b)), rel
        elif rel.endswith(".pt"):
            ba, bb = torch.load(a, weights_only=True), torch.load(b, weights_only=True)
            assert ba.get("step") == bb.get("step"), rel
            keys = [key for key in ("state_dict", "raw_state_dict") if key in ba]
            if "model" in ba:  # D's resume state
                ba, bb, keys = ba["model"], bb["model"], ["d"]
            assert keys, rel
            for key in keys:
                assert ba[key].keys() == bb[key].keys(), (rel, key)
                for p in ba[key]:
                    assert torch.equal(ba[key][p], bb[key][p]), (rel, key, p)
        elif rel.endswith(".csv"):
            da, db = pd.read_csv(a), pd.read_csv(b)
            wall = [c for c in da.columns if c == "seconds"]
            pd.testing.assert_frame_equal(da.drop(columns=wall), db.drop(columns=wall), obj=rel)
        elif rel.endswith(".png"):
            with Image.open(a) as ia, Image.open(b) as ib:
                assert np.array_equal(np.asarray(ia), np.asarray(ib)), rel
