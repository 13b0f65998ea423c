"""Named fault-injection points, for testing crash safety under SIGKILL.

Off (one attribute test per call) unless the environment asks, read once at import:

  ADVDIFF_FAULT_TRACE=FILE   the main process appends each point's name to FILE as it passes it
  ADVDIFF_FAULT_AT=NAME      the main process SIGKILLs the whole run on reaching point NAME (after
                             tracing it): its sibling workers, the launcher above them and itself

Names identify a point stably across reruns (they carry the iteration, stage, step or file, never a
per-process counter), so a point seen in one run can be targeted in a resumed one:

  phase:k{k}                 start of iteration k's latents (iteration_shard)
  gen:k{k}:b{i}              before the generation batch starting at global sample i
  encode:{phase}:b{j}        before encode batch j of the current phase (k{k}, or summary{r})
  gather:{dir}/{file}        before the latents of a set are gathered and written
  phase:summary{r}           start of the quality measurement of summary row r
  step:{stage}:{s}           top of training step s of a StepTrainer stage (stage2_d0, stage2_g1, ...)
  partial:[{scope}:]{dir}/{file}   atomic write: the temp file half written (first chunk)
  write:[{scope}:]{dir}/{file}     atomic write: temp file whole and fsynced, not yet renamed

A file written more than once carries a scope: inside a training step's checkpoint that step's
`{stage}:{s}` (up to the write of the stage's resume state, always the checkpoint's last), and in
the quality summary `summary{r}` (up to its picture).
"""

from __future__ import annotations

import functools
import os
import signal
from pathlib import Path

from trainer.core.errors import UserError

_TRACE = os.environ.get("ADVDIFF_FAULT_TRACE") or None
_AT = os.environ.get("ADVDIFF_FAULT_AT") or None
_MAIN = os.environ.get("RANK", os.environ.get("LOCAL_RANK", "0")) == "0"
enabled = bool(_MAIN and (_TRACE or _AT))

_ctx = {"phase": "", "scope": None, "end": None, "fd": None}


def configure(trace: str | None = None, at: str | None = None, main: bool = True) -> None:
    """Set (or clear) tracing and the kill point in-process, as the environment would at import."""
    global _TRACE, _AT, _MAIN, enabled
    if _ctx["fd"] is not None:
        os.close(_ctx["fd"])
        _ctx["fd"] = None
    _TRACE, _AT, _MAIN = trace or None, at or None, main
    enabled = bool(_MAIN and (_TRACE or _AT))
    _ctx.update(phase="", scope=None, end=None)


def point(name: str) -> None:
    """A named point: traced, and the whole run SIGKILLed here if it is the chosen one."""
    if not enabled:
        return
    if _TRACE:
        if _ctx["fd"] is None:
            _ctx["fd"] = os.open(_TRACE, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
        os.write(_ctx["fd"], (name + "\n").encode())  # unbuffered: survives the SIGKILL below
    if name == _AT:
        kill_run()


def phase(label: str) -> None:
    """Start a named phase (point `phase:{label}`); encode points inside it are named after it."""
    if enabled:
        _ctx["phase"], _ctx["scope"], _ctx["end"] = label, None, None
        point(f"phase:{label}")


def phase_label() -> str:
    return _ctx["phase"]


def scope(label: str, until) -> None:
    """Name the writes from here up to and including the write of `until` (or the next phase or
    step) `{label}:{dir}/{file}`: a file rewritten several times gets a distinct name each time."""
    if enabled:
        _ctx["scope"], _ctx["end"] = label, Path(until)


def step(stage: str, index: int, state_path) -> None:
    """Top of training step `index` of `stage`: point `step:{stage}:{index}`; the writes of its
    checkpoint, up to the stage's resume state (always the last), are scoped `{stage}:{index}`."""
    if enabled:
        scope(f"{stage}:{index}", state_path)
        point(f"step:{stage}:{index}")


def _write_name(path: Path) -> str:
    where = f"{path.parent.name}/{path.name}"
    return f"{_ctx['scope']}:{where}" if _ctx["scope"] else where


class _PartialProbe:
    """Wraps the temp file of an atomic write: point `partial:...` after its first chunk."""

    def __init__(self, f, name: str):
        self._f, self._name = f, name

    def write(self, data):
        n = self._f.write(data)
        if self._name is not None:
            self._f.flush()
            name, self._name = self._name, None
            point(name)
        return n

    def __getattr__(self, attr):
        return getattr(self._f, attr)


def probe(f, path: Path):
    """The file object an atomic write should write through (itself when faults are off)."""
    if not enabled:
        return f
    return _PartialProbe(f, f"partial:{_write_name(Path(path))}")


def before_rename(path: Path) -> None:
    """Point `write:...`: the temp file of `path` is whole and fsynced, the rename not yet done."""
    if not enabled:
        return
    path = Path(path)
    point(f"write:{_write_name(path)}")
    if _ctx["end"] is not None and path == _ctx["end"]:
        _ctx["scope"], _ctx["end"] = None, None


# -- the kill ---------------------------------------------------------------------------------------
def _children(ppid: int) -> list[int]:
    out = []
    try:
        entries = os.listdir("/proc")
    except OSError:
        return out
    for entry in entries:
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/stat", "rb") as f:
                stat = f.read().decode(errors="replace")
        except OSError:
            continue
        fields = stat[stat.rfind(")") + 2 :].split()  # after "pid (comm) ": state, ppid, ...
        if len(fields) > 1 and fields[1] == str(ppid):
            out.append(int(entry))
    return out


def _kill_tree(pid: int) -> None:
    """SIGKILL `pid`, and its whole process group where it leads one."""
    try:
        if os.getpgid(pid) == pid:
            os.killpg(pid, signal.SIGKILL)
        else:
            os.kill(pid, signal.SIGKILL)
    except (ProcessLookupError, PermissionError):
        pass


def kill_run() -> None:
    """SIGKILL the whole run at once. Under torchrun (accelerate launch) every worker leads its own
    session, so the other workers (the launcher's other children) and the launcher are killed
    explicitly, then this process with its group."""
    me = os.getpid()
    if "TORCHELASTIC_RUN_ID" in os.environ or "LOCAL_WORLD_SIZE" in os.environ:
        parent = os.getppid()
        for pid in _children(parent):
            if pid != me:
                _kill_tree(pid)
        _kill_tree(parent)
    if os.getpgrp() == me:
        os.killpg(me, signal.SIGKILL)
    os.kill(me, signal.SIGKILL)


# -- NaN injection ---------------------------------------------------------------------------------
# ADVDIFF_INJECT_NAN="STAGE:STEPS[:RANK][;STAGE:STEPS[:RANK]...]" makes StepTrainer multiply the loss by
# NaN at those steps: STAGE is a trainer's `stage` (stage0, stage1, stage2_d0, stage2_g0, ...), STEPS a
# comma list of step numbers (1-based, as in the log's "step N/M": the N-th step), `a-b` ranges or an
# open `a-`, and RANK (optional) injects on that process only. Unset, it costs one environment lookup
# per step.
INJECT_NAN_ENV = "ADVDIFF_INJECT_NAN"


@functools.lru_cache(maxsize=8)
def parse_nan_injection(text: str) -> tuple:
    """ADVDIFF_INJECT_NAN's value -> ((stage, ((first, last or None), ...), rank or None), ...)."""
    entries = []
    for entry in filter(None, (e.strip() for e in text.split(";"))):
        parts = entry.split(":")
        try:
            if len(parts) not in (2, 3) or not parts[0]:
                raise ValueError
            ranges = []
            for item in parts[1].split(","):
                lo, dash, hi = item.strip().partition("-")
                first = int(lo)
                last = (int(hi) if hi.strip() else None) if dash else first
                if first < 1 or (last is not None and last < first):
                    raise ValueError
                ranges.append((first, last))
            rank = int(parts[2]) if len(parts) == 3 else None
        except ValueError:
            raise UserError(
                f"{INJECT_NAN_ENV}: expected STAGE:STEPS[:RANK] entries separated by ';' (STEPS: "
                f'1-based step numbers, a-b or a- ranges, comma-separated), got "{entry}"'
            ) from None
        entries.append((parts[0], tuple(ranges), rank))
    return tuple(entries)


def nan_injected(stage: str, step_number: int, rank: int) -> bool:
    """Whether ADVDIFF_INJECT_NAN asks for a NaN loss at this (stage, 1-based step number, rank)."""
    text = os.environ.get(INJECT_NAN_ENV)
    if not text:
        return False
    return any(
        s == stage
        and (r is None or r == rank)
        and any(first <= step_number and (last is None or step_number <= last) for first, last in ranges)
        for s, ranges, r in parse_nan_injection(text)
    )
