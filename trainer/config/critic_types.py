"""The critic types a config may name in `discriminator.config.type`. The config is a lower layer than
stage 2: trainer.stage2.critics.register_critic implements a critic, and a new type name is accepted here
through `accept_critic_type`, with no change to the config's sections.

The built-in types are named here, so that a config validates without stage 2 loaded."""

from __future__ import annotations

# the field's choices: the schema reads this list when it validates, so an accepted type is valid at once
CRITIC_TYPES: list[str] = ["latent", "unet_features"]


def accept_critic_type(name: str) -> None:
    """Accept `name` as discriminator.config.type."""
    if name not in CRITIC_TYPES:
        CRITIC_TYPES.append(name)
