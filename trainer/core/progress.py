"""Progress bars on the main process only (tqdm), showing throughput. They appear on a terminal;
in batch logs (no terminal) the periodic status lines carry the same numbers, so bars are off there
unless ADVDIFF_PROGRESS=1."""

from __future__ import annotations

import os
import sys


class _Null:
    def update(self, n=1):
        pass

    def set_postfix_str(self, s):
        pass

    def close(self):
        pass


def bar(accelerator, total: int, desc: str, unit: str = "it", initial: int = 0):
    tty = sys.stderr.isatty()
    if not accelerator.is_main_process or not (tty or os.environ.get("ADVDIFF_PROGRESS") == "1"):
        return _Null()
    try:
        from tqdm.auto import tqdm
    except ImportError:
        return _Null()
    return tqdm(
        total=total,
        initial=initial,
        desc=desc,
        unit=unit,
        leave=False,
        dynamic_ncols=True,
        mininterval=0.5 if tty else 30.0,
        file=sys.stderr,
    )
