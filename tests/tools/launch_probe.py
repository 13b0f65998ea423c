"""Run an advdiff module under one or both probes, each switched on by its environment variable:

ADVDIFF_AUDIT_DIR (with ADVDIFF_AUDIT_WATCH): an audit hook records every file this process opens for
    writing or renames under $ADVDIFF_AUDIT_WATCH, then writes the record to
    $ADVDIFF_AUDIT_DIR/rank{RANK}.txt (outside the run's folder). Used by the tests to show that, in a
    multi-process run, only the main process writes files.
ADVDIFF_PROBE_OUT: records the dtypes that forward passes actually compute in, then writes them to
    $ADVDIFF_PROBE_OUT as JSON. Used to show that the mixed-precision switch acts and that the
    autoencoder stays in fp32.

Each record is written at exit. Usage:
    accelerate launch tests/tools/launch_probe.py MODULE [args...]
    python tests/tools/launch_probe.py MODULE [args...]
"""

import atexit
import json
import os
import runpy
import sys


# -- the dtype probe -----------------------------------------------------------------------------------
def install_dtype_probe(out_path: str) -> None:
    import diffusers

    from models.discriminator import LatentDiscriminator

    seen = {"unet": set(), "discriminator": set(), "ae_encode": set(), "ae_decode": set()}

    def wrap(cls, name, key, pick):
        original = getattr(cls, name)

        def patched(self, *args, **kwargs):
            out = original(self, *args, **kwargs)
            seen[key].add(str(pick(out)))
            return out

        setattr(cls, name, patched)

    wrap(diffusers.UNet2DModel, "forward", "unet", lambda o: o.sample.dtype)
    wrap(LatentDiscriminator, "forward", "discriminator", lambda o: o.dtype)
    wrap(diffusers.AutoencoderKL, "encode", "ae_encode", lambda o: o.latent_dist.mean.dtype)
    wrap(diffusers.AutoencoderKL, "decode", "ae_decode", lambda o: o.sample.dtype)

    def dump():
        with open(out_path, "w") as f:
            json.dump({k: sorted(v) for k, v in seen.items()}, f)

    atexit.register(dump)


# -- the write audit -----------------------------------------------------------------------------------
def install_write_audit(audit_dir: str) -> None:
    record = []
    watch = os.path.realpath(os.environ["ADVDIFF_AUDIT_WATCH"])

    def hook(event, args):
        if event == "open" and args and isinstance(args[0], (str, bytes, os.PathLike)):
            path, mode = args[0], args[1] if len(args) > 1 else "r"
            flags = args[2] if len(args) > 2 else 0
            writing = (isinstance(mode, str) and any(c in mode for c in "wax+")) or (
                isinstance(flags, int) and flags & (os.O_WRONLY | os.O_RDWR | os.O_CREAT)
            )
            if writing:
                record.append(os.fsdecode(path))
        elif event in ("os.rename", "os.replace", "os.mkdir", "os.remove", "shutil.rmtree"):
            record.append(f"{event} {os.fsdecode(args[0])}")

    def dump():
        mine = [r for r in record if watch in os.path.realpath(r.split(" ", 1)[-1])]
        out = os.path.join(audit_dir, f"rank{os.environ.get('RANK', '0')}.txt")
        with open(out, "w") as f:
            f.write("\n".join(mine))

    sys.addaudithook(hook)
    atexit.register(dump)


def main() -> None:
    audit_dir, probe_out = os.environ.get("ADVDIFF_AUDIT_DIR"), os.environ.get("ADVDIFF_PROBE_OUT")
    if not (audit_dir or probe_out) or len(sys.argv) < 2:
        sys.exit(
            "usage: ADVDIFF_AUDIT_DIR=... ADVDIFF_AUDIT_WATCH=... and/or ADVDIFF_PROBE_OUT=... "
            "python tests/tools/launch_probe.py MODULE [args...]"
        )
    # the probe's imports come first, so that the audit hook sees only what the module itself does
    if probe_out:
        install_dtype_probe(probe_out)
    if audit_dir:
        install_write_audit(audit_dir)
    module, sys.argv = sys.argv[1], [sys.argv[1]] + sys.argv[2:]
    try:
        runpy.run_module(module, run_name="__main__")
    except SystemExit as e:
        if e.code not in (0, None):
            raise


if __name__ == "__main__":
    main()
