"""Graceful preemption. A signal (SIGUSR1, SIGTERM) or a stop file only raises a flag; all ranks agree
on it at the next step boundary (an all-reduce), write the resume state, and exit with
REQUEUE_EXIT_CODE, leaving a marker file that tells a batch script to requeue the job.

The stop file exists because launchers do not forward every signal to their workers (torchrun
drops SIGUSR1): a batch script that receives the signal touches $ADVDIFF_STOP_FILE instead.
"""

from __future__ import annotations

import os
import signal
import sys
import threading

import torch

from trainer.files import atomic
from trainer.parallel.collectives import barrier

REQUEUE_EXIT_CODE = 75  # EX_TEMPFAIL
MARKER_NAME = ".advdiff_requeue"
STOP_FILE_ENV = "ADVDIFF_STOP_FILE"

_state = {"signal": None, "marker_dir": None}


class Preempted(Exception):
    """Raised on every rank once the resume state is written; the CLI turns it into exit code 75."""


def _handler(signum, frame):
    if _state["signal"] is None:
        _state["signal"] = signal.Signals(signum).name
        print(
            f"advdiff: received {_state['signal']}; stopping at the next step boundary",
            file=sys.stderr,
            flush=True,
        )


def install() -> None:
    if threading.current_thread() is threading.main_thread():
        for sig in (signal.SIGUSR1, signal.SIGTERM):
            signal.signal(sig, _handler)


def requested_here() -> str | None:
    if _state["signal"] is not None:
        return _state["signal"]
    path = os.environ.get(STOP_FILE_ENV)
    if path and os.path.exists(path):
        return f"stop file {path}"
    return None


def should_stop(device) -> bool:
    """Collective: True on every rank if any rank was asked to stop."""
    import torch.distributed as dist

    flag = torch.tensor([1.0 if requested_here() else 0.0], device=device)
    if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
        dist.all_reduce(flag, op=dist.ReduceOp.MAX)
    return bool(flag.item() > 0)


def set_marker_dir(out_dir) -> None:
    """Where `stop` leaves the requeue marker: the experiment folder."""
    _state["marker_dir"] = out_dir


def stop(accelerator, reason: str):
    """On every rank, after the resume state is written: leave the marker, wait for it, raise."""
    if accelerator.is_main_process and _state["marker_dir"] is not None:
        atomic.write_text(f"preempted: {reason}\n", os.path.join(_state["marker_dir"], MARKER_NAME))
    # A launcher tears the other workers down as soon as one exits: nobody leaves before the marker exists.
    barrier()
    raise Preempted(reason)
