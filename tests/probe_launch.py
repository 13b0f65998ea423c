"""Run an advdiff module while recording the dtypes that forward passes actually compute in, then
write them to $ADVDIFF_PROBE_OUT as JSON. Used to show that the mixed-precision switch acts and that
the autoencoder stays in fp32. Usage: python tests/probe_launch.py MODULE [args...]"""
import atexit
import json
import os
import runpy
import sys

import diffusers

from models.discriminator import LatentDiscriminator

seen = {"unet": set(), "discriminator": set(), "ae_encode": set(), "ae_decode": set()}


def wrap(cls, name, key, pick):
    original = getattr(cls, name)

    def patched(self, *args, **kwargs):
        out = original(self, *args, **kwargs)
        seen[key].add(str(pick(out)))
        return out

    setattr(cls, name, patched)


wrap(diffusers.UNet2DModel, "forward", "unet", lambda o: o.sample.dtype)
wrap(LatentDiscriminator, "forward", "discriminator", lambda o: o.dtype)
wrap(diffusers.AutoencoderKL, "encode", "ae_encode", lambda o: o.latent_dist.mean.dtype)
wrap(diffusers.AutoencoderKL, "decode", "ae_decode", lambda o: o.sample.dtype)


def dump():
    with open(os.environ["ADVDIFF_PROBE_OUT"], "w") as f:
        json.dump({k: sorted(v) for k, v in seen.items()}, f)


atexit.register(dump)
module, sys.argv = sys.argv[1], [sys.argv[1]] + sys.argv[2:]
try:
    runpy.run_module(module, run_name="__main__")
except SystemExit as e:
    if e.code not in (0, None):
        raise
