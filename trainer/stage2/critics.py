"""The critics of the fine-tune: whatever scores the generator's samples for its DiscriminatorLoss term.

A critic is a Helper (helpers.py) with a view of the samples and logits:

  view(sample, idx, *parts)      (z, t): a generator sample as the critic scores it in the step
  val_view(sample, idx, *parts)  (z, t): a sample as validation has the critic score it
  critic(z, t, y=None)           logits of viewed samples (with a class-conditional run's labels)
  offline_phase                  whether each iteration first trains a latent D offline
                                 (discriminator_trainer.py), which the critic is built from
  summary_discriminator(s, k)    the D the summary row of iteration k's result is scored by (None:
                                 the summary's d_acc and d_prob_fake stay empty)
  host                           the helper whose network it lives on (None: its own), which mounts it

It is chosen from a registry by (discriminator.config.type, discriminator.training.mode) (`register_critic`;
the built-ins: registry.py):
  latent, offline        LatentCritic: the iteration's offline D, frozen for the whole phase
  latent, online         OnlineCritic (online.py): that D keeps training before each generator step
  unet_features, offline FeatureCritic (feature_discriminator.py): a head on the fake score's bottleneck,
                         trained in the fake score's updates

A new critic is one class with these hooks, one `register_critic` call and, for a new type name, one
`accept_critic_type` (trainer/config/critic_types.py).
"""

from __future__ import annotations

from trainer.diffusion.noise import noised_inputs
from trainer.stage2.discriminator_trainer import load_discriminator
from trainer.stage2.helpers import Helper

CRITICS: dict[tuple[str, str], type] = {}


def register_critic(kind: str, mode: str, cls: type) -> type:
    """Make `cls` the critic of discriminator.config.type `kind` in discriminator.training.mode `mode`."""
    CRITICS[(kind, mode)] = cls
    return cls


def critic_class(cfg) -> type:
    d = cfg.discriminator
    return CRITICS[(d.config.type, d.training.mode)]


def latent_view(cfg, schedule, sample, idx, *parts):
    """(sample, t) as a latent D scores it in the step: forward-noised (still differentiable) where it was
    trained on noised inputs (discriminator.training.noise_inputs), else as it is with t None."""
    td = cfg.discriminator.training
    if not td.noise_inputs:
        return sample, None
    return noised_inputs(schedule, sample.float(), idx, td.noise_max_timestep, *parts)


class Critic(Helper):
    name = "discriminator"
    offline_phase = False
    host = None

    def view(self, sample, idx, *parts):
        raise NotImplementedError

    def val_view(self, sample, idx, *parts):
        return self.view(sample, idx, *parts)

    def __call__(self, z, t, y=None):
        raise NotImplementedError

    @classmethod
    def summary_discriminator(cls, s, k: int):
        """s: the run's Stage2Setup."""
        return None


class LatentCritic(Critic):
    """The iteration's offline D, frozen: gradients reach the UNet through it, never it itself."""

    offline_phase = True

    def __init__(self, ctx, d):
        self.cfg, self.schedule = ctx.cfg, ctx.schedule
        d.requires_grad_(False)
        self.d = d.to(ctx.accelerator.device).eval()

    @classmethod
    def build(cls, ctx, d):
        """None without an offline D (a fine-tune built without one scores nothing)."""
        return None if d is None else cls(ctx, d)

    @classmethod
    def fingerprint_of(cls, cfg) -> dict:
        td = cfg.discriminator.training
        return {"discriminator": online_fields(td)} if td.noise_inputs else {}

    @classmethod
    def summary_discriminator(cls, s, k: int):
        """The D the iteration's fine-tune ended with: the online D where one was trained, else the best."""
        online = s.layout.discriminator_online(k)
        return load_discriminator(online if online.is_file() else s.layout.discriminator_best(k))

    def view(self, sample, idx, *parts):
        return latent_view(self.cfg, self.schedule, sample, idx, *parts)

    def val_view(self, sample, idx, *parts):
        """Validation scores clean samples (t None)."""
        return sample, None

    def __call__(self, z, t, y=None):
        return self.d(z, t) if y is None else self.d(z, t, y)


# the online (or noise-conditioned) discriminator's training fields in the fine-tune's fingerprint
ONLINE_D_KEYS = (
    "mode",
    "n_critic",
    "online_batch_size",
    "noise_inputs",
    "noise_max_timestep",
    "loss",
    "r1_gamma",
    "learning_rate",
    "betas",
    "weight_decay",
)


def online_fields(td) -> dict:
    return {k: getattr(td, k) for k in ONLINE_D_KEYS}
