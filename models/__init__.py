"""Plain model definitions. Nothing in here knows about processes or accelerators."""

from .autoencoder import LatentScaling, build_autoencoder, load_autoencoder
from .discriminator import LatentDiscriminator, build_discriminator
from .unet import PRESETS, UNetSpec, build_unet, count_parameters, preset

__all__ = [
    "LatentScaling",
    "build_autoencoder",
    "load_autoencoder",
    "LatentDiscriminator",
    "build_discriminator",
    "PRESETS",
    "UNetSpec",
    "build_unet",
    "count_parameters",
    "preset",
]
