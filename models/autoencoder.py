"""The frozen autoencoder: diffusers AutoencoderKL, built small for stage 0 or loaded from disk.

Two on-disk forms load here: a diffusers `save_pretrained` folder (any latent-channel count), and
advdiff's own self-describing `.pt` ({"format": "advdiff.autoencoder", "config", "state_dict"}).
Latents used by the diffusion model are `(mean - shift) * scale`; the pair travels with the
stage-1 checkpoint so every stage agrees on it.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import torch

if TYPE_CHECKING:
    from diffusers import AutoencoderKL

AE_FORMAT = "advdiff.autoencoder"


@dataclass(frozen=True)
class LatentScaling:
    scale: float = 1.0
    shift: float = 0.0

    def to_model(self, z: torch.Tensor) -> torch.Tensor:
        return (z - self.shift) * self.scale

    def to_model_(self, z: torch.Tensor) -> torch.Tensor:
        """to_model in place (the same float operations, so the same bits)."""
        return z.sub_(self.shift).mul_(self.scale)

    def from_model(self, z: torch.Tensor) -> torch.Tensor:
        return z / self.scale + self.shift

    def to_dict(self) -> dict:
        return {"scale": float(self.scale), "shift": float(self.shift)}


def build_autoencoder(
    in_channels=1,
    latent_channels=4,
    block_out_channels=(16, 32, 32),
    layers_per_block=1,
    norm_num_groups=8,
    sample_size=32,
) -> AutoencoderKL:
    from diffusers import AutoencoderKL

    n = len(block_out_channels)
    return AutoencoderKL(
        in_channels=in_channels,
        out_channels=in_channels,
        down_block_types=("DownEncoderBlock2D",) * n,
        up_block_types=("UpDecoderBlock2D",) * n,
        block_out_channels=tuple(block_out_channels),
        layers_per_block=layers_per_block,
        latent_channels=latent_channels,
        norm_num_groups=norm_num_groups,
        sample_size=sample_size,
        scaling_factor=1.0,
        shift_factor=0.0,
    )


class AutoencoderLoadError(Exception):
    """The AE path does not hold a loadable autoencoder; the message says why."""


def load_autoencoder(path: str | Path) -> AutoencoderKL:
    from diffusers import AutoencoderKL  # imported here: config checks read AE facts without diffusers

    path = Path(path)
    if path.is_dir():
        if not (path / "config.json").is_file():
            raise AutoencoderLoadError(f"{path}: not a diffusers AutoencoderKL folder (no config.json)")
        try:
            ae = AutoencoderKL.from_pretrained(str(path), local_files_only=True)
        except Exception as e:  # diffusers raises many types for broken folders
            raise AutoencoderLoadError(
                f"{path}: cannot load AutoencoderKL: {str(e).splitlines()[0]}"
            ) from None
    elif path.is_file():
        try:
            blob = torch.load(path, map_location="cpu", weights_only=True)
        except Exception as e:
            raise AutoencoderLoadError(f"{path}: unreadable checkpoint ({type(e).__name__})") from None
        if not isinstance(blob, dict) or blob.get("format") != AE_FORMAT:
            raise AutoencoderLoadError(f"{path}: not an advdiff autoencoder checkpoint (format {AE_FORMAT})")
        try:
            ae = AutoencoderKL.from_config(blob["config"])
            ae.load_state_dict(blob["state_dict"])
        except Exception as e:
            raise AutoencoderLoadError(
                f"{path}: weights do not match its config: {str(e).splitlines()[0]}"
            ) from None
    else:
        raise AutoencoderLoadError(f"{path}: autoencoder not found")
    ae.requires_grad_(False)
    return ae.eval()


def ae_export(ae: AutoencoderKL) -> dict:
    return {
        "format": AE_FORMAT,
        "config": dict(ae.config),
        "state_dict": {k: v.detach().cpu() for k, v in ae.state_dict().items()},
    }


def config_scaling(ae: AutoencoderKL) -> LatentScaling:
    return scaling_from_config(ae.config)


def scaling_from_config(config) -> LatentScaling:
    """The latent scale and shift an AutoencoderKL config (dict or FrozenDict) stores (1 and 0 if unset)."""
    return LatentScaling(
        scale=float(config.get("scaling_factor", 1.0) or 1.0),
        shift=float(config.get("shift_factor", None) or 0.0),
    )


def downsample_factor(ae: AutoencoderKL) -> int:
    return 2 ** (len(ae.config.block_out_channels) - 1)


@torch.no_grad()
def encode_mean(ae: AutoencoderKL, images: torch.Tensor) -> torch.Tensor:
    """Posterior mean, in fp32 whatever autocast is active (the AE never runs in reduced precision)."""
    with torch.autocast(device_type=images.device.type, enabled=False):
        return ae.encode(images.float()).latent_dist.mean


@torch.no_grad()
def decode(ae: AutoencoderKL, latents: torch.Tensor) -> torch.Tensor:
    with torch.autocast(device_type=latents.device.type, enabled=False):
        return ae.decode(latents.float()).sample
