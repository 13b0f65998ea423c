"""Diffusion maths shared by every stage: the noise schedule, predictions and training targets, one
DDIM step and the sampler, per-sample noise and timestep draws, the UNet spec and checkpoints."""
