"""`advdiff sample CHECKPOINT --out PREFIX`: DDIM samples of a diffusion checkpoint, optionally with
discriminator guidance; writes PREFIX.pt (model-space latents) and, with an autoencoder, PREFIX.png. The
DDIM timesteps are spaced as the checkpoint's scheduler config says unless --timestep_spacing overrides it.
A class-conditional model samples the classes --class_labels names (default: each class in turn), under
classifier-free guidance at --guidance_scale, and also writes PREFIX.labels.pt (each sample's class index)."""

from __future__ import annotations

import argparse
import math
import sys
from pathlib import Path

import torch

from trainer.cli.common import one_line_errors
from trainer.cli.flags import Parser, add_flags
from trainer.core.errors import UserError
from trainer.diffusion.guidance import DEFAULT_T_MIN, INPUTS, Guidance

GRID_MAX = 64  # the PNG shows the first 64 samples


def parser() -> argparse.ArgumentParser:
    p = Parser(prog="advdiff sample", description=__doc__)
    p.add_argument("checkpoint", help="a stage-1 or stage-2 diffusion checkpoint (.pt)")
    p.add_argument(
        "--out",
        required=True,
        metavar="PREFIX",
        help=f"writes PREFIX.pt (all samples) and PREFIX.png (a grid of the first {GRID_MAX})",
    )
    p.add_argument("--num", type=int, default=64, help="number of samples")
    p.add_argument("--steps", type=int, default=50, help="DDIM steps")
    add_flags(p, ["timestep_spacing"])
    p.add_argument("--seed", type=int, default=0, help="sample i's noise depends only on (seed, i)")
    p.add_argument("--eta", type=float, default=0.0, help="DDIM eta (0: deterministic)")
    p.add_argument("--batch_size", type=int, default=64, help="samples per UNet forward pass")
    p.add_argument(
        "--device",
        default="auto",
        choices=("auto", "cpu", "cuda"),
        help="cuda, cpu, or auto (cuda when visible)",
    )
    p.add_argument("--raw", action="store_true", help="the raw weights instead of the EMA ones")
    p.add_argument(
        "--ae",
        default=None,
        metavar="PATH",
        help="autoencoder for the PNG grid (default: the one the checkpoint names)",
    )
    p.add_argument("--no_grid", action="store_true", help="latents only, no decoded grid")
    p.add_argument("--nrow", type=int, default=8, help="grid columns")
    add_class_arguments(p)
    add_guidance_arguments(p)
    return p


def add_class_arguments(p) -> None:
    """The class-conditional flags (classifier-free guidance)."""
    c = p.add_argument_group("class-conditional models (classifier-free guidance)")
    c.add_argument(
        "--class_labels",
        default=None,
        metavar="LABELS",
        help="the classes to sample: a comma list of class names or indices 0..C-1 that sample i takes in "
        "turn (i mod the list's length; '3' alone: every sample a 3), or 'all' (the default: 0..C-1 in turn)",
    )
    c.add_argument(
        "--guidance_scale",
        type=float,
        default=None,
        metavar="W",
        help="classifier-free guidance: null + W x (class - null) on the UNet's output (default 1: the "
        "class's own output, no guidance); other scales need a model trained with a null class",
    )


def add_guidance_arguments(p) -> None:
    """The discriminator-guidance flags (unconditional models)."""
    g = p.add_argument_group("discriminator guidance (Kim et al., 2022), unconditional models")
    g.add_argument(
        "--discriminator",
        default=None,
        metavar="D.pt",
        help="a stage-2 discriminator export; guidance is on when given",
    )
    g.add_argument("--guidance_weight", type=float, default=None, help="w (default 1)")
    g.add_argument(
        "--guidance_t_min", type=float, default=None, help=f"off for t < this x T (default {DEFAULT_T_MIN})"
    )
    g.add_argument("--guidance_t_max", type=float, default=None, help="off for t > this x T (default 1)")
    g.add_argument(
        "--guidance_input",
        default=None,
        choices=INPUTS,
        help="what D sees: the noisy latent (x_t, the paper's) or the model's clean prediction "
        "(x0_pred: what stage 2's noise-conditioned D was trained on)",
    )


GUIDANCE_DEFAULTS = {
    "guidance_weight": 1.0,
    "guidance_t_min": DEFAULT_T_MIN,
    "guidance_t_max": 1.0,
    "guidance_input": "x_t",
}


def check_args(args) -> None:
    given = [f"--{k}" for k in GUIDANCE_DEFAULTS if getattr(args, k) is not None]
    if given and args.discriminator is None:
        raise UserError(f"{', '.join(given)}: given without --discriminator (guidance needs a discriminator)")
    for k, v in GUIDANCE_DEFAULTS.items():
        if getattr(args, k) is None:
            setattr(args, k, v)
    for name in ("num", "steps", "batch_size", "nrow"):
        if getattr(args, name) < 1:
            raise UserError(f"--{name}: expected at least 1, got {getattr(args, name)}")
    if not (math.isfinite(args.eta) and args.eta >= 0):
        raise UserError(f"--eta: expected a number >= 0, got {args.eta}")
    if args.discriminator is not None:
        if not math.isfinite(args.guidance_weight):
            raise UserError(f"--guidance_weight: expected a finite number, got {args.guidance_weight}")
        if not 0 <= args.guidance_t_min <= args.guidance_t_max <= 1:
            raise UserError(
                f"--guidance_t_min, --guidance_t_max: expected 0 <= t_min <= t_max <= 1, got "
                f"{args.guidance_t_min}, {args.guidance_t_max}"
            )


def resolve_class_labels(args, ckpt) -> tuple[torch.Tensor | None, float]:
    """(each sample's class index, the guidance scale) for a class-conditional checkpoint, (None, 1) for an
    unconditional one; flags that do not fit the model are one line."""
    cond = ckpt.conditioning
    if cond is None:
        for flag in ("class_labels", "guidance_scale"):
            if getattr(args, flag) is not None:
                raise UserError(
                    f"--{flag}: {ckpt.path} is an unconditional model; --{flag} is for class-conditional ones"
                )
        return None, 1.0
    if args.discriminator is not None:
        raise UserError(
            f"--discriminator: {ckpt.path} is class-conditional; discriminator guidance is for unconditional "
            f"models (classifier-free guidance: --guidance_scale)"
        )
    scale = 1.0 if args.guidance_scale is None else float(args.guidance_scale)
    if not math.isfinite(scale):
        raise UserError(f"--guidance_scale: expected a finite number, got {scale}")
    if scale != 1.0 and cond.null_class is None:
        raise UserError(
            f"--guidance_scale: {ckpt.path} has no null class (no advdiff class record), so guidance is off: "
            f"expected 1, got {scale}"
        )
    if scale != 1.0 and not cond.guidable():
        print(
            f"advdiff: warning: {ckpt.path} was trained without label dropout: its null class is untrained, "
            f"so guidance at {scale} is not classifier-free guidance",
            file=sys.stderr,
        )
    names, text = list(cond.class_names), (args.class_labels or "all").strip()
    if text == "all":
        chosen = list(range(cond.num_classes))
    else:
        chosen = []
        for token in (t.strip() for t in text.split(",")):
            if token in names:
                chosen.append(names.index(token))
            elif token.isdecimal() and int(token) < cond.num_classes:
                chosen.append(int(token))
            else:
                shown = ", ".join(names[:12]) + (", ..." if len(names) > 12 else "")
                raise UserError(
                    f"--class_labels: {token!r} is neither a class name nor an index 0.."
                    f"{cond.num_classes - 1} of the model's {cond.num_classes} classes ({shown}), nor 'all'"
                )
    return torch.tensor([chosen[i % len(chosen)] for i in range(args.num)], dtype=torch.long), scale


def load_guidance_discriminator(path: Path, latent_shape: tuple, guidance_input: str):
    """A stage-2 D export, checked against the latents and the guidance mode; errors are one line."""
    from models.discriminator import build_discriminator
    from trainer.files.read import torch_load
    from trainer.stage2 import D_FORMAT

    if not path.is_file():
        raise UserError(f"--discriminator: {path}: not found")
    blob = torch_load(path, "discriminator")
    if (
        not isinstance(blob, dict)
        or blob.get("format") != D_FORMAT
        or not isinstance(blob.get("config"), dict)
    ):
        raise UserError(f"--discriminator: {path}: not an advdiff discriminator (format {D_FORMAT})")
    config = blob["config"]
    channels, side = latent_shape[0], latent_shape[1]
    if config.get("latent_channels") != channels:
        raise UserError(
            f"--discriminator: {path}: D takes {config.get('latent_channels')}-channel latents, the "
            f"checkpoint's UNet makes {channels}-channel ones"
        )
    if side < 2 ** int(config.get("num_layers", 0)):
        raise UserError(
            f"--discriminator: {path}: D's {config.get('num_layers')} stride-2 levels need latents of "
            f"side >= {2 ** int(config['num_layers'])}, the checkpoint's are {side}x{side}"
        )
    if guidance_input == "x_t" and not config.get("noise_conditioned", False):
        raise UserError(
            f"--discriminator: {path}: D is not noise_conditioned; guidance on x_t needs D(x_t, t) "
            f"(use --guidance_input x0_pred for a D trained on clean latents)"
        )
    try:
        d = build_discriminator(config)
        d.load_state_dict(blob["state_dict"])
    except Exception as e:
        raise UserError(
            f"--discriminator: {path}: weights do not match its config "
            f"({type(e).__name__}: {str(e).splitlines()[0][:80] if str(e) else ''})"
        ) from None
    return d.requires_grad_(False).eval()


def resolve_ae(args, ckpt) -> Path | None:
    """The AE to decode with: --ae (must exist), else the checkpoint's own if it is still there."""
    if args.no_grid:
        return None
    if args.ae is not None:
        return Path(args.ae)
    recorded = ckpt.autoencoder
    if not recorded or recorded == "None":
        return None
    if not Path(recorded).exists():
        print(
            f"advdiff: warning: the checkpoint's autoencoder {recorded} is not there; no grid (pass --ae)",
            file=sys.stderr,
        )
        return None
    return Path(recorded)


def sample(args) -> None:
    from trainer.diffusion.checkpoints import load_diffusion_checkpoint
    from trainer.diffusion.noise import per_sample_noise
    from trainer.diffusion.sampling import ddim_sample
    from trainer.diffusion.schedule import Schedule

    check_args(args)
    device = sample_device(args)
    ckpt = load_diffusion_checkpoint(args.checkpoint, use_ema=not args.raw)
    shape = ckpt.latent_shape
    schedule = Schedule.from_dict(ckpt.scheduler).with_spacing(args.timestep_spacing)
    if args.steps > schedule.num_steps:
        raise UserError(
            f"--steps: at most {schedule.num_steps} (the checkpoint's schedule), got {args.steps}"
        )
    labels, scale = resolve_class_labels(args, ckpt)
    guidance = discriminator_guidance(args, shape, device)
    ae = load_grid_ae(args, ckpt, shape, device)  # loaded (and checked) before any sampling
    unet = ckpt.unet.to(device).eval()
    noise = per_sample_noise(range(args.num), shape, args.seed, "sample").to(device)
    z = ddim_sample(
        unet,
        schedule.ddim(),
        noise,
        args.steps,
        eta=args.eta,
        batch_size=args.batch_size,
        gen_parts=(args.seed, "sample"),
        indices=list(range(args.num)),
        guidance=guidance,
        class_labels=None if labels is None else labels.to(device),
        guidance_scale=scale,
        null_class=None if ckpt.conditioning is None else ckpt.conditioning.null_class,
    )
    written = write_samples(args, z, labels, ae, ckpt)
    print(
        f"advdiff sample: {args.num} samples, {args.steps} DDIM steps ({schedule.timestep_spacing} "
        f"spacing), eta {args.eta}, {describe_guidance(guidance, labels, ckpt, scale, schedule)}: "
        f"{', '.join(written)}"
    )


def sample_device(args) -> torch.device:
    """--device: cuda (which must be visible), cpu, or auto (cuda when visible)."""
    if args.device == "cuda" and not torch.cuda.is_available():
        raise UserError("--device cuda: no CUDA device is visible")
    return torch.device("cuda" if args.device != "cpu" and torch.cuda.is_available() else "cpu")


def discriminator_guidance(args, shape, device) -> Guidance | None:
    """The guidance --discriminator turns on (its D checked against the latents), or None."""
    if args.discriminator is None:
        return None
    d = load_guidance_discriminator(Path(args.discriminator), shape, args.guidance_input)
    return Guidance(
        d.to(device),
        weight=args.guidance_weight,
        t_min=args.guidance_t_min,
        t_max=args.guidance_t_max,
        input=args.guidance_input,
    )


def load_grid_ae(args, ckpt, shape, device):
    """The frozen AE the grid is decoded with (resolve_ae), checked against the checkpoint's latents, or
    None for no grid. A bare UNet folder takes its latent scale and shift from the AE config."""
    from trainer.data.latents import load_frozen_ae

    ae_path = resolve_ae(args, ckpt)
    if ae_path is None:
        return None
    ae = load_frozen_ae(ae_path, device)
    if ckpt.kind == "unet":  # a bare UNet folder: the latent scale and shift are the AE config's
        from models.autoencoder import config_scaling

        ckpt.scaling = config_scaling(ae)
    if ae.config.latent_channels != shape[0]:
        raise UserError(
            f"--ae: {ae_path}: latent channels {ae.config.latent_channels} differ from the "
            f"checkpoint's UNet's {shape[0]}"
        )
    return ae


def write_samples(args, z, labels, ae, ckpt) -> list[str]:
    """PREFIX.pt, PREFIX.labels.pt (a class-conditional model) and the PNG grid (with an AE); returns
    the paths written."""
    from trainer.diffusion.sampling import image_grid
    from trainer.files import atomic

    prefix = Path(args.out)
    pt = atomic.save_torch(z.cpu().contiguous(), prefix.with_name(prefix.name + ".pt"))
    written = [str(pt)]
    if labels is not None:
        written.append(str(atomic.save_torch(labels, prefix.with_name(prefix.name + ".labels.pt"))))
    if ae is not None:
        from models.autoencoder import decode

        shown = z[:GRID_MAX]
        images = torch.cat(
            [
                decode(ae, ckpt.scaling.from_model(shown[s : s + args.batch_size]))
                for s in range(0, shown.shape[0], args.batch_size)
            ]
        )
        png = atomic.save_png(
            image_grid(images, nrow=min(args.nrow, shown.shape[0])), prefix.with_name(prefix.name + ".png")
        )
        written.append(str(png))
    return written


def describe_guidance(guidance, labels, ckpt, scale: float, schedule) -> str:
    """How the samples were guided, for the closing line."""
    if labels is not None:
        return (
            f"{len(set(labels.tolist()))} of {ckpt.conditioning.num_classes} classes, classifier-free "
            f"guidance scale {scale}"
        )
    if guidance is None:
        return "no guidance"
    return (
        f"discriminator guidance w={guidance.weight} on t in [{guidance.t_min}, {guidance.t_max}] x "
        f"{schedule.num_steps}, D sees {guidance.input}"
    )


def main(argv=None) -> int:
    args = parser().parse_args(argv)
    return one_line_errors(lambda: sample(args))
