"""`advdiff validate`: every stage-2 check, before any compute; lists every problem (exit 2)."""
from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

from trainer.cli.common import add_config_args, load_from_args
from trainer.cli.flags import add_stage2_flags, flag_overrides
from trainer.config.load import DEMO_CONFIG, load_config, parse_override
from trainer.core.errors import UserError
from trainer.stage2.checks import check_stage2


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="advdiff validate",
                                description="Check a stage-2 config, its files and flags before any compute.")
    p.add_argument("config", nargs="?", help="experiment YAML (omit with --demo)")
    add_config_args(p)
    p.add_argument("--stage", default="2", choices=("2", "all"),
                   help="2: every stage-2 input must exist (default); all: stages 0 and 1 of the same "
                        "pipeline may still have to write the AE and the stage-1 checkpoint")
    p.add_argument("--demo", action="store_true", help="validate the embedded default as `advdiff demo` runs it")
    p.add_argument("--out", default="runs/digits", help="with --demo: the demo's output folder")
    add_stage2_flags(p)
    return p


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    t0 = time.time()
    try:
        if args.demo:
            out = Path(args.out)
            if out.exists() and not out.is_dir():
                raise UserError(f"--out {out}: exists and is not a folder")
            overrides = dict(parse_override(o) for o in args.overrides)
            overrides.update(flag_overrides(args))
            existing = out / "config.yaml"
            cfg = load_config(existing if existing.is_file() else DEMO_CONFIG, overrides)
            cfg.source = str(existing.resolve())  # relative paths resolve inside the demo's folder
            pipeline, name = True, f"the embedded default (under {out})"
        else:
            if args.config is None:
                raise UserError("validate: expected a CONFIG path, or --demo")
            cfg = load_from_args(args, flag_overrides(args))
            if args.dry_run:
                return 0
            pipeline, name = args.stage == "all", args.config
        facts = check_stage2(cfg, collect=True, pipeline=pipeline)
    except UserError as e:
        print(f"advdiff: error: {e}", file=sys.stderr)
        return e.exit_code
    for line in facts.problems:
        print(f"advdiff: error: {line}", file=sys.stderr)
    if facts.problems:
        print(f"advdiff validate: {len(facts.problems)} problem(s) in {name}", file=sys.stderr)
        return 2
    rows = "" if facts.rows is None else f", {len(facts.rows)} manifest rows"
    print(f"advdiff validate: {name} is ready for stage 2 (latents {facts.latent_shape}{rows}; "
          f"checked in {time.time() - t0:.1f} s)")
    return 0
