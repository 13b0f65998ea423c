"""`advdiff export SOURCE OUT`: a diffusion model as a diffusers pipeline folder (unet/ in safetensors,
scheduler/, vae/ with scaling_factor and shift_factor, model_index.json, pipeline.py).

SOURCE is a checkpoint (.pt), a diffusers UNet/pipeline folder, or a run folder (experiment.save_path): there
it is the last stage-2 iteration's checkpoint (--iteration K for another; --tag best|latest, default the run's
stage2.continue_from), else stage 1's. Stage 2 also writes <save_path>/pipeline at the end of every run and
stage 1 <save_path>/stage1/pipeline, so this command is for other checkpoints and for moved AEs.

    DiffusionPipeline.from_pretrained(OUT, trust_remote_code=True)(batch_size=8).images

A class-conditional model's folder records its classes (model_index.json `conditioning`) and samples one
class per image: `pipe(class_labels=[0, 0, 3], guidance_scale=2.0)`.
"""

from __future__ import annotations

import json
from pathlib import Path

from trainer.cli.common import one_line_errors
from trainer.cli.flags import Parser, add_flags
from trainer.core.errors import UserError
from trainer.files.layout import RunLayout


def build_parser() -> Parser:
    p = Parser(prog="advdiff export", description=__doc__)
    p.add_argument("source", help="checkpoint .pt, diffusers folder, or run folder")
    p.add_argument("out", help="pipeline folder to write (replaced whole if it exists)")
    p.add_argument(
        "--iteration",
        type=int,
        default=None,
        metavar="K",
        help="run folder: stage-2 iteration K (default: the last one with a checkpoint)",
    )
    p.add_argument(
        "--tag",
        default=None,
        choices=("best", "latest"),
        help="run folder: which checkpoint (default: the run's stage2.continue_from, else best)",
    )
    p.add_argument(
        "--ae",
        default=None,
        metavar="PATH",
        help="autoencoder to ship as vae/ (default: the one the checkpoint names)",
    )
    p.add_argument(
        "--no_vae", action="store_true", help="write no vae/ (the pipeline then returns latents only)"
    )
    p.add_argument(
        "--steps",
        type=int,
        default=None,
        metavar="N",
        help="the pipeline's default DDIM steps (default: the steps the model was trained for)",
    )
    p.add_argument("--eta", type=float, default=None, metavar="X", help="the pipeline's default DDIM eta")
    add_flags(p, ["timestep_spacing"])
    p.add_argument("--raw", action="store_true", help="export the raw weights instead of the EMA weights")
    return p


def _run_tag(root: Path) -> str:
    """The run's stage2.continue_from, from its run record (best where unknown)."""
    try:
        fields = json.loads(RunLayout(root, "").run_record.read_text())
    except (OSError, ValueError):
        return "best"
    fields = fields.get("fields", fields) if isinstance(fields, dict) else {}
    tag = fields.get("stage2.continue_from") if isinstance(fields, dict) else None
    return tag if tag in ("best", "latest") else "best"


def resolve_source(source: Path, iteration: int | None, tag: str | None) -> Path:
    """A run folder -> the checkpoint to export; anything else is returned as is."""
    if not source.is_dir() or (source / "config.json").is_file() or (source / "model_index.json").is_file():
        if iteration is not None:
            raise UserError(f"--iteration: only for a run folder; {source} is a checkpoint")
        return source
    tag = tag or _run_tag(source)
    layout = RunLayout(source, "")
    found = layout.found_diffusion_checkpoints(tag)
    if iteration is not None:
        if iteration not in found:
            raise UserError(
                f"--iteration {iteration}: no {tag} checkpoint of that iteration under "
                f"{layout.checkpoint_folder} (found: {', '.join(map(str, sorted(found))) or 'none'})"
            )
        return found[iteration]
    if found:
        return found[max(found)]
    stage1 = layout.stage1_checkpoint(tag)
    if stage1.is_file():
        return stage1
    raise UserError(f"{source}: no stage-2 or stage-1 {tag} checkpoint in this folder (is it a run folder?)")


def export(args) -> None:
    from trainer.diffusion.checkpoints import load_diffusion_checkpoint
    from trainer.diffusion.export import export_pipeline

    if args.steps is not None and args.steps < 1:
        raise UserError(f"--steps: expected an integer >= 1, got {args.steps}")
    if args.eta is not None and not 0 <= args.eta <= 1:
        raise UserError(f"--eta: expected a number in [0, 1], got {args.eta}")
    source = resolve_source(Path(args.source), args.iteration, args.tag)
    out = Path(args.out)
    if out.exists() and not out.is_dir():
        raise UserError(f"{out}: exists and is not a folder")
    if out.resolve() == source.resolve() or source.resolve() in out.resolve().parents:
        raise UserError(f"{out}: would overwrite the source {source}; choose another folder")
    ckpt = load_diffusion_checkpoint(source, use_ema=not args.raw)
    ae = None
    if not args.no_vae:
        ae = Path(args.ae) if args.ae else (Path(ckpt.autoencoder) if ckpt.autoencoder else None)
        if ae is not None and not ae.exists():
            raise UserError(
                f"{'--ae' if args.ae else 'the checkpoint names the autoencoder'} {ae}: not found "
                f"(pass --ae PATH, or --no_vae)"
            )
    if args.steps is not None and args.steps > int(ckpt.scheduler["num_train_timesteps"]):
        raise UserError(
            f"--steps: at most {ckpt.scheduler['num_train_timesteps']} (the model's schedule), "
            f"got {args.steps}"
        )
    written = export_pipeline(
        ckpt, out, autoencoder=ae, steps=args.steps, eta=args.eta, timestep_spacing=args.timestep_spacing
    )
    vae = f"vae/ from {ae}" if ae is not None else "no vae/"
    c = ckpt.conditioning
    if c is not None:  # a class-conditional model
        vae += f"; {c.num_classes} classes{' and a null class' if c.null_class is not None else ''}"
    print(
        f"advdiff export: {source} -> {written} (unet/, scheduler/, {vae}); open with "
        f"DiffusionPipeline.from_pretrained('{written}', trust_remote_code=True)"
    )


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    return one_line_errors(lambda: export(args))
