"""The embedded default, all under one output folder: digits data (and the digit classifier behind the
summary's cls_* columns) -> stage 0 (autoencoder) -> stage 1 (diffusion) -> sample grid -> stage 2:
distribution matching against the stage-1 teacher with a feature head on the fake score
(discriminator.config.type unet_features), 3 iterations for a 4-step DDIM sampler; then the same stage 2
at one step as a companion run (--out/one_step, its own report) and a picture comparing stage 1 and
both. It ends with the headline: the teacher (stage 1 at training.sample_steps, measured once like the
summaries' rows), stage 2 at its K and the one-step run, in latent and classifier FD and as a share of the
teacher's. Re-running resumes or skips finished work. `--conditional`: the same with the digit labels, a
class-conditional model (experiments/digits_conditional.yaml, docs/CONDITIONAL.md)."""

from __future__ import annotations

import sys
from pathlib import Path

from trainer.cli.common import is_main_launch_rank
from trainer.cli.flags import Parser, add_set_flag
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


ONE_STEP = RunLayout.COMPANION  # the companion run's folder under --out


def run_one_step(cfg_path: Path, overrides: dict | None, accelerator) -> dict:
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
    run_stage2(cfg1, accelerator)
    return result_weights(stage2_setup(cfg1, accelerator))


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
    accelerator = build_accelerator(device, cfg.training.resolved_mixed_precision())
    check_same_kind(out, cfg_path, default == CONDITIONAL_DEMO_CONFIG)
    prepare(out, accelerator.is_main_process, default)
    accelerator.wait_for_everyone()
    cfg = load_config(cfg_path, overrides)
    timings = RunLayout.of(cfg).timings
    with timing.phase(
        accelerator, timings, "classifier (metric features)"
    ):  # also for --no-stage2: config.yaml names it
        train_metric_classifier(cfg, accelerator.is_main_process)
    accelerator.wait_for_everyone()
    with timing.phase(accelerator, timings, "stage0 (autoencoder)"):
        AutoencoderTrainer(cfg, accelerator).fit()
    with timing.phase(accelerator, timings, "stage1 (diffusion)"):
        DiffusionTrainer(cfg, accelerator).fit()
    accelerator.free_memory()
    if stage2:
        run_stage2_with_comparison(cfg_path, overrides, accelerator)
    accelerator.wait_for_everyone()
    if accelerator.is_main_process:
        print_guide(out, cfg, stage2)
    accelerator.end_training()
    return cfg_path


def check_same_kind(out: Path, cfg_path: Path, conditional: bool) -> None:
    """Refuse an --out that holds the other kind of demo (plain or --conditional)."""
    if cfg_path.is_file() and bool(load_config(cfg_path).dataset.label_column) != conditional:
        kind = ("an unconditional", "--conditional") if conditional else ("the conditional", "the plain demo")
        raise UserError(f"--out {out}: holds {kind[0]} demo (config.yaml); give {kind[1]} its own --out")


def run_stage2_with_comparison(cfg_path: Path, overrides: dict | None, accelerator) -> None:
    """Stage 2 of the demo, then its teacher row (stage 1 at training.sample_steps, measured once); a
    few-step one also runs its one-step companion (K > 1), which gets the same teacher row before it
    starts, and writes the comparison picture; then the report again with all of it."""
    from trainer.cli.teacher import teacher_row
    from trainer.stage2 import refresh_report, write_comparison
    from trainer.stage2 import run as run_stage2
    from trainer.stage2 import setup as stage2_setup

    cfg2 = load_config(cfg_path, overrides)
    run_stage2(cfg2, accelerator)
    k, full = cfg2.stage2.generation_steps, cfg2.training.sample_steps
    # the companion's metric samples, seeds and held-out reals are this run's, so its teacher too
    companion = [cfg2.resolve_path(ONE_STEP)] if 1 < k < full else []
    teacher_row(cfg2, accelerator, full, also=companion)  # every rank: a collective
    one_step = run_one_step(cfg_path, overrides, accelerator) if companion else None
    s = stage2_setup(cfg2, accelerator)
    if k < full:  # few-step stage 2: show what it bought
        write_comparison(s, full, one_step)
    refresh_report(s)  # with the teacher row, the comparison and the companion


def print_guide(out: Path, cfg, stage2: bool) -> None:
    """The closing lines (main process): what the demo left under `out`, and where its page is."""
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
        print_headline(RunLayout.of(cfg))


def print_headline(layout: RunLayout) -> None:
    """The demo's last lines (main process): the teacher, stage 2 at K and the one-step run, from the
    folder's teacher row and summaries (quality/report_headline.py)."""
    from trainer.quality import headline_rows, headline_text

    print(
        "\nAgainst the teacher (Fréchet distances, lower is better; ÷ teacher below 1 beats it):\n"
        + headline_text(headline_rows(layout.root, layout.name)),
        flush=True,
    )


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
    add_set_flag(p)
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
