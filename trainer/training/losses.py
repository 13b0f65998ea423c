"""Losses. Discriminator losses take logits; the generator's loss is a CompositeLoss
(trainer/training/composite.py) of the term types registered here, built from YAML. Everything here is
computed in fp32.

Keys a term may read (`outputs` of a fine-tuning step):
  pred_noise   the UNet's noise prediction (derived from its output for v-prediction)
  noise        the true noise
  pred_latent  the one-step x0 prediction from the noised real latent
  latent       the real clean latent (for MSELoss); for DiscriminatorLoss, see below
  model_output / model_target   the UNet's raw output and its training target (the stage-1 objective)

A "generated" term reads the generator's own sample instead: `generated` (as D scores it) and `generated_t`;
in rollout mode also `generated_sample` (the rollout itself), `generated_index` (its global indices) and
`generated_seed` (the seed parts of per-sample draws made on it).

A DiscriminatorLoss always scores the generator's own sample in the configured mode: full DDIM
rollouts (`rollout`) or one-step x0 predictions (`x0_pred`). Its key (`latent` or `pred_latent`)
names that sample; it never scores the real latents, whose gradient with respect to the UNet is zero.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import torch
import torch.nn.functional as F

from trainer.config.loss_types import GENERATED_KEYS, OUTPUT_KEYS, accept_loss_type


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


# -- generator side: the term types -------------------------------------------------------------
@dataclass
class Term:
    """One weighted term of the generator's loss. A term type is a subclass that declares, as class
    attributes, what it contributes:
      part        the logged part it adds to: the history columns train_<part> and val_<part>
      role        "anchor" or "adversarial": its side in the gradient-norm ratio (stage2.grad_ratio_weight);
                  the adaptive weight (stage2.adaptive_weight) scales the adversarial terms
      samples     what it reads: "batch" (the step's noised real latents, the keys above) or "generated"
                  (the generator's own sample, outputs["generated"]); a micro-batch scales the term by its
                  share of those samples, and validation measures it on those samples
      needs_discriminator   whether it calls ctx["discriminator"] (the fine-tune makes D's samples for it)
      keys, targets         what a config's `key` and `target` may name (targets None: it reads no target)
      helper      the name of a network with its own state the term needs (None: none), which the fine-tune
                  builds, steps and saves (trainer/stage2/helpers.py registers it) and puts in ctx[helper]
    and implements per_sample: one value per sample (validation's measure). Its value in a step is their
    mean unless it overrides __call__. A "generated" term's per_sample is a classmethod (its key and weight
    do not change what it measures): validation measures a generated part once, weighted or not.

    A new type is one such class and one `register_term(NewType)` call."""

    key: str
    target: str | None
    weight: float
    part: ClassVar[str] = "mse"
    role: ClassVar[str] = "anchor"
    samples: ClassVar[str] = "batch"
    needs_discriminator: ClassVar[bool] = False
    keys: ClassVar[tuple[str, ...]] = OUTPUT_KEYS
    targets: ClassVar[tuple[str, ...] | None] = OUTPUT_KEYS
    helper: ClassVar[str | None] = None

    def per_sample(self, outputs: dict, ctx: dict) -> torch.Tensor:
        raise NotImplementedError

    def __call__(self, outputs: dict, ctx: dict) -> torch.Tensor:
        return self.per_sample(outputs, ctx).mean()


class MSELoss(Term):
    def per_sample(self, outputs: dict, ctx: dict) -> torch.Tensor:
        return ((outputs[self.key].float() - outputs[self.target].float()) ** 2).flatten(1).mean(1)

    def __call__(self, outputs: dict, ctx: dict) -> torch.Tensor:
        # the mean over every element at once (the mean of per-sample means rounds differently)
        return torch.mean((outputs[self.key].float() - outputs[self.target].float()) ** 2)


class DiscriminatorLoss(Term):
    part, role, samples, needs_discriminator = "adv", "adversarial", "generated", True
    keys, targets = GENERATED_KEYS, None

    @classmethod
    def per_sample(cls, outputs: dict, ctx: dict) -> torch.Tensor:
        """The generator loss of D's logits (outputs["generated_logits"] where validation has them)."""
        logits = outputs.get("generated_logits")
        if logits is None:
            logits = scored(ctx, outputs)
        return g_loss_terms(ctx["d_loss"], logits)

    def __call__(self, outputs: dict, ctx: dict) -> torch.Tensor:
        """ctx["discriminator"](z, t) returns logits (conditioning on t where D is noise-conditioned)."""
        sample = outputs["generated"]
        if sample.shape[0] == 0:  # x0_pred mode with no timestep in range in this batch
            return sample.sum() * 0.0
        return g_loss(ctx["d_loss"], scored(ctx, outputs))


def scored(ctx: dict, outputs: dict) -> torch.Tensor:
    """D's logits of the generated samples: D(z, t), and D(z, t, labels) with a class-conditional run's
    labels (outputs["generated_labels"])."""
    z, t, y = outputs["generated"].float(), outputs.get("generated_t"), outputs.get("generated_labels")
    return ctx["discriminator"](z, t) if y is None else ctx["discriminator"](z, t, y)


def distribution_matching_loss(
    samples: torch.Tensor, p_real: torch.Tensor, p_fake: torch.Tensor, eps: float = 1e-6
) -> torch.Tensor:
    """Per-sample distribution-matching loss of the generator's `samples` (docs/STAGE2.md#distribution-
    matching): p_real and p_fake are the teacher's and the fake score's x0 predictions from the samples
    noised to one level. With g = (p_fake - p_real) / w, w = mean |samples - p_real| per sample (detached,
    at least eps), the value is 0.5 * mean (x - stopgrad(x - g))^2 per sample: its gradient with respect
    to x is g / (elements per sample), so descending it moves x toward the teacher's prediction and away
    from the fake score's. The value is 0.5 * mean g^2."""
    x = samples.float()
    p_real, p_fake = p_real.detach().float(), p_fake.detach().float()
    w = (x.detach() - p_real).abs().flatten(1).mean(1).clamp_min(eps)
    g = (p_fake - p_real) / w.view(-1, *([1] * (x.dim() - 1)))
    return 0.5 * (x - (x - g).detach()).pow(2).flatten(1).mean(1)


class DistributionMatchingLoss(Term):
    """Distribution matching (DMD-style) on the generator's own rollouts: the frozen stage-1 teacher's
    score against a fake score trained on the generator's samples (trainer/stage2/distribution_matching.py,
    ctx["distribution_matching"]), which also draws the noise level of each sample from its index
    (outputs["generated_index"]) and the step's seed parts (outputs["generated_seed"])."""

    part, samples, helper = "dm", "generated", "distribution_matching"
    keys, targets = ("latent",), None

    @classmethod
    def per_sample(cls, outputs: dict, ctx: dict) -> torch.Tensor:
        x = outputs["generated_sample"]
        p_real, p_fake = ctx["distribution_matching"].predictions(
            x, outputs["generated_index"], outputs["generated_seed"], outputs.get("generated_labels")
        )
        return distribution_matching_loss(x, p_real, p_fake)

    def __call__(self, outputs: dict, ctx: dict) -> torch.Tensor:
        if outputs["generated_sample"].shape[0] == 0:  # a process with no rollout of its own
            return outputs["generated_sample"].sum() * 0.0
        return self.per_sample(outputs, ctx).mean()


REGISTRY: dict[str, type[Term]] = {}


def register_term(cls: type[Term]) -> type[Term]:
    """Make `cls` a loss type a config may name (by its class name) and CompositeLoss builds."""
    if cls.role not in ("anchor", "adversarial") or cls.samples not in ("batch", "generated"):
        raise ValueError(f"{cls.__name__}: role must be anchor or adversarial, samples batch or generated")
    accept_loss_type(cls.__name__, cls.keys, cls.targets, cls.part)
    REGISTRY[cls.__name__] = cls
    return cls


register_term(MSELoss)
register_term(DiscriminatorLoss)
register_term(DistributionMatchingLoss)
