"""Discriminator guidance (Kim et al., 2022, "Refining generative process with discriminator guidance"):
a sampling-time correction of the UNet's output by the gradient of a discriminator's logit.

A discriminator D(x, t) with sigmoid output estimates p_data(x_t) / (p_data(x_t) + p_model(x_t)), so
its logit log(D / (1 - D)) estimates log p_data(x_t) - log p_model(x_t), and the logit's gradient
g = ∇_{x_t} logit is what the model's score lacks. With w the weight,

    score' = score + w * g,   score = -eps / sqrt(1 - alpha_bar_t)
    =>  eps' = eps - w * sqrt(1 - alpha_bar_t) * g

and the corrected noise prediction is handed back in the model's own prediction type. Writing
a = sqrt(alpha_bar_t), s = sqrt(1 - alpha_bar_t) (a² + s² = 1) and x0' = (x_t - s eps') / a:

    epsilon:       out' = eps'
    v_prediction:  v' = a eps' - s x0' = (eps' - s x_t) / a,  so  v' = v + (eps' - eps) / a

(`v = (eps - s x_t) / a` is the same identity for the uncorrected output, read off
`Schedule.predictions`: eps = s x_t + a v). Both are a change `delta_eps / (1 or a)` added to the output
as it is, so a weight of 0, or a sample outside [t_min, t_max], leaves the output's bits unchanged.

What D is shown (`Guidance.input`):
  - "x_t": the noisy latent itself, as in the paper (a D trained on noised reals vs noised samples).
  - "x0_pred": the clean latent the model predicts from x_t, x0(x_t) = Schedule.predictions(unet(x_t, t),
    x_t, t)[1]; g is then ∇_{x_t} logit(D(x0(x_t), t)), through the UNet (one extra backward per step).
    This is the input stage 2's noise-conditioned D (x0_pred mode) was trained on.

D must score samples independently (LatentDiscriminator does: GroupNorm, no batch statistics): the
gradient of the summed logits is then each sample's own gradient. D is run in eval mode and its
parameters are never changed; only the gradient with respect to the input is taken.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

INPUTS = ("x_t", "x0_pred")
DEFAULT_T_MIN = (
    0.15  # off for the last 15% of noise levels (t < 0.15 T): the final steps are the model's alone
)


@dataclass
class Guidance:
    """Discriminator guidance settings. `t_min`, `t_max`: fractions of the schedule's training
    timesteps T; guidance acts on timesteps t with t_min * T <= t <= t_max * T and is off elsewhere
    (by default for t < 0.15 T: the last steps of sampling are left to the model alone)."""

    discriminator: torch.nn.Module
    weight: float = 1.0
    t_min: float = DEFAULT_T_MIN
    t_max: float = 1.0
    input: str = "x_t"

    def __post_init__(self):
        if not math.isfinite(self.weight):
            raise ValueError(f"guidance weight: expected a finite number, got {self.weight}")
        if not (0.0 <= self.t_min <= self.t_max <= 1.0):
            raise ValueError(
                f"guidance t_min, t_max: expected 0 <= t_min <= t_max <= 1, got {self.t_min}, {self.t_max}"
            )
        if self.input not in INPUTS:
            raise ValueError(f"guidance input: expected one of {', '.join(INPUTS)}, got {self.input!r}")

    def active(self, noise_sched, t: torch.Tensor) -> torch.Tensor:
        """A bool per timestep in `t` (any shape): does guidance act there?"""
        total = _scheduler(noise_sched).config.num_train_timesteps
        t = torch.as_tensor(t)
        return (t >= self.t_min * total) & (t <= self.t_max * total)


def _scheduler(noise_sched):
    """A diffusers scheduler (alphas_cumprod, config) from a Schedule or a scheduler itself."""
    return getattr(noise_sched, "train", noise_sched)


def _coefficients(noise_sched, x_t: torch.Tensor, t: torch.Tensor):
    ab = _scheduler(noise_sched).alphas_cumprod.to(x_t.device)[t].float().view(-1, 1, 1, 1)
    return ab.sqrt(), (1 - ab).sqrt()


def correct_output(
    noise_sched, model_output: torch.Tensor, x_t: torch.Tensor, t, grad: torch.Tensor, weight: float
) -> torch.Tensor:
    """The model output with its noise prediction moved by -weight * sqrt(1 - alpha_bar_t) * grad (the
    score moved by weight * grad), in the model's prediction type (epsilon or v_prediction). `t`: a
    timestep, or one per sample; `grad`: ∇_{x_t} of D's logit, shaped like x_t."""
    a, s = _coefficients(noise_sched, x_t, torch.as_tensor(t, device=x_t.device))
    delta = -weight * s * grad.float()
    if _scheduler(noise_sched).config.prediction_type == "v_prediction":
        delta = delta / a
    return model_output + delta.to(model_output.dtype)


def _per_sample(t, n: int, device) -> torch.Tensor:
    t = torch.as_tensor(t, device=device)
    return t.reshape(1).expand(n) if t.dim() == 0 else t


def discriminator_gradient(guidance: Guidance, noise_sched, x_t: torch.Tensor, t, unet=None):
    """(g, model_output): g = ∇_{x_t} of D's logit at (x_t, t), per sample, float32 and detached. In
    "x0_pred" mode D sees the model's x0 prediction and the gradient runs through `unet` (required);
    its output at (x_t, t) comes back as model_output (detached), else model_output is None.

    Works inside torch.inference_mode and no_grad: the gradient is taken on a fresh copy of x_t with
    inference mode off and gradients on, so tensors the caller made in inference mode are fine."""
    d = guidance.discriminator
    was_training = d.training
    d.eval()
    try:
        with torch.inference_mode(False), torch.enable_grad():
            x = x_t.detach().clone().requires_grad_(True)
            tt = _per_sample(t, x.shape[0], x.device).clone()
            out = None
            if guidance.input == "x0_pred":
                if unet is None:
                    raise ValueError("guidance input x0_pred needs the UNet (unet=...)")
                out = unet(x, tt).sample
                d_in = _x0(noise_sched, out.float(), x, tt)
            else:
                d_in = x
            logit = d(d_in, tt)
            (g,) = torch.autograd.grad(logit.float().sum(), x)
        return g.detach().float(), (None if out is None else out.detach())
    finally:
        d.train(was_training)


def _x0(noise_sched, model_output, x_t, t):
    a, s = _coefficients(noise_sched, x_t, t)
    if _scheduler(noise_sched).config.prediction_type == "v_prediction":
        return a * x_t - s * model_output
    return (x_t - s * model_output) / a


def guided_output(
    guidance: Guidance, noise_sched, unet, x_t: torch.Tensor, t, model_output: torch.Tensor | None = None
) -> torch.Tensor:
    """The UNet's output at (x_t, t) corrected by discriminator guidance: the drop-in replacement for
    `unet(x_t, t).sample` in a sampler. `t`: one timestep (a DDIM step) or one per sample; samples whose
    t is outside [t_min, t_max] get the plain output (bit for bit: when no sample is guided, or when
    `model_output` is given). `model_output`: the plain output if
    already computed (it is the output that gets corrected; "x0_pred" mode still reruns the UNet, with
    gradients, for D's input).
    `noise_sched`: a Schedule or a diffusers scheduler (the DDIM sampler itself will do)."""
    on = guidance.active(noise_sched, torch.as_tensor(t).cpu())
    if not bool(on.any()):
        return unet(x_t, t).sample if model_output is None else model_output
    if guidance.input == "x_t" and model_output is None:
        model_output = unet(x_t, t).sample
    grad, out = discriminator_gradient(guidance, noise_sched, x_t, t, unet)
    if model_output is None:
        model_output = out
    if on.dim() > 0 and not bool(on.all()):
        grad = torch.where(on.to(grad.device).view(-1, 1, 1, 1), grad, torch.zeros_like(grad))
    return correct_output(noise_sched, model_output, x_t, t, grad, guidance.weight)
