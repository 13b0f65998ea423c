"""The loss-term types a config may name in `training.loss.losses[i].type`, with the step outputs each may
read. The config is a lower layer than training: trainer.training.losses.register_term implements a term and
names it here through `accept_loss_type`, so a registered type is accepted with no change to the config.

The built-in types are named here as well, so that a config validates without the training layer loaded
(training registers the same declarations; a mismatch fails at import)."""

from __future__ import annotations

from dataclasses import dataclass

# The keys of a fine-tune step's outputs (trainer.training.losses documents them).
OUTPUT_KEYS = ("pred_noise", "noise", "pred_latent", "latent", "model_output", "model_target")
GENERATED_KEYS = ("latent", "pred_latent")  # what names the generator's own sample, which D scores


@dataclass(frozen=True)
class LossType:
    keys: tuple[str, ...]  # what a term's `key` may name
    targets: tuple[str, ...] | None  # what its `target` may name; None: the term reads no target


LOSS_TYPES: dict[str, LossType] = {}


def accept_loss_type(name: str, keys, targets=None) -> None:
    """Accept `name` in configs, its `key` one of `keys` and its `target` one of `targets` (None: any)."""
    rule = LossType(tuple(keys), None if targets is None else tuple(targets))
    if LOSS_TYPES.get(name, rule) != rule:
        raise ValueError(f"loss type {name!r} is already accepted with other keys: {LOSS_TYPES[name]}")
    LOSS_TYPES[name] = rule


accept_loss_type("MSELoss", OUTPUT_KEYS, OUTPUT_KEYS)
accept_loss_type("DiscriminatorLoss", GENERATED_KEYS)
accept_loss_type("DistributionMatchingLoss", ("latent",))
