"""AdvdiffLatentPipeline: unconditional latent diffusion as a diffusers pipeline (UNet2DModel + DDIM + VAE).

Every pipeline folder advdiff exports holds a copy of this file as `pipeline.py`, and its model_index.json
names it, so the folder opens with diffusers alone:

    DiffusionPipeline.from_pretrained(folder, trust_remote_code=True)

(`trust_remote_code=True` is diffusers' consent to run a pipeline class shipped inside a folder: the code it
runs is this file's copy, which you can read there or compare with this one.)

Unlike diffusers' stock latent pipelines it honours the VAE's `shift_factor` as well as its
`scaling_factor`: the UNet works on `(z - shift_factor) * scaling_factor`, so latents go back to the VAE as
`x / scaling_factor + shift_factor`. The defaults of `__call__` (steps, eta) are the ones the model was
fine-tuned to sample with (config `sampling_steps`, `sampling_eta`).

This file imports only torch and diffusers: it must work where advdiff is not installed.
"""

from __future__ import annotations

import torch
from diffusers import DiffusionPipeline, ImagePipelineOutput
from diffusers.utils.torch_utils import randn_tensor


class AdvdiffLatentPipeline(DiffusionPipeline):
    model_cpu_offload_seq = "unet->vae"
    _optional_components = ["vae"]

    def __init__(self, unet, scheduler, vae=None, sampling_steps: int = 50, sampling_eta: float = 0.0):
        super().__init__()
        self.register_modules(unet=unet, scheduler=scheduler, vae=vae)
        self.register_to_config(sampling_steps=int(sampling_steps), sampling_eta=float(sampling_eta))

    def latent_shape(self, batch_size: int) -> tuple:
        size = self.unet.config.sample_size
        h, w = (size, size) if isinstance(size, int) else tuple(size)
        return (batch_size, self.unet.config.in_channels, h, w)

    def to_vae_latents(self, x: torch.Tensor) -> torch.Tensor:
        """The UNet's latents -> the VAE's (undo scale and shift)."""
        scale = self.vae.config.scaling_factor if self.vae.config.scaling_factor is not None else 1.0
        shift = self.vae.config.get("shift_factor", None) or 0.0
        return x / scale + shift

    @torch.no_grad()
    def __call__(
        self,
        batch_size: int = 1,
        num_inference_steps: int | None = None,
        eta: float | None = None,
        generator=None,
        latents: torch.Tensor | None = None,
        output_type: str = "pil",
        return_dict: bool = True,
    ):
        """Sample `batch_size` images (or use the starting noise `latents`, in the UNet's latent space).

        output_type: "pil", "np" (NHWC in [0, 1]), "pt" (NCHW in [0, 1]) or "latent" (the UNet's latents).
        """
        steps = int(num_inference_steps or self.config.sampling_steps)
        eta = float(self.config.sampling_eta if eta is None else eta)
        device = self._execution_device
        dtype = self.unet.dtype
        if latents is None:
            latents = randn_tensor(
                self.latent_shape(batch_size), generator=generator, device=device, dtype=dtype
            )
        x = latents.to(device=device, dtype=dtype)
        self.scheduler.set_timesteps(steps, device=device)
        for t in self.progress_bar(self.scheduler.timesteps):
            out = self.unet(x, t).sample
            x = self.scheduler.step(out.float(), t, x, eta=eta, generator=generator).prev_sample
        if output_type == "latent":
            images = x
        else:
            if self.vae is None:
                raise ValueError("this pipeline has no vae: use output_type='latent'")
            z = self.to_vae_latents(x.float()).to(self.vae.dtype)
            images = (self.vae.decode(z).sample.float() / 2 + 0.5).clamp(0, 1)
            if output_type in ("np", "pil"):
                images = images.cpu().permute(0, 2, 3, 1).numpy()
                if output_type == "pil":
                    images = self.numpy_to_pil(images)
        self.maybe_free_model_hooks()
        if not return_dict:
            return (images,)
        return ImagePipelineOutput(images=images)
