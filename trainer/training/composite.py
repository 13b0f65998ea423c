"""The generator's loss: the one place its terms are summed, for the step, for validation and for the logs.

A CompositeLoss holds the weighted terms of `training.loss` (trainer/training/losses.py: the term types and
their registry) and owns everything that weighs them:
  - the step's loss and its logged parts (train_<part>), each term scaled by its micro-batch's share;
  - the gradient-norm ratio (stage2.grad_ratio_weight): the adversarial terms scaled, at every step, by the
    ratio of the anchor terms' gradient norm to theirs at one parameter (logged as train_adv_ratio);
  - validation: the sums a validation pass accumulates and the row it gives (val_loss, val_<part>);
  - the adaptive weight (stage2.adaptive_weight): the adversarial weights move after each validation to
    keep D's accuracy in a band; they are the composite's state (state_dict / load_state_dict).

Logged parts: one per term type's `part`. The built-in parts (mse, adv) are logged in every fine-tune,
with or without a weighted term of their type; the parts of other types come with their terms.
"""

from __future__ import annotations

import math

import torch

from trainer.parallel.collectives import all_reduce_sum
from trainer.training.losses import REGISTRY, DiscriminatorLoss, MSELoss, grad_norm_ratio

STANDARD_TYPES = (MSELoss, DiscriminatorLoss)


def _accumulate(sums: dict, key: str, value: torch.Tensor) -> None:
    sums[key] = sums[key] + value if key in sums else value


class CompositeLoss:
    """Weighted sum of terms. Zero-weight terms are dropped at build time, so they cost nothing.

    grad_ratio_max: the clamp of the gradient-norm ratio, None without it; adaptive: (band, factor) of
    the adaptive weight, None without it."""

    def __init__(self, terms, grad_ratio_max: float | None = None, adaptive=None):
        terms = list(terms)
        self.part_types: dict[str, type] = {}
        for kind in (*STANDARD_TYPES, *(type(t) for t in terms)):
            self.part_types.setdefault(kind.part, kind)
        self.terms = [t for t in terms if t.weight > 0]
        self.grad_ratio_max, self.adaptive = grad_ratio_max, adaptive

    @classmethod
    def from_config(cls, loss_cfg, balance=None) -> "CompositeLoss":
        """loss_cfg: `training.loss`; balance: the section with grad_ratio_weight, grad_ratio_max,
        adaptive_weight, adaptive_band and adaptive_factor (`stage2`), or None for plain weights."""
        terms = [REGISTRY[t.type](key=t.key, target=t.target, weight=t.weight) for t in loss_cfg.losses]
        ratio = balance.grad_ratio_max if balance is not None and balance.grad_ratio_weight else None
        adaptive = None
        if balance is not None and balance.adaptive_weight:
            adaptive = (tuple(balance.adaptive_band), balance.adaptive_factor)
        return cls(terms, grad_ratio_max=ratio, adaptive=adaptive)

    # -- what it contributes ---------------------------------------------------------------------
    @property
    def needs_discriminator(self) -> bool:
        return any(t.needs_discriminator for t in self.terms)

    @property
    def needs_batch(self) -> bool:
        """Whether a term reads the step's noised reals (the MSE batch)."""
        return any(t.samples == "batch" for t in self.terms)

    @property
    def needs_generated(self) -> bool:
        """Whether a term reads the generator's own sample (which the step must then make)."""
        return any(t.samples == "generated" for t in self.terms)

    @property
    def adversarial_weight(self) -> float:
        """The adversarial terms' weight (the history's adv_weight column)."""
        return sum(t.weight for t in self.terms if t.role == "adversarial")

    def columns(self, prefix: str) -> list[str]:
        """The history columns of the parts: train_mse, train_adv, ... or val_mse, val_adv, ..."""
        return [f"{prefix}_{part}" for part in self.part_types]

    @property
    def ratio_columns(self) -> list[str]:
        return ["train_adv_ratio"] if self.grad_ratio_max is not None else []

    # -- the step --------------------------------------------------------------------------------
    def __call__(
        self, outputs: dict, ctx: dict, shares: dict | None = None, ratio_at=None, world: int = 1
    ) -> tuple[torch.Tensor, dict]:
        """(loss, parts): the weighted sum and the terms' unweighted values summed per part.

        shares: {"batch": ..., "generated": ...}, each term's share of the samples it reads (micro-batches:
        the shares of a step's micro-batches add up to 1); None: whole. ratio_at: the parameter at which the
        gradient-norm ratio is taken (used where the ratio is on), averaged over `world` processes."""
        total, parts = None, {part: 0.0 for part in self.part_types}
        by_role, by_part = {}, {}
        for term in self.terms:
            value = term(outputs, ctx)
            if shares is not None:
                value = value * shares[term.samples]
            weighted = term.weight * value
            total = weighted if total is None else total + weighted
            parts[term.part] += float(value.detach())
            _accumulate(by_role, term.role, weighted)
            _accumulate(by_part, term.part, weighted)
        if total is None:
            raise ValueError("the composite loss has no term with a positive weight")
        if self.grad_ratio_max is None or ratio_at is None or len(by_role) < 2:
            return total, parts
        anchor, adversarial = by_role["anchor"], by_role["adversarial"]
        ratio = grad_norm_ratio(anchor, adversarial, ratio_at, self.grad_ratio_max)
        ratio = all_reduce_sum(ratio.reshape(1).float()) / world  # every rank weighs alike
        # logged per part: its weighted sum over its weight (a single term's own value)
        parts = {part: 0.0 for part in self.part_types}
        for part, value in by_part.items():
            parts[part] = float(value.detach()) / sum(t.weight for t in self.terms if t.part == part)
        return anchor + ratio[0] * adversarial, {**parts, "adv_ratio": float(ratio[0])}

    # -- validation ------------------------------------------------------------------------------
    @property
    def val_sums(self) -> list[str]:
        """The names of the sums validation accumulates for the loss (in a Totals, reduced over ranks)."""
        return ["val_weighted", *self.columns("val")]

    def add_val_batch(self, outputs: dict, ctx: dict, sums) -> None:
        """Add the "batch" terms' per-sample values of a chunk of the validation batch."""
        for term in self.terms:
            if term.samples == "batch":
                per = term.per_sample(outputs, ctx)
                sums.add("val_weighted", term.weight * per.sum())
                sums.add(f"val_{term.part}", per.sum())

    def add_val_generated(self, outputs: dict, ctx: dict, sums) -> None:
        """Measure the generator's validation samples (outputs: generated, generated_t, generated_logits)
        for every generated part, weighted or not."""
        for part, kind in self.part_types.items():
            if kind.samples == "generated":
                sums.add(f"val_{part}", kind.per_sample(outputs, ctx).sum())

    def val_row(self, sums: dict, n_batch: float, n_generated: float) -> dict:
        """val_loss and val_<part> from the reduced sums, over n_batch validation samples (at least 1)
        and n_generated generated ones (a generated part is NaN without any)."""
        row = {"val_loss": sums["val_weighted"] / n_batch}
        for part, kind in self.part_types.items():
            if kind.samples == "batch":
                row[f"val_{part}"] = sums[f"val_{part}"] / n_batch
                continue
            mean = sums[f"val_{part}"] / n_generated if n_generated else math.nan
            row[f"val_{part}"] = mean
            weight = sum(t.weight for t in self.terms if t.part == part)
            row["val_loss"] = row["val_loss"] + weight * (mean if n_generated else 0.0)
        return row

    # -- the adaptive weight and the state -------------------------------------------------------
    def adapt(self, d_acc: float) -> None:
        """Keep D's accuracy in the band: push harder when D wins, ease off when it is fooled."""
        if self.adaptive is None or d_acc != d_acc:
            return
        (low, high), factor = self.adaptive
        factor = factor if d_acc > high else (1 / factor if d_acc < low else 1.0)
        for term in self.terms:
            if term.role == "adversarial":
                term.weight *= factor

    def state_dict(self) -> dict:
        return {"weights": [t.weight for t in self.terms]}

    def load_state_dict(self, state: dict) -> None:
        """Also takes a fine-tune state written before the composite had its own: weights in `adv_weights`."""
        weights = state["weights"] if "weights" in state else state.get("adv_weights", [])
        for term, weight in zip(self.terms, weights, strict=False):
            term.weight = weight
