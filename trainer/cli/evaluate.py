"""`advdiff evaluate CONFIG`: the quality row of the stage-2 summary for any diffusion checkpoint, optionally
sampled with discriminator guidance, without training or writing into the run.

    advdiff evaluate CONFIG [--checkpoint PATH] [--generation_steps K] [--timestep_spacing S] [--seed S]
                     [--set PATH=VALUE ...]
                     [--discriminator D.pt --guidance_weight W --guidance_t_min F --guidance_t_max F]
                     [--json OUT.json]

The row is measured exactly as the summary's rows are (quality/evaluation.py): stage2.metric_samples samples
from the same fixed seeds, at stage2.generation_steps, against the same held-out reals, in every feature
space the config names (latent, pixel, stage2.metric_features). Default checkpoint: the config's stage-1
model. The DDIM timesteps are spaced as the measured checkpoint's scheduler config says, unless
--timestep_spacing (scheduler.timestep_spacing) overrides it; the row names the spacing used. With
--discriminator the sampler's UNet output is corrected at each DDIM step by w * grad log(D / (1 - D))
(trainer/diffusion/guidance.py); that is how discriminator guidance is measured against fine-tuning.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
from pathlib import Path

from trainer.cli.common import add_config_args, run_main
from trainer.cli.flags import Parser, add_flags
from trainer.cli.sample import discriminator_guidance
from trainer.core.errors import UserError
from trainer.diffusion.guidance import DEFAULT_T_MIN, INPUTS, Guidance


def parser() -> argparse.ArgumentParser:
    p = Parser(prog="advdiff evaluate", description=__doc__)
    p.add_argument("config", help="experiment YAML (a stage-2 config: data, AE, metrics)")
    p.add_argument(
        "--checkpoint",
        default=None,
        help="diffusion checkpoint to measure (default: the config's stage-1 checkpoint)",
    )
    add_flags(p, ["generation_steps", "timestep_spacing"])
    p.add_argument(
        "--device",
        default="auto",
        choices=("auto", "cpu", "cuda"),
        help="cuda, cpu, or auto (cuda when visible)",
    )
    p.add_argument("--json", default=None, metavar="OUT", help="also write the row as JSON (atomically)")
    add_config_args(p)
    g = p.add_argument_group("discriminator guidance")
    g.add_argument("--discriminator", default=None, metavar="D.pt", help="a stage-2 discriminator export")
    g.add_argument("--guidance_weight", type=float, default=1.0, help="w")
    g.add_argument("--guidance_t_min", type=float, default=DEFAULT_T_MIN, help="off for t < this x T")
    g.add_argument("--guidance_t_max", type=float, default=1.0, help="off for t > this x T")
    g.add_argument("--guidance_input", default="x_t", choices=INPUTS, help="what D sees (see advdiff sample)")
    return p


def evaluate_main(argv=None) -> int:
    return run_main(parser(), argv, body)


def body(cfg, args) -> None:
    from trainer.diffusion.schedule import Schedule
    from trainer.files import atomic
    from trainer.parallel.accelerator import build_accelerator
    from trainer.stage2 import setup

    check_guidance_args(args)
    accelerator = build_accelerator(args.device, cfg.training.resolved_mixed_precision())
    # the input checks of stage 2, before any compute; writes nothing
    s = setup(cfg, accelerator, read_only=True)
    path, ckpt = measured_checkpoint(s, args)
    unet = ckpt.unet.to(accelerator.device).eval()
    guided = guidance_of(s, args, accelerator.device)
    evaluator = s.evaluator()
    evaluator.guidance = guided
    # sampled as the measured checkpoint says (a stage-2 one records its run's spacing), or as
    # scheduler.timestep_spacing / --timestep_spacing overrides
    evaluator.schedule = Schedule.from_dict(ckpt.scheduler).with_spacing(cfg.scheduler.timestep_spacing)
    row = evaluator.measure(0, unet, None)
    row.pop("iteration", None)
    row.update(
        checkpoint=str(path),
        generation_steps=cfg.stage2.generation_steps,
        timestep_spacing=evaluator.schedule.timestep_spacing,
        guidance=guidance_record(args, guided),
    )
    if accelerator.is_main_process:
        text = json.dumps(row, indent=1, default=str)
        print(text)
        if args.json:
            atomic.write_text(text + "\n", Path(args.json))


def check_guidance_args(args) -> None:
    """The guidance flags' ranges, before anything is loaded."""
    if not math.isfinite(args.guidance_weight):
        raise UserError(f"--guidance_weight: expected a finite number, got {args.guidance_weight}")
    if not 0 <= args.guidance_t_min <= args.guidance_t_max <= 1:
        raise UserError(
            f"--guidance_t_min, --guidance_t_max: expected 0 <= t_min <= t_max <= 1, got "
            f"{args.guidance_t_min}, {args.guidance_t_max}"
        )


def measured_checkpoint(s, args):
    """(path, checkpoint) to measure: --checkpoint, else the config's stage-1 model; it must have the
    stage-1 model's UNet."""
    from trainer.diffusion.checkpoints import load_diffusion_checkpoint

    path = Path(args.checkpoint) if args.checkpoint else s.stage1.path
    if not path.exists():
        raise UserError(f"--checkpoint: {path}: not found")
    ckpt = load_diffusion_checkpoint(path, fallback_scheduler=s.stage1.scheduler, scaling=s.stage1.scaling)
    if ckpt.unet_config != s.stage1.unet_config:
        raise UserError(
            f"--checkpoint: {path}: its UNet differs from the config's stage-1 model "
            f"({s.stage1.path}); evaluate it with the config it was trained with"
        )
    return path, ckpt


def guidance_of(s, args, device) -> Guidance | None:
    """The discriminator guidance --discriminator asks for (unconditional models only), or None."""
    if args.discriminator is not None and s.labels is not None:
        raise UserError(
            f"--discriminator: discriminator guidance is for unconditional models; {s.stage1.path} is "
            "class-conditional (stage2.guidance_scale sets its classifier-free guidance)"
        )
    return discriminator_guidance(args, s.latent_shape, device)


def guidance_record(args, guided: Guidance | None) -> dict | None:
    """The row's `guidance` field: what guided the samples, or None."""
    if guided is None:
        return None
    return {
        "discriminator": str(args.discriminator),
        "weight": guided.weight,
        "t_min": guided.t_min,
        "t_max": guided.t_max,
        "input": guided.input,
    }


def main(argv=None) -> int:
    return evaluate_main(argv)


if __name__ == "__main__":
    sys.exit(main())
