"""The embedded default: digits data -> stage 0 (autoencoder) -> stage 1 (diffusion) -> sample grid,
and a ready stage-2 config, all under one output folder. Re-running resumes or skips finished work."""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

from . import io
from .config import load_config
from .errors import UserError

TEMPLATE = Path(__file__).parent / "defaults" / "digits.yaml"


def prepare(out: Path, is_main: bool) -> Path:
    """Write the data and config.yaml under `out` (main process); returns the config path."""
    from .digits import build_digits

    out.mkdir(parents=True, exist_ok=True)
    if is_main:
        build_digits(out / "data")
        cfg_path = out / "config.yaml"
        if not cfg_path.is_file():
            io.write_text(TEMPLATE.read_text(), cfg_path)
    return out / "config.yaml"


def run(out: Path, device: str = "auto", overrides: dict | None = None, stage2: bool = True) -> Path:
    from .runtime import build_accelerator
    from .stage0 import AutoencoderTrainer
    from .stage1 import DiffusionTrainer

    if out.exists() and not out.is_dir():
        raise UserError(f"--out {out}: exists and is not a folder")
    cfg_path = out / "config.yaml"
    cfg = load_config(TEMPLATE, overrides)  # validates before any compute
    acc = build_accelerator(device, cfg.training.resolved_mixed_precision())
    prepare(out, acc.is_main_process)
    acc.wait_for_everyone()
    cfg = load_config(cfg_path, overrides)
    from . import timing

    with timing.phase(acc, cfg.out_dir, "stage0 (autoencoder)"):
        AutoencoderTrainer(cfg, acc).fit()
    with timing.phase(acc, cfg.out_dir, "stage1 (diffusion)"):
        DiffusionTrainer(cfg, acc).fit()
    acc.free_memory()
    if stage2:
        from .stage2 import run as run_stage2

        run_stage2(load_config(cfg_path, overrides), acc)
    acc.wait_for_everyone()
    if acc.is_main_process:
        print(f"\ndemo complete. Under {out}:\n"
              f"  stage0/autoencoder/           frozen AE (diffusers folder)\n"
              f"  stage1/checkpoint_best.pt     stage-1 diffusion checkpoint\n"
              f"  stage1/samples.png            decoded sample grid\n"
              f"  config.yaml                   the config of every stage\n"
              + ("  discriminator_iter_*/, checkpoints/, digits_metrics_iter_*.csv   stage 2 (spec layout)\n"
                 "  samples/digits_iter_*.png     decoded grid per stage-2 iteration" if stage2 else ""),
              flush=True)
    acc.end_training()
    return cfg_path


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="advdiff demo", description=__doc__)
    p.add_argument("--out", default="runs/digits", help="output folder (default runs/digits)")
    p.add_argument("--device", default="auto", choices=("auto", "cpu", "cuda"))
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="PATH=VALUE")
    p.add_argument("--no-stage2", action="store_true", help="stop after stage 1")
    args = p.parse_args(argv)
    from .cli_common import is_main_launch_rank
    from .config import parse_override

    try:
        run(Path(args.out), args.device, dict(parse_override(o) for o in args.overrides), not args.no_stage2)
    except UserError as e:
        if is_main_launch_rank():
            print(f"advdiff: error: {e}", file=sys.stderr)
        return e.exit_code
    return 0


if __name__ == "__main__":
    sys.exit(main())
