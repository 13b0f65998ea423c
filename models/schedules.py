"""Noise schedules (diffusers): the configs advdiff stores. Training and DDIM sampling schedulers are built
from them by trainer.diffusion.schedule.Schedule, the one place a DDIM sampler is made."""

from __future__ import annotations

from diffusers import DDIMScheduler, DDPMScheduler

BETA_SCHEDULES = {"linear": "linear", "scaled_linear": "scaled_linear", "cosine": "squaredcos_cap_v2"}


def scheduler_kwargs(kind: str, num_steps: int, prediction_type: str) -> dict:
    if kind not in BETA_SCHEDULES:
        raise ValueError(f"unknown schedule {kind!r}; known: {', '.join(BETA_SCHEDULES)}")
    # clip_sample=False: latents are not bounded to [-1, 1], and clipping them distorts samples.
    return dict(
        num_train_timesteps=num_steps,
        beta_schedule=BETA_SCHEDULES[kind],
        prediction_type=prediction_type,
        clip_sample=False,
    )


def training_scheduler(kind: str, num_steps: int, prediction_type: str) -> DDPMScheduler:
    return DDPMScheduler(**scheduler_kwargs(kind, num_steps, prediction_type))


def scheduler_config(kind: str, num_steps: int, prediction_type: str) -> dict:
    """The config of one of advdiff's named schedules (what `Schedule` stores)."""
    return dict(training_scheduler(kind, num_steps, prediction_type).config)


def full_scheduler_config(config: dict) -> dict:
    """Any diffusers DDPM/DDIM-family scheduler config -> every field both the training (DDPM) and the
    sampling (DDIM) scheduler read, defaults filled in, as plain JSON values (custom `trained_betas`
    included)."""
    given = {k: v for k, v in config.items() if not k.startswith("_")}
    if given.get("trained_betas") is not None:
        given["trained_betas"] = [float(b) for b in given["trained_betas"]]
    full = {**dict(DDPMScheduler.from_config(given).config), **dict(DDIMScheduler.from_config(given).config)}
    return {
        k: list(v) if isinstance(v, tuple) else v for k, v in sorted(full.items()) if not k.startswith("_")
    }
