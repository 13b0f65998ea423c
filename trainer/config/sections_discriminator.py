"""Config sections of the stage-2 discriminator: its architecture and its training (the latent D, the
online D and the feature head on the fake score), and the feature head's cross-section rules."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

from trainer.config import optimizer_fields as optim
from trainer.config.critic_types import CRITIC_TYPES
from trainer.config.schema import error_at, option


@dataclass
class DiscriminatorArch:
    type: str = option(
        "latent",
        "latent: a conv net on the latents (the fields below). unet_features: a small classifier "
        "head on the distribution-matching fake score's UNet bottleneck (its mid-block output), "
        "trained in the fake score's updates; needs a DistributionMatchingLoss term "
        "(docs/STAGE2.md#feature-discriminator).",
        choices=CRITIC_TYPES,
    )
    head_channels: int = option(64, "unet_features: channels of the head's two conv layers.", ge=1)
    latent_channels: int = option(4, "Channels of the latents D scores; must equal the AE's.", ge=1)
    base_channels: int = option(64, "Channels of D's first layer; doubled at each level.", ge=1)
    num_layers: int = option(
        3, "Stride-2 conv levels; the latent side must be divisible by 2**num_layers.", ge=1
    )
    max_channels: int = option(512, "Cap on channels per level.", ge=1)
    norm: str = option(
        "group",
        "Normalisation that is safe under DDP (statistics never depend on the batch).",
        choices=("none", "group"),
    )
    use_batch_norm: Optional[bool] = option(
        None,
        "Compatibility field of older configs: true selects norm 'group' "
        "(batch norm is not batch-independent, so it is not offered).",
    )
    noise_conditioned: bool = option(False, "Condition D on the diffusion timestep of its input.")
    dropout: float = option(0.0, "Dropout before D's output layer.", ge=0, le=1)
    conditional: bool = option(
        False,
        "Class-conditional model: D scores (latent, label) pairs with a projection head (the inner "
        "product of a class embedding with D's pooled features, added to its logit).",
    )


@dataclass
class DiscriminatorTraining:
    loss: str = option(
        "bce",
        "D loss: BCE-with-logits, non-saturating (same D side, softplus generator side), or hinge.",
        choices=("bce", "non_saturating", "hinge"),
    )
    r1_gamma: float = option(0.0, "R1 gradient penalty weight on real latents (0 disables).", ge=0)
    epochs: int = option(50, "Epochs over D's training split per iteration (--discriminator_epochs).", ge=1)
    max_steps: Optional[int] = option(None, "Cap on D steps per iteration (--discriminator_max_steps).", ge=1)
    batch_size: int = option(
        64, "Global D batch, half real and half fake (--discriminator_batch_size).", ge=2
    )
    eval_interval: Optional[int] = option(
        None, "D steps between validations; default once per epoch (--discriminator_eval_interval).", ge=1
    )
    learning_rate: float = optim.learning_rate(2e-4, "D learning rate (AdamW).")
    weight_decay: float = optim.weight_decay(0.0, "D weight decay.")
    betas: list[float] = optim.betas((0.5, 0.999), "D Adam betas.")
    max_grad_norm: float = option(0.0, "D gradient clipping norm (0 disables).", ge=0)
    train_split: float = option(
        0.8, "Fraction of each class (real, fake) D trains on; the rest validates.", gt=0, lt=1
    )
    warm_start: bool = option(
        False,
        "Start each iteration's D from the previous iteration's best D (online "
        "mode: the previous iteration's final online D).",
    )
    mode: str = option(
        "offline",
        "offline: one D per iteration, trained on the saved fakes, then frozen during the "
        "fine-tune. online: that D is the warm start, and during the fine-tune D takes n_critic "
        "steps per generator step on fresh rollouts of the current model against the iteration's "
        "reals (rollout mode only); D is frozen during each generator step.",
        choices=("offline", "online"),
    )
    n_critic: int = option(1, "Online mode: D steps per generator step.", ge=1)
    online_batch_size: Optional[int] = option(
        None,
        "Online mode: global D batch per D step, half real and half fresh fakes; default batch_size.",
        ge=2,
    )
    noise_inputs: bool = option(
        False,
        "Forward-noise D's inputs (both classes, and the generated samples it scores "
        "in the generator loss) to a random timestep t < noise_max_timestep x num_steps "
        "and pass t; needs discriminator.config.noise_conditioned.",
    )
    noise_max_timestep: float = option(
        0.5, "noise_inputs: timesteps are drawn uniformly from [0, this x num_steps).", gt=0, le=1
    )
    feature_t_min: Optional[float] = option(
        None,
        "unet_features: the head's inputs (reals, fakes and the generator's samples) are noised to "
        "t drawn uniformly from [feature_t_min, feature_t_max) x num_steps; default "
        "stage2.distribution_matching.t_min.",
        gt=0,
        le=1,
    )
    feature_t_max: Optional[float] = option(
        None,
        "unet_features: upper end of that range; default stage2.distribution_matching.t_max.",
        gt=0,
        le=1,
    )
    feature_loss_weight: float = option(
        0.01,
        "unet_features: weight of the head's classification loss (with R1) beside the denoising loss in "
        "each fake-score update. The head's own parameters learn at its learning rate whatever the "
        "weight (AdamW); it sets how much the classification shapes the fake score's shared encoder.",
        gt=0,
    )

    def check(self, where, prefix):
        optim.check_betas(self, where, prefix)


@dataclass
class DiscriminatorConfig:
    config: DiscriminatorArch = option(doc="Discriminator architecture.", factory=DiscriminatorArch)
    training: DiscriminatorTraining = option(
        doc="Discriminator training in stage 2.", factory=DiscriminatorTraining
    )

    def check(self, where, prefix):
        if self.training.noise_inputs and not self.config.noise_conditioned:
            raise error_at(
                where,
                f"{prefix}.config.noise_conditioned",
                "true when training.noise_inputs is true",
                self.config.noise_conditioned,
            )


def feature_t_range(cfg) -> tuple[float, float]:
    """(t_min, t_max) of the feature discriminator's noise levels: its own, else the DM term's."""
    td, dm = cfg.discriminator.training, cfg.stage2.distribution_matching
    lo = dm.t_min if td.feature_t_min is None else td.feature_t_min
    return lo, dm.t_max if td.feature_t_max is None else td.feature_t_max


def check_feature_discriminator(cfg, where) -> None:
    """One line for what a unet_features discriminator cannot run with (the whole config is needed)."""
    d, td = cfg.discriminator.config, cfg.discriminator.training
    if d.type != "unet_features":
        return
    if not any(t.type == "DistributionMatchingLoss" for t in cfg.training.loss.losses):
        raise error_at(
            where,
            "discriminator.config.type",
            "latent when training.loss has no DistributionMatchingLoss term (unet_features classifies "
            "the fake score's features, which only that term trains)",
            d.type,
        )
    refusals = (
        ("mode", "offline", "its head always trains in the fake score's updates, online by nature"),
        ("noise_inputs", False, "its inputs are always noised, to feature_t_min..feature_t_max"),
        (
            "warm_start",
            False,
            "no offline phase warms it; the head starts with the fake score each iteration",
        ),
    )
    for field, expected, why in refusals:
        if getattr(td, field) != expected:
            shown = str(expected).lower() if isinstance(expected, bool) else expected
            raise error_at(
                where,
                f"discriminator.training.{field}",
                f"{shown} when discriminator.config.type is unet_features ({why})",
                getattr(td, field),
            )
    lo, hi = feature_t_range(cfg)
    if not lo < hi:
        raise error_at(where, "discriminator.training.feature_t_max", f"a number > t_min ({lo})", hi)
