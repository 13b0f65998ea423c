"""Shared command-line plumbing: config loading with overrides, one-line errors, exit codes."""

from __future__ import annotations

import argparse
import os
import sys
import warnings

from trainer.cli.flags import CONFIG_FLAGS, Parser, add_flags, add_set_flag, flag_overrides
from trainer.config.load import dump_config, load_config, parse_override
from trainer.core.errors import UserError
from trainer.parallel import preempt
from trainer.parallel.accelerator import apply_performance, build_accelerator, flat_config, set_deterministic


def add_config_args(p: argparse.ArgumentParser) -> None:
    """The arguments that shape the config (shared by the stage commands and `advdiff validate`)."""
    add_flags(p, CONFIG_FLAGS)
    add_set_flag(p)
    p.add_argument("--dry-run", "--dry_run", action="store_true", help="print the resolved config and exit")


def stage_parser(
    prog: str, description: str, config_nargs=None, config_help: str = "experiment YAML"
) -> argparse.ArgumentParser:
    p = Parser(prog=f"advdiff {prog}", description=description)
    p.add_argument("config", nargs=config_nargs, help=config_help)
    p.add_argument(
        "--device",
        default="auto",
        choices=("auto", "cpu", "cuda"),
        help="cuda, cpu, or auto (cuda when visible)",
    )
    add_config_args(p)
    add_flags(p, ["output_dir"])
    p.add_argument(
        "--stop_after_steps",
        type=int,
        default=None,
        metavar="N",
        help="stop after N steps in this call, leaving a resume state (time-boxed jobs)",
    )
    p.add_argument(
        "--report_to",
        "--report-to",
        default=None,
        metavar="TRACKERS",
        help="log every CSV metric (and sample grids) through accelerate's trackers: a comma list "
        "(tensorboard, wandb, comet_ml, mlflow, aim, clearml, dvclive, ...) or all (every "
        "installed one); local logs under <save_path>/tracking",
    )
    return p


def is_main_launch_rank() -> bool:
    return os.environ.get("RANK", os.environ.get("LOCAL_RANK", "0")) == "0"


def config_overrides(args) -> dict:
    """{config path: value} of --set, then of the table's flags that were given (trainer.cli.flags)."""
    overrides = dict(parse_override(o) for o in args.overrides)
    overrides.update(flag_overrides(args))
    return overrides


def load_from_args(args):
    overrides = config_overrides(args)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        cfg = load_config(args.config, overrides)
    if is_main_launch_rank():
        for w in caught:
            print(f"advdiff: warning: {w.message}", file=sys.stderr)
    if args.dry_run:
        print(dump_config(cfg), end="")
    return cfg


def run_main(parser, argv, body) -> int:
    """Parse, load the config, run `body(cfg, args)`; user errors become one line and exit 2."""
    args = parser.parse_args(argv)

    def call():
        try:
            cfg = load_from_args(args)
            if args.dry_run:
                return 0
            preempt.install()
            preempt.set_marker_dir(cfg.out_dir)
            body(cfg, args)
        except preempt.Preempted as e:
            if is_main_launch_rank():
                print(
                    f"advdiff: preempted ({e}); resume state written; rerun the same command to continue "
                    f"(exit {preempt.REQUEUE_EXIT_CODE})",
                    file=sys.stderr,
                )
            return preempt.REQUEUE_EXIT_CODE
        return 0

    return one_line_errors(call)


def one_line_errors(call) -> int:
    """Run `call()` (returning an exit code or None); a UserError becomes one line on stderr (main rank) and
    its exit code, Ctrl-C exit 130: never a traceback."""
    try:
        return call() or 0
    except UserError as e:
        if is_main_launch_rank():
            print(f"advdiff: error: {e}", file=sys.stderr)
        return e.exit_code
    except KeyboardInterrupt:
        print("advdiff: interrupted", file=sys.stderr)
        return 130


def accelerator_for(cfg, args):
    set_deterministic(cfg.training.deterministic)
    apply_performance(cfg.performance)
    return build_accelerator(
        args.device,
        cfg.training.resolved_mixed_precision(),
        report_to=args.report_to,
        project_dir=cfg.out_dir / "tracking",
        run_name=cfg.experiment.name,
        config=flat_config(cfg) if args.report_to else None,
    )


def stage_main(trainer_cls, name: str, description: str, argv=None) -> int:
    """The whole entry point of a stage: parse, validate, train (resuming if possible), clean up."""

    def body(cfg, args):
        accelerator = accelerator_for(cfg, args)
        try:
            trainer = trainer_cls(cfg, accelerator)
            trainer.stop_after = args.stop_after_steps
            trainer.fit()
        finally:
            accelerator.end_training()

    return run_main(stage_parser(name, description), argv, body)
