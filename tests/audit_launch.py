"""Run an advdiff module under an audit hook that records every file this process opens for writing
or renames, then write the record to $ADVDIFF_AUDIT_DIR/rank{RANK}.txt (outside the run's folder).

Used by the tests to show that, in a multi-process run, only the main process writes files.
Usage: accelerate launch tests/audit_launch.py MODULE [args...]
"""
import atexit
import os
import runpy
import sys

record = []
watch = os.path.realpath(os.environ["ADVDIFF_AUDIT_WATCH"])


def hook(event, args):
    if event == "open" and args and isinstance(args[0], (str, bytes, os.PathLike)):
        path, mode = args[0], args[1] if len(args) > 1 else "r"
        flags = args[2] if len(args) > 2 else 0
        writing = (isinstance(mode, str) and any(c in mode for c in "wax+")) or \
                  (isinstance(flags, int) and flags & (os.O_WRONLY | os.O_RDWR | os.O_CREAT))
        if writing:
            record.append(os.fsdecode(path))
    elif event in ("os.rename", "os.replace", "os.mkdir", "os.remove", "shutil.rmtree"):
        record.append(f"{event} {os.fsdecode(args[0])}")


def dump():
    mine = [r for r in record if watch in os.path.realpath(r.split(" ", 1)[-1])]
    out = os.path.join(os.environ["ADVDIFF_AUDIT_DIR"], f"rank{os.environ.get('RANK', '0')}.txt")
    with open(out, "w") as f:
        f.write("\n".join(mine))


sys.addaudithook(hook)
atexit.register(dump)
module, sys.argv = sys.argv[1], [sys.argv[1]] + sys.argv[2:]
try:
    runpy.run_module(module, run_name="__main__")
except SystemExit as e:
    if e.code not in (0, None):
        raise
