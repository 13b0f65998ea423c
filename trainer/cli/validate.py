"""`advdiff validate`: every stage-2 check, before any compute; lists every problem (exit 2)."""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

from trainer.cli.common import config_overrides, load_from_args
from trainer.cli.stages import apply_stage2_args, build_stage2_parser
from trainer.config.load import DEMO_CONFIG, load_config
from trainer.core.errors import UserError
from trainer.stage2 import check_stage2


def build_parser() -> argparse.ArgumentParser:
    """`advdiff stage2`'s parser (every stage-2 flag, so a stage-2 command line validates as it is) plus
    validate's own --stage, --demo and --out. --device, --report_to and --stop_after_steps are accepted and
    not checked: they concern the machine and the call that run stage 2 (often not this login node)."""
    p = build_stage2_parser(
        "validate",
        "Check a stage-2 config, its files and flags before any compute.",
        config_nargs="?",
        config_help="experiment YAML (omit with --demo)",
    )
    p.add_argument(
        "--stage",
        default="2",
        choices=("2", "all"),
        help="2: every stage-2 input must exist (default); all: stages 0 and 1 of the same "
        "pipeline may still have to write the AE and the stage-1 checkpoint",
    )
    p.add_argument(
        "--demo", action="store_true", help="validate the embedded default as `advdiff demo` runs it"
    )
    p.add_argument(
        "--out", default="runs/digits", metavar="DIR", help="with --demo: the demo's output folder"
    )
    return p


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    t0 = time.time()
    try:
        if args.demo:
            out = Path(args.out)
            if out.exists() and not out.is_dir():
                raise UserError(f"--out {out}: exists and is not a folder")
            if args.output_dir is not None:
                raise UserError("--output_dir: not with --demo (the demo's folder is --out)")
            overrides = config_overrides(args)
            existing = out / "config.yaml"
            cfg = load_config(existing if existing.is_file() else DEMO_CONFIG, overrides)
            cfg.source = str(existing.resolve())  # relative paths resolve inside the demo's folder
            pipeline, name = True, f"the embedded default (under {out})"
        else:
            if args.config is None:
                raise UserError("validate: expected a CONFIG path, or --demo")
            cfg = load_from_args(args)
            if args.dry_run:
                return 0
            pipeline, name = args.stage == "all", args.config
        apply_stage2_args(cfg, args)
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
    print(
        f"advdiff validate: {name} is ready for stage 2 (latents {facts.latent_shape}{rows}; "
        f"checked in {time.time() - t0:.1f} s)"
    )
    return 0
