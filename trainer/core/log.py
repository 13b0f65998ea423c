"""Status lines and warnings, printed by the main process only."""

from __future__ import annotations

import sys
import time


def warn(message: str) -> None:
    print(f"advdiff: warning: {message}", file=sys.stderr, flush=True)


class Logger:
    """Status lines on the main process only."""

    def __init__(self, accelerator, prefix: str = ""):
        self.accelerator, self.prefix, self.t0 = accelerator, prefix, time.time()

    @property
    def acc(self):
        """The old name of `accelerator`, read-only."""
        return self.accelerator

    def __call__(self, message: str) -> None:
        if self.accelerator.is_main_process:
            print(f"[{self.prefix} {time.time() - self.t0:7.1f}s] {message}", flush=True)
