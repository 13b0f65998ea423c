"""The noise schedule of a diffusion model and the maths that follows from it: adding noise, fresh DDIM
samplers, the (noise, clean latent) predictions read off the UNet's output, and its training target.

Every DDIM sampler in advdiff comes from `Schedule.ddim()`, so the timesteps a sampler visits follow the
model's stored scheduler config, `timestep_spacing` included (`scheduler.timestep_spacing` overrides it:
`with_spacing`). diffusers' DDIM default, "leading" with steps_offset 0, never starts from t = T-1 at few
steps (K=1: [0], K=2: [500, 0] of 1000); "trailing" does ([999], [999, 499]), and is what a new stage-1
model stores."""

from __future__ import annotations

import torch
from diffusers import DDIMScheduler, DDPMScheduler

from models.schedules import BETA_SCHEDULES, full_scheduler_config, scheduler_config

TIMESTEP_SPACINGS = ("leading", "trailing", "linspace")  # diffusers' DDIM `timestep_spacing` values
NEW_MODEL_SPACING = "trailing"  # what stage 1 stores in a new model when scheduler.timestep_spacing is null
STORED_DEFAULT_SPACING = "leading"  # diffusers' DDIM default: a stored config without the key samples so


def effective_spacing(stored: dict | None, override: str | None) -> str:
    """The timestep spacing a model whose stored scheduler config is `stored` samples with when
    scheduler.timestep_spacing is `override` (None keeps the stored one)."""
    if override is not None:
        return override
    return (stored or {}).get("timestep_spacing", STORED_DEFAULT_SPACING)


def predictions(noise_sched, model_output, x_t, t):
    """(pred_noise, pred_latent) from the UNet's output, for epsilon or v prediction."""
    ab = noise_sched.alphas_cumprod.to(x_t.device)[t].float().view(-1, 1, 1, 1)
    a, s = ab.sqrt(), (1 - ab).sqrt()
    if noise_sched.config.prediction_type == "v_prediction":
        return s * x_t + a * model_output, a * x_t - s * model_output
    return model_output, (x_t - s * model_output) / a


def model_target(noise_sched, latents, noise, t):
    """What the UNet is trained to output at x_t = add_noise(latents, noise, t)."""
    if noise_sched.config.prediction_type == "v_prediction":
        return noise_sched.get_velocity(latents, noise, t)
    return noise


class Schedule:
    """A diffusion model's noise schedule, stored as a full diffusers scheduler config (custom betas
    included), with its training scheduler (DDPM: add_noise, alphas_cumprod) built once and fresh DDIM
    samplers on demand. `Schedule(kind, num_steps, prediction_type)` builds one of advdiff's
    named schedules; `timestep_spacing` (None: keep the config's, else diffusers' default, leading) sets
    the DDIM samplers' timesteps."""

    def __init__(
        self,
        kind: str = "linear",
        num_steps: int = 1000,
        prediction_type: str = "epsilon",
        config: dict | None = None,
        timestep_spacing: str | None = None,
    ):
        given = dict(config if config is not None else scheduler_config(kind, num_steps, prediction_type))
        if timestep_spacing is not None:
            if timestep_spacing not in TIMESTEP_SPACINGS:
                known = ", ".join(TIMESTEP_SPACINGS)
                raise ValueError(f"timestep_spacing: expected one of {known}, got {timestep_spacing!r}")
            given["timestep_spacing"] = timestep_spacing
        self.config = full_scheduler_config(given)
        self.train = DDPMScheduler.from_config(self.config)

    @property
    def num_steps(self) -> int:
        return int(self.config["num_train_timesteps"])

    @property
    def prediction_type(self) -> str:
        return self.config["prediction_type"]

    @property
    def timestep_spacing(self) -> str:
        """How DDIM samplers spread K steps over the T training timesteps: leading, trailing or linspace."""
        return self.config.get("timestep_spacing", STORED_DEFAULT_SPACING)

    @property
    def type(self) -> str:
        """advdiff's name of the beta schedule ("custom" for trained betas)."""
        if self.config.get("trained_betas") is not None:
            return "custom"
        names = {v: k for k, v in BETA_SCHEDULES.items()}
        return names.get(self.config["beta_schedule"], self.config["beta_schedule"])

    @classmethod
    def from_dict(cls, d: dict) -> "Schedule":
        """A stored schedule: a diffusers scheduler config, or the {type, num_steps, prediction_type} of
        checkpoints written before configs were stored whole."""
        if "num_train_timesteps" not in d and "type" in d:
            return cls(
                d["type"],
                int(d["num_steps"]),
                d["prediction_type"],
                timestep_spacing=d.get("timestep_spacing"),
            )
        return cls(config=d)

    def to_dict(self) -> dict:
        return dict(self.config)

    def with_spacing(self, timestep_spacing: str | None) -> "Schedule":
        """This schedule sampled with `timestep_spacing`; None keeps the stored one (this very object)."""
        if timestep_spacing is None or timestep_spacing == self.timestep_spacing:
            return self
        return Schedule(config=self.config, timestep_spacing=timestep_spacing)

    def ddim(self):
        """A new DDIM sampler (its timesteps are state: each user sets its own)."""
        return DDIMScheduler.from_config(self.config)

    def sampler_timesteps(self, steps: int) -> torch.Tensor:
        """The timesteps a `steps`-step DDIM sampler of this schedule visits (with its spacing)."""
        ddim = self.ddim()
        ddim.set_timesteps(steps)
        return ddim.timesteps.clone().long()

    def add_noise(self, x0: torch.Tensor, noise: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        return self.train.add_noise(x0, noise, t)

    def predictions(self, model_output, x_t, t):
        return predictions(self.train, model_output, x_t, t)

    def target(self, latents, noise, t):
        return model_target(self.train, latents, noise, t)
