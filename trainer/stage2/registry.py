"""The built-in helpers of the fine-tune, registered, and the one place that builds a phase's helpers.

Critics by (discriminator.config.type, discriminator.training.mode) (critics.py), the helpers loss terms
name by their `helper` (helpers.py). `build_helpers` makes the critic first (a critic that lives on another
helper's network is mounted by that helper as it is built), then each term's helper, in the terms' order:
the list the fine-tune loops over.
"""

from __future__ import annotations

from trainer.stage2.critics import LatentCritic, critic_class, register_critic
from trainer.stage2.distribution_matching import DistributionMatching
from trainer.stage2.feature_discriminator import FeatureCritic
from trainer.stage2.helpers import register_helper, term_helper_classes
from trainer.stage2.online import OnlineCritic

register_critic("latent", "offline", LatentCritic)
register_critic("latent", "online", OnlineCritic)
register_critic("unet_features", "offline", FeatureCritic)
register_helper("distribution_matching", DistributionMatching)


def build_helpers(ctx, d) -> list:
    """The phase's helpers: [the critic (none where it needs an offline D and d is None), *the terms']."""
    ctx.critic = critic_class(ctx.cfg).build(ctx, d)
    helpers = [] if ctx.critic is None else [ctx.critic]
    return helpers + [cls.build(ctx) for cls in term_helper_classes(ctx.cfg)]


def fingerprint_of(cfg) -> dict:
    """The helpers' parts of the fine-tune's resume fingerprint."""
    out = dict(critic_class(cfg).fingerprint_of(cfg))
    for cls in term_helper_classes(cfg):
        out.update(cls.fingerprint_of(cfg))
    return out


def carried_init(cfg, layout, k: int, log) -> dict:
    """What iteration k's helpers start from of iteration k-1 (by helper name), each logged."""
    init = {}
    for cls in term_helper_classes(cfg):
        found = cls.carry(cfg, layout, k) if k > 0 else None
        if found is not None:
            init[cls.name], what = found
            log(f"iteration {k}: {what} continues from iteration {k - 1}'s last weights")
    return init
