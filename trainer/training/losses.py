"""Losses as objects. The diffusion loss is a CompositeLoss of registered terms built from YAML;
discriminator losses take logits. Everything here is computed in fp32.

Keys a term may read (`outputs` of a fine-tuning step):
  pred_noise   the UNet's noise prediction (derived from its output for v-prediction)
  noise        the true noise
  pred_latent  the one-step x0 prediction from the noised real latent
  latent       the real clean latent (for MSELoss); for DiscriminatorLoss, see below
  model_output / model_target   the UNet's raw output and its training target (the stage-1 objective)

A DiscriminatorLoss always scores the generator's own sample in the configured mode: full DDIM
rollouts (`rollout`) or one-step x0 predictions (`x0_pred`). Its key (`latent` or `pred_latent`)
names that sample; it never scores the real latents, whose gradient with respect to the UNet is zero.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from trainer.config.sections import LOSS_TYPES


# -- discriminator side --------------------------------------------------------------------------
def d_loss_terms(kind: str, logits: torch.Tensor, real: bool) -> torch.Tensor:
    """Per-sample D loss: real labelled 1, fake 0. BCE-with-logits (written stably with softplus) is
    also the D side of the non-saturating loss; hinge is max(0, 1 -/+ logit)."""
    logits = logits.float()
    if kind == "hinge":
        return F.relu(1 - logits) if real else F.relu(1 + logits)
    return F.softplus(-logits) if real else F.softplus(logits)


def d_loss(kind: str, real_logits: torch.Tensor, fake_logits: torch.Tensor) -> torch.Tensor:
    return d_loss_terms(kind, real_logits, True).mean() + d_loss_terms(kind, fake_logits, False).mean()


def g_loss_terms(kind: str, fake_logits: torch.Tensor) -> torch.Tensor:
    """Per-sample generator loss: softplus(-l) (non-saturating; also for bce) or -l (hinge)."""
    fake_logits = fake_logits.float()
    if kind == "hinge":
        return -fake_logits
    return F.softplus(-fake_logits)


def g_loss(kind: str, fake_logits: torch.Tensor) -> torch.Tensor:
    return g_loss_terms(kind, fake_logits).mean()


def r1_term(real_logits: torch.Tensor, real_inputs: torch.Tensor) -> torch.Tensor:
    """R1: 0.5 * E ||grad_x D(x)||^2 over real inputs (which must require grad), differentiable."""
    (grad,) = torch.autograd.grad(real_logits.float().sum(), real_inputs, create_graph=True)
    return 0.5 * grad.pow(2).flatten(1).sum(1).mean()


def grad_norm_ratio(
    anchor: torch.Tensor,
    adversarial: torch.Tensor,
    parameter: torch.Tensor,
    max_ratio: float,
    eps: float = 1e-8,
) -> torch.Tensor:
    """||d anchor / d parameter|| / ||d adversarial / d parameter||, clamped to [0, max_ratio] and detached:
    the factor that gives the adversarial term the anchor's gradient scale at `parameter` (usually the
    generator's last layer). Both graphs are kept for the backward that follows."""
    (g_anchor,) = torch.autograd.grad(anchor, parameter, retain_graph=True, allow_unused=True)
    (g_adv,) = torch.autograd.grad(adversarial, parameter, retain_graph=True, allow_unused=True)
    if g_anchor is None or g_adv is None:
        return torch.zeros((), device=parameter.device)
    return (g_anchor.norm() / (g_adv.norm() + eps)).clamp(0.0, max_ratio).detach()


# -- generator side: the composite loss ---------------------------------------------------------
@dataclass
class MSELoss:
    key: str
    target: str
    weight: float
    needs_discriminator = False

    def __call__(self, outputs: dict, ctx: dict) -> torch.Tensor:
        return torch.mean((outputs[self.key].float() - outputs[self.target].float()) ** 2)


@dataclass
class DiscriminatorLoss:
    key: str
    target: object
    weight: float
    needs_discriminator = True

    def __call__(self, outputs: dict, ctx: dict) -> torch.Tensor:
        """ctx["discriminator"](z, t) returns logits (conditioning on t where D is noise-conditioned)."""
        sample, t = outputs["generated"], outputs.get("generated_t")
        if sample.shape[0] == 0:  # x0_pred mode with no timestep in range in this batch
            return sample.sum() * 0.0
        return g_loss(ctx["d_loss"], ctx["discriminator"](sample.float(), t))


REGISTRY = {"MSELoss": MSELoss, "DiscriminatorLoss": DiscriminatorLoss}
assert tuple(REGISTRY) == LOSS_TYPES, "config.sections.LOSS_TYPES names the registered terms"


class CompositeLoss:
    """Weighted sum of terms. Zero-weight terms are dropped at build time, so they cost nothing."""

    def __init__(self, terms):
        self.terms = [t for t in terms if t.weight > 0]

    @classmethod
    def from_config(cls, loss_cfg) -> "CompositeLoss":
        terms = []
        for term in loss_cfg.losses:
            terms.append(REGISTRY[term.type](key=term.key, target=term.target, weight=term.weight))
        return cls(terms)

    @property
    def needs_discriminator(self) -> bool:
        return any(t.needs_discriminator for t in self.terms)

    def parts(self, outputs: dict, ctx: dict) -> tuple[torch.Tensor | None, torch.Tensor | None]:
        """(weighted sum of the MSE terms, weighted sum of the discriminator terms); None where there is none."""
        sums = {False: None, True: None}
        for term in self.terms:
            value = term.weight * term(outputs, ctx)
            key = term.needs_discriminator
            sums[key] = value if sums[key] is None else sums[key] + value
        return sums[False], sums[True]

    def __call__(self, outputs: dict, ctx: dict) -> tuple[torch.Tensor, dict]:
        total, parts = None, {"mse": 0.0, "adv": 0.0}
        for term in self.terms:
            value = term(outputs, ctx)
            name = "adv" if term.needs_discriminator else "mse"
            parts[name] += float(value.detach())
            total = term.weight * value if total is None else total + term.weight * value
        if total is None:
            raise ValueError("the composite loss has no term with a positive weight")
        return total, parts
