"""The self-describing diffusion checkpoints that stage 1 and stage 2 export: writing and loading them."""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch

from models.autoencoder import LatentScaling
from models.unet import UNetSpec, build_unet, spec_from_dict, spec_to_dict
from trainer.core.errors import UserError

CKPT_FORMAT = "advdiff.diffusion"  # stage-1 and stage-2 diffusion exports


@dataclass
class DiffusionCheckpoint:
    path: Path
    spec: UNetSpec
    unet: torch.nn.Module
    scheduler: dict
    scaling: LatentScaling
    autoencoder: str
    step: int
    metrics: dict
    blob: dict


def load_diffusion_checkpoint(path, use_ema: bool = True) -> DiffusionCheckpoint:
    """Load an exported diffusion checkpoint; errors are one line naming the file."""
    path = Path(path)
    if not path.is_file():
        raise UserError(f"{path}: checkpoint not found")
    try:
        blob = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:
        raise UserError(f"{path}: unreadable checkpoint ({type(e).__name__}: {str(e).splitlines()[0][:80]})") from None
    if not isinstance(blob, dict) or blob.get("format") != CKPT_FORMAT:
        raise UserError(f"{path}: not an advdiff diffusion checkpoint (format {CKPT_FORMAT})")
    spec = spec_from_dict(blob["unet_spec"])
    unet = build_unet(spec)
    weights = blob["state_dict"] if use_ema or blob.get("raw_state_dict") is None else blob["raw_state_dict"]
    try:
        unet.load_state_dict(weights)
    except RuntimeError as e:
        raise UserError(f"{path}: weights do not match the UNet spec ({str(e).splitlines()[0][:80]})") from None
    return DiffusionCheckpoint(path=path, spec=spec, unet=unet.eval(), scheduler=blob["scheduler"],
                               scaling=LatentScaling(**blob["latent_scaling"]), autoencoder=blob["autoencoder"],
                               step=int(blob["step"]), metrics=blob.get("metrics", {}), blob=blob)


def export_blob(spec, weights, scaling, step, metrics, *, schedule: dict, autoencoder: str | None, config: dict,
                raw_weights=None) -> dict:
    """A self-describing diffusion export; `weights` (EMA) and `raw_weights` are CPU state dicts, `schedule`
    the noise schedule the weights were trained with, `autoencoder` the frozen AE's path."""
    return {
        "format": CKPT_FORMAT,
        "unet_spec": spec_to_dict(spec),
        "state_dict": weights,
        "raw_state_dict": raw_weights,
        "scheduler": dict(schedule),
        "latent_scaling": scaling.to_dict(),
        "autoencoder": str(autoencoder),
        "step": step,
        "metrics": {k: v for k, v in metrics.items() if isinstance(v, (int, float))},
        "config": config,
    }
