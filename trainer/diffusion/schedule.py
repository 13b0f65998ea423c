"""The noise schedule of a diffusion model and the maths that follows from it: adding noise, fresh DDIM
samplers, the (noise, clean latent) predictions read off the UNet's output, and its training target."""
from __future__ import annotations

from dataclasses import dataclass, field

import torch

from models.schedules import ddim_scheduler, training_scheduler


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


@dataclass
class Schedule:
    """A stored schedule ({type, num_steps, prediction_type}) with its training scheduler built once."""
    type: str
    num_steps: int
    prediction_type: str
    train: object = field(init=False, repr=False)  # diffusers DDPMScheduler: add_noise, alphas_cumprod

    def __post_init__(self):
        self.train = training_scheduler(self.type, self.num_steps, self.prediction_type)

    @classmethod
    def from_dict(cls, d: dict) -> "Schedule":
        return cls(d["type"], int(d["num_steps"]), d["prediction_type"])

    def to_dict(self) -> dict:
        return {"type": self.type, "num_steps": self.num_steps, "prediction_type": self.prediction_type}

    def ddim(self):
        """A new DDIM sampler (its timesteps are state: each user sets its own)."""
        return ddim_scheduler(self.type, self.num_steps, self.prediction_type)

    def add_noise(self, x0: torch.Tensor, noise: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        return self.train.add_noise(x0, noise, t)

    def predictions(self, model_output, x_t, t):
        return predictions(self.train, model_output, x_t, t)

    def target(self, latents, noise, t):
        return model_target(self.train, latents, noise, t)
