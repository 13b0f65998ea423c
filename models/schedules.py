"""Noise schedules (diffusers) for training, and DDIM for sampling."""
from __future__ import annotations

from diffusers import DDIMScheduler, DDPMScheduler

BETA_SCHEDULES = {"linear": "linear", "scaled_linear": "scaled_linear", "cosine": "squaredcos_cap_v2"}


def scheduler_kwargs(kind: str, num_steps: int, prediction_type: str) -> dict:
    if kind not in BETA_SCHEDULES:
        raise ValueError(f"unknown schedule {kind!r}; known: {', '.join(BETA_SCHEDULES)}")
    # clip_sample=False: latents are not bounded to [-1, 1], and clipping them distorts samples.
    return dict(num_train_timesteps=num_steps, beta_schedule=BETA_SCHEDULES[kind],
                prediction_type=prediction_type, clip_sample=False)


def training_scheduler(kind: str, num_steps: int, prediction_type: str) -> DDPMScheduler:
    return DDPMScheduler(**scheduler_kwargs(kind, num_steps, prediction_type))


def ddim_scheduler(kind: str, num_steps: int, prediction_type: str) -> DDIMScheduler:
    return DDIMScheduler(**scheduler_kwargs(kind, num_steps, prediction_type), set_alpha_to_one=True)
