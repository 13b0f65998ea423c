"""DDIM sampling with per-sample seeds (optionally with discriminator guidance), and sample grids."""

from __future__ import annotations

import numpy as np
import torch

from trainer.diffusion.conditioning import model_output
from trainer.diffusion.guidance import guided_output
from trainer.diffusion.noise import eta_generators

# On CPU, DDIM sampling feeds the UNet channels-last activations: oneDNN's convolutions are faster on
# that layout (bench/generation.py measures it against contiguous input). Only the input's layout
# changes, never the module's, so a model that is also being trained is left alone; results agree with
# contiguous ones up to float rounding, and are returned contiguous.
CPU_CHANNELS_LAST = True


def ddim_step(ddim, model_output, t, x, eta: float = 0.0, gens=None):
    """One DDIM step of `x` at timestep t (the sampler's timesteps must be set). With eta > 0 the
    step's noise comes from `gens`, one generator per sample (None: the scheduler's own draw)."""
    if eta > 0:
        var = (
            torch.stack([torch.randn(x.shape[1:], generator=g) for g in gens]).to(x.device)
            if gens is not None
            else None
        )
        return ddim.step(model_output.float(), t, x, eta=eta, variance_noise=var).prev_sample
    return ddim.step(model_output.float(), t, x, eta=0.0).prev_sample


def ddim_sample(
    unet,
    ddim,
    noise: torch.Tensor,
    steps: int,
    eta: float = 0.0,
    batch_size: int = 64,
    gen_parts: tuple | None = None,
    indices=None,
    guidance=None,
    class_labels: torch.Tensor | None = None,
    guidance_scale: float = 1.0,
    null_class: int | None = None,
) -> torch.Tensor:
    """Run DDIM from `noise` in batches; returns latents on noise's device.

    With eta > 0 the per-step noise comes from generators seeded by (gen_parts, index), so results
    stay independent of batch size and process count.

    `guidance`: a trainer.diffusion.guidance.Guidance, or None. When given, each step's UNet output is
    corrected by the discriminator's gradient before the step (guided_output); the loop then runs under
    no_grad with inference mode off, since the gradient needs autograd. Without it the loop runs in
    inference mode, exactly as before guidance existed.

    `class_labels`: one class per noise row for a class-conditional model, sampled under classifier-free
    guidance at `guidance_scale` with the model's `null_class` (trainer.diffusion.conditioning); the
    discriminator guidance above is for unconditional models.
    """
    cond = None if class_labels is None else (class_labels, guidance_scale, null_class)
    if guidance is not None and cond is not None:
        raise ValueError("discriminator guidance is for unconditional models")
    if guidance is None:
        with torch.inference_mode():
            return _ddim_loop(unet, ddim, noise, steps, eta, batch_size, gen_parts, indices, None, cond)
    with torch.inference_mode(False), torch.no_grad():
        return _ddim_loop(unet, ddim, noise, steps, eta, batch_size, gen_parts, indices, guidance, None)


def _ddim_loop(unet, ddim, noise, steps, eta, batch_size, gen_parts, indices, guidance, cond) -> torch.Tensor:
    out = []
    channels_last = CPU_CHANNELS_LAST and noise.device.type == "cpu" and noise.dim() == 4
    for s in range(0, noise.shape[0], batch_size):
        x = noise[s : s + batch_size]
        if channels_last:
            x = x.contiguous(memory_format=torch.channels_last)
        ddim.set_timesteps(steps, device=x.device)
        gens = None
        if eta > 0 and gen_parts is not None and indices is not None:
            gens = eta_generators(indices[s : s + batch_size], *gen_parts)
        labels = None if cond is None else cond[0][s : s + batch_size]
        for t in ddim.timesteps:
            if cond is not None:
                x = ddim_step(ddim, model_output(unet, x, t, labels, cond[1], cond[2]), t, x, eta, gens)
            elif guidance is None:
                x = ddim_step(ddim, unet(x, t).sample, t, x, eta, gens)
            else:
                x = ddim_step(ddim, guided_output(guidance, ddim, unet, x, t), t, x, eta, gens)
        out.append(x.contiguous())
    return torch.cat(out) if out else noise[:0]


def image_grid(images: torch.Tensor, nrow: int) -> np.ndarray:
    """Images in [-1, 1], (N, C, H, W) -> uint8 grid (H', W') or (H', W', 3)."""
    images = ((images.clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8).cpu()
    n, c, h, w = images.shape
    rows = (n + nrow - 1) // nrow
    grid = torch.zeros((c, rows * (h + 2) + 2, nrow * (w + 2) + 2), dtype=torch.uint8)
    for i in range(n):
        r, col = divmod(i, nrow)
        grid[:, 2 + r * (h + 2) : 2 + r * (h + 2) + h, 2 + col * (w + 2) : 2 + col * (w + 2) + w] = images[i]
    arr = grid.numpy()
    return arr[0] if c == 1 else arr.transpose(1, 2, 0)
