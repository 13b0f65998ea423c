"""The stage commands: `advdiff stage0|stage1|stage2` and `python -m trainer.stageN` (thin launchers:
parse, load and validate the config, build the Accelerator, run, always clean up)."""

from __future__ import annotations

import argparse

from trainer.cli.common import accelerator_for, run_main, stage_main, stage_parser
from trainer.cli.flags import STAGE2_FLAGS, add_flags
from trainer.config.sections import Config
from trainer.core.errors import UserError


def stage0_main(argv=None) -> int:
    from trainer.stage0.autoencoder_trainer import AutoencoderTrainer

    return stage_main(AutoencoderTrainer, "stage0", "Train the autoencoder (stage 0).", argv)


def stage1_main(argv=None) -> int:
    from trainer.stage1.diffusion_trainer import DiffusionTrainer

    return stage_main(DiffusionTrainer, "stage1", "Train the diffusion UNet on AE latents (stage 1).", argv)


def apply_arm(cfg: Config, weight: float | None, control: bool) -> None:
    """--adversarial_weight and --control. The control arm keeps everything else (data, seeds, steps,
    D training for its metrics) and only drops the adversarial term, in its own folder."""
    if weight is not None and (weight < 0 or weight != weight):
        raise UserError(f"--adversarial_weight: expected a number >= 0, got {weight}")
    if control:
        weight = 0.0
        cfg.experiment.save_path = str(cfg.out_dir) + "_control"
    if weight is not None:
        terms = [t for t in cfg.training.loss.losses if t.type == "DiscriminatorLoss"]
        if not terms:
            raise UserError("--adversarial_weight: training.loss has no DiscriminatorLoss term to weight")
        for t in terms:
            t.weight = weight


def build_stage2_parser(
    prog: str = "stage2",
    description: str = (
        "Fine-tune the stage-1 model (stage 2), iteration by iteration: generate fakes and encode reals,\n"
        "train a latent discriminator (discriminator.config.type latent; with unet_features, a feature\n"
        "head on the distribution-matching fake score trains during the fine-tune instead), then\n"
        "fine-tune the UNet with training.loss (MSELoss, DiscriminatorLoss, DistributionMatchingLoss)."
    ),
    **config_arg,
) -> argparse.ArgumentParser:
    """The stage-2 flag set; `advdiff validate` builds its parser from this one, so they cannot drift."""
    p = stage_parser(prog, description, **config_arg)
    add_flags(p, STAGE2_FLAGS)
    p.add_argument(
        "--control",
        action="store_true",
        help="the control arm: every DiscriminatorLoss weight 0 (the other training.loss terms kept), "
        "same data and steps, into <save_path>_control",
    )
    p.add_argument(
        "--start_iteration",
        type=int,
        default=None,
        metavar="K",
        help="start at iteration K; needs iteration K-1's checkpoint (default: continue where "
        "the last run stopped, from iteration 0)",
    )
    return p


def apply_stage2_args(cfg: Config, args) -> None:
    """The stage-2 flags that act on the loaded config rather than override a field (stage2 and validate)."""
    if args.start_iteration is not None and args.start_iteration < 0:
        raise UserError(f"--start_iteration: expected an integer >= 0, got {args.start_iteration}")
    apply_arm(cfg, args.adversarial_weight, args.control)


def stage2_main(argv=None) -> int:
    def body(cfg, args):
        apply_stage2_args(cfg, args)
        accelerator = accelerator_for(cfg, args)
        try:
            from trainer.stage2 import run

            run(cfg, accelerator, args.start_iteration, args.stop_after_steps)
        finally:
            accelerator.end_training()

    return run_main(build_stage2_parser(), argv, body)
