"""The embedded default: digits data (and the digit classifier behind the summary's cls_* columns) ->
stage 0 (autoencoder) -> stage 1 (diffusion) -> sample grid -> stage 2, all under one output folder.
Re-running resumes or skips finished work. `--conditional`: the same with the digit labels, a
class-conditional model (experiments/digits_conditional.yaml, docs/CONDITIONAL.md)."""

from __future__ import annotations

import sys
from pathlib import Path

from trainer.cli.common import is_main_launch_rank
from trainer.cli.flags import Parser
from trainer.config.load import CONDITIONAL_DEMO_CONFIG, DEMO_CONFIG, load_config, parse_override
from trainer.core.errors import UserError
from trainer.data.digits import build_digits
from trainer.files import atomic, timing
from trainer.files.layout import RunLayout
from trainer.parallel.accelerator import build_accelerator


def prepare(out: Path, is_main: bool, default: Path = DEMO_CONFIG) -> Path:
    """Write the data and config.yaml (a copy of `default`) under `out` (main process); returns the config
    path."""
    out.mkdir(parents=True, exist_ok=True)
    if is_main:
        build_digits(out / "data")
        cfg_path = out / "config.yaml"
        if not cfg_path.is_file():
            atomic.write_text(default.read_text(), cfg_path)
    return out / "config.yaml"


def train_metric_classifier(cfg, is_main: bool) -> None:
    """The classifier stage2.metric_features names (the demo's: classifier.pt beside config.yaml), trained
    on the main process unless it is there already."""
    from trainer.quality import parse_metric_features as parse
    from trainer.quality import train_classifier

    kind, path = parse(cfg.stage2.metric_features)
    if kind != "classifier" or not is_main:
        return
    full = cfg.resolve_path(path)
    if full.is_file():
        print(f"classifier: {full} already there; skipping", flush=True)
        return
    train_classifier(cfg, full, log=lambda line: print(line, flush=True))


ONE_STEP = "one_step"  # the companion run's folder under --out


def run_one_step(cfg_path: Path, overrides: dict | None, acc) -> dict:
    """The demo's stage 2 again at K = 1 (rollouts of one step, from t = T-1), in its own run folder
    (--out/one_step: its own summary, grids and report); returns its result's EMA weights, which the
    comparison picture shows at one step."""
    from trainer.stage2 import result_weights
    from trainer.stage2 import run as run_stage2
    from trainer.stage2 import setup as stage2_setup

    one = {
        **(overrides or {}),
        "stage2.generation_steps": 1,
        "stage2.rollout_grad_steps": 1,
        "experiment.save_path": ONE_STEP,
    }
    cfg1 = load_config(cfg_path, one)
    run_stage2(cfg1, acc)
    return result_weights(stage2_setup(cfg1, acc))


def run(
    out: Path,
    device: str = "auto",
    overrides: dict | None = None,
    stage2: bool = True,
    default: Path = DEMO_CONFIG,
) -> Path:
    """The demo under `out` from the embedded config `default` (the conditional one for --conditional)."""
    from trainer.stage0.autoencoder_trainer import AutoencoderTrainer
    from trainer.stage1.diffusion_trainer import DiffusionTrainer

    if out.exists() and not out.is_dir():
        raise UserError(f"--out {out}: exists and is not a folder")
    cfg_path = out / "config.yaml"
    cfg = load_config(default, overrides)  # validates before any compute
    acc = build_accelerator(device, cfg.training.resolved_mixed_precision())
    conditional = default == CONDITIONAL_DEMO_CONFIG
    if (out / "config.yaml").is_file() and bool(load_config(cfg_path).dataset.label_column) != conditional:
        kind = ("an unconditional", "--conditional") if conditional else ("the conditional", "the plain demo")
        raise UserError(f"--out {out}: holds {kind[0]} demo (config.yaml); give {kind[1]} its own --out")
    prepare(out, acc.is_main_process, default)
    acc.wait_for_everyone()
    cfg = load_config(cfg_path, overrides)
    timings = RunLayout.of(cfg).timings
    with timing.phase(
        acc, timings, "classifier (metric features)"
    ):  # also for --no-stage2: config.yaml names it
        train_metric_classifier(cfg, acc.is_main_process)
    acc.wait_for_everyone()
    with timing.phase(acc, timings, "stage0 (autoencoder)"):
        AutoencoderTrainer(cfg, acc).fit()
    with timing.phase(acc, timings, "stage1 (diffusion)"):
        DiffusionTrainer(cfg, acc).fit()
    acc.free_memory()
    if stage2:
        from trainer.stage2 import run as run_stage2

        cfg2 = load_config(cfg_path, overrides)
        run_stage2(cfg2, acc)
        if cfg2.stage2.generation_steps < cfg2.training.sample_steps:  # few-step stage 2: show what it bought
            from trainer.stage2 import refresh_report, write_comparison
            from trainer.stage2 import setup as stage2_setup

            one_step = None
            if cfg2.stage2.generation_steps > 1:  # and the same recipe at one step, as a companion run
                one_step = run_one_step(cfg_path, overrides, acc)
            s = stage2_setup(cfg2, acc)
            write_comparison(s, cfg2.training.sample_steps, one_step)
            refresh_report(s)  # with the comparison
    acc.wait_for_everyone()
    if acc.is_main_process:
        rows = RunLayout.of(cfg).guide(stage2)
        width = max(len(path) for path, _ in rows) + 2
        print(
            f"\ndemo complete. Under {out}:\n" + "\n".join(f"  {path:<{width}}{what}" for path, what in rows),
            flush=True,
        )
        if stage2:
            print(
                f"\nOne page with the grids, quality per iteration, histories, time and config:\n"
                f"  {RunLayout.of(cfg).report}",
                flush=True,
            )
            if (out / ONE_STEP).is_dir():
                print(f"The same stage 2 at one step, with its own page:\n  {out / ONE_STEP}", flush=True)
    acc.end_training()
    return cfg_path


def digits_main(argv=None) -> int:
    p = Parser(
        prog="advdiff digits", description="Write scikit-learn's digits as 32x32 PNGs with manifest.csv."
    )
    p.add_argument("out", help="folder to write images/ and manifest.csv into")
    args = p.parse_args(argv)
    try:
        print(build_digits(args.out))
    except UserError as e:
        print(f"advdiff: error: {e}", file=sys.stderr)
        return 2
    return 0


def main(argv=None) -> int:
    p = Parser(prog="advdiff demo", description=__doc__)
    p.add_argument("--out", default="runs/digits", metavar="DIR", help="output folder")
    p.add_argument(
        "--device",
        default="auto",
        choices=("auto", "cpu", "cuda"),
        help="cuda, cpu, or auto (cuda when visible)",
    )
    p.add_argument(
        "--set",
        dest="overrides",
        action="append",
        default=[],
        metavar="PATH=VALUE",
        help="override any config field of the embedded default (repeatable)",
    )
    p.add_argument("--no-stage2", action="store_true", help="stop after stage 1")
    p.add_argument(
        "--conditional",
        action="store_true",
        help="the class-conditional twin: the digit labels, a class-conditional UNet and a projection "
        "head (experiments/digits_conditional.yaml); give it its own --out",
    )
    args = p.parse_args(argv)
    default = CONDITIONAL_DEMO_CONFIG if args.conditional else DEMO_CONFIG
    overrides = dict(parse_override(o) for o in args.overrides)
    try:
        run(Path(args.out), args.device, overrides, not args.no_stage2, default)
    except UserError as e:
        if is_main_launch_rank():
            print(f"advdiff: error: {e}", file=sys.stderr)
        return e.exit_code
    return 0


if __name__ == "__main__":
    sys.exit(main())
