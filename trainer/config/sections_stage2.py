"""Config sections of stage 2, the adversarial fine-tuning: the latent discriminator (architecture and
training) and the iterations' own knobs."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

from trainer.config import optimizer_fields as optim
from trainer.config.critic_types import CRITIC_TYPES
from trainer.config.loss_types import BEST_METRICS
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


@dataclass
class DistributionMatchingConfig:
    """The DistributionMatchingLoss term's fake score (docs/STAGE2.md#distribution-matching)."""

    learning_rate: float = optim.learning_rate(1e-4, "Fake score learning rate (AdamW).")
    betas: list[float] = optim.betas((0.0, 0.99), "Fake score Adam betas.")
    weight_decay: float = optim.weight_decay(0.0, "Fake score weight decay.")
    max_grad_norm: float = option(1.0, "Fake score gradient clipping norm (0 disables).", ge=0)
    n_fake: int = option(
        5,
        "Fake score updates per generator step, each on fresh K-step samples of the current generator.",
        ge=1,
    )
    batch_size: Optional[int] = option(
        None,
        "Global batch of each fake score update; default stage2.rollout_batch_size (or training.batch_size).",
        ge=1,
    )
    t_min: float = option(
        0.02,
        "Generator signal: noise levels t are drawn uniformly from [t_min, t_max) x num_steps.",
        gt=0,
        le=1,
    )
    t_max: float = option(0.98, "Upper end of the generator signal's noise levels (see t_min).", gt=0, le=1)
    warm_start_steps: int = option(
        0,
        "Fake score (and feature head) updates on the iteration's N saved fakes before the fine-tune's "
        "first generator step, so the generator's first signal comes from a fake score that has seen its "
        "samples (0: none).",
        ge=0,
    )
    carry_over: bool = option(
        False,
        "Iteration k+1's fake score (and feature head) starts from iteration k's last weights instead of "
        "the stage-1 EMA weights (measured on the digits: no better at K = 4, worse at K = 1).",
    )

    def check(self, where, prefix):
        optim.check_betas(self, where, prefix)
        if not self.t_min < self.t_max:
            raise error_at(where, f"{prefix}.t_max", f"a number > t_min ({self.t_min})", self.t_max)


@dataclass
class Stage2Config:
    num_samples: int = option(5000, "Real and fake latents per iteration (--num_samples).", ge=2)
    num_iterations: int = option(3, "Adversarial iterations (--num_iterations).", ge=1)
    diffusion_epochs: int = option(
        50, "Epochs over the reals' training split per iteration (--diffusion_epochs).", ge=1
    )
    diffusion_max_steps: Optional[int] = option(
        None, "Cap on diffusion steps per iteration (--diffusion_max_steps).", ge=1
    )
    diffusion_eval_interval: Optional[int] = option(
        None,
        "Diffusion steps between validations (a metrics row and checkpoints); default once per epoch.",
        ge=1,
    )
    generation_batch_size: int = option(
        32, "Fakes per DDIM batch, per process (--generation_batch_size).", ge=1
    )
    generation_steps: int = option(
        100, "DDIM steps for fakes, rollouts and grids (--generation_steps).", ge=1
    )
    eta: float = option(0.0, "DDIM eta (0: deterministic).", ge=0, le=1)
    guidance_scale: Optional[float] = option(
        None,
        "Class-conditional model: classifier-free guidance scale of the fakes, rollouts, grids and "
        "the summary's samples (1: the conditional model alone). null: 1. Refused for an "
        "unconditional model.",
        ge=0,
    )
    train_steps: Optional[list[int]] = option(
        None,
        "Rollout mode: the DDIM step counts the fine-tune trains at. Each rollout batch (the generator's, "
        "and each fake-score or online-D update's) draws its K from this list, so one fine-tune makes a "
        "student for several step counts (e.g. [1, 4]); the fakes, validation, the summary and the grids "
        "stay at generation_steps. Default: [generation_steps].",
    )
    generator_loss_mode: str = option(
        "rollout",
        "What D scores in the generator loss: full DDIM rollouts (as D "
        "was trained on), or one-step x0 predictions from noised reals (and D is "
        "then trained on those).",
        choices=("rollout", "x0_pred"),
    )
    rollout_grad_steps: int = option(
        1, "Rollout mode: back-propagate through this many final DDIM steps.", ge=1
    )
    gradient_checkpointing: bool = option(
        False,
        "Gradient checkpointing for the fine-tune only (training."
        "gradient_checkpointing: stages 1 and 2): activations are recomputed in "
        "backward instead of stored, so back-propagating through many rollout "
        "steps (rollout_grad_steps = K for a K-step sampler) fits in memory on "
        "big models, for about one more forward per step.",
    )
    rollout_batch_size: Optional[int] = option(
        None, "Rollout mode: generated samples per step (global); default training.batch_size.", ge=1
    )
    x0_pred_max_timestep: float = option(
        1.0, "x0_pred mode: timesteps are drawn from [0, this x num_steps).", gt=0, le=1
    )
    continue_from: str = option(
        "latest",
        "Iteration k+1 starts from iteration k's latest or best checkpoint.",
        choices=("latest", "best"),
    )
    best_metric: str = option(
        "val_loss",
        "Validation metric that picks the best checkpoint of an iteration (D is "
        "fixed within an iteration, so it is comparable there). val_latent_fd: the latent FD "
        "of metric_samples fixed-seed samples at generation_steps against held-out reals, "
        "measured at every validation and on the starting weights, so an iteration that only "
        "regresses keeps its start as best.",
        choices=BEST_METRICS,
    )
    learning_rate: Optional[float] = option(
        None, "Fine-tuning learning rate; default training.learning_rate.", gt=0
    )
    warmup_steps: int = option(0, "Fine-tuning LR warm-up steps per iteration.", ge=0)
    lr_schedule: Optional[str] = option(
        None,
        "Fine-tuning LR schedule after warm-up, per iteration; default training.scheduler.type (stage 1's). "
        "constant suits iterations that continue from the latest weights; cosine_run is one cosine over "
        "all iterations' steps (iteration k continues the curve where k-1 left it, reaching 0 at the end).",
        choices=("cosine", "constant", "cosine_run"),
    )
    val_samples: int = option(
        64, "Fixed-seed generated samples scored by D at each validation (d_prob_fake).", ge=1
    )
    sample_with_replacement: bool = option(
        False, "Allow drawing reals with replacement when num_samples exceeds the manifest rows."
    )
    grid_samples: int = option(64, "Decoded samples in each iteration's grid (fixed seeds).", ge=0)
    metric_samples: int = option(
        1000,
        "Generated samples (and at most as many held-out reals) for the per-iteration quality summary.",
        ge=2,
    )
    metric_k: int = option(3, "k of the k-NN precision and recall.", ge=1)
    metric_features: str = option(
        "raw",
        "Extra feature space of the summary, beside raw latents and pixels: raw "
        "(none); classifier:PATH, the penultimate layer of an advdiff classifier "
        "(`advdiff classifier` trains one; cls_fd, cls_precision, cls_recall); or "
        "inception:PATH, a TorchScript file (torch.jit.save) or exported program "
        "(torch.export.save, dynamic batch) mapping images in [-1, 1], (N, 3, 299, 299), "
        "to Inception-v3 pool features (inception_* columns; grey images are repeated to "
        "3 channels). Both score decoded fakes against "
        "AE-reconstructed held-out reals; PATH is relative to the config's folder; "
        "nothing is downloaded.",
    )
    metric_bootstrap: int = option(
        100,
        "Resamples of the generated set for the 95% bootstrap intervals "
        "latent_fd_lo/hi and cls_fd_lo/hi (main process; per row on a CPU about "
        "0.1 s at 64 dimensions, 0.6 s at 256, 20 s at 1024); 0 disables.",
        ge=0,
    )
    adaptive_weight: bool = option(
        False,
        "Scale the adversarial weight at each validation to keep D's accuracy "
        "on (held-out reals, generated samples) inside adaptive_band.",
    )
    adaptive_band: list[float] = option(
        doc="Target band of D accuracy for adaptive_weight.", factory=lambda: [0.5, 0.7]
    )
    adaptive_factor: float = option(
        1.5, "Multiplier applied to the weight per validation outside the band.", gt=1
    )
    grad_ratio_weight: bool = option(
        False,
        "Scale the adversarial term at every step by the ratio of the MSE "
        "term's gradient norm to the adversarial term's, both at the UNet's last "
        "layer (as in VQGAN and CTM), clamped to grad_ratio_max and averaged over "
        "processes; the configured weight multiplies it. Column train_adv_ratio. "
        "Not under DeepSpeed (it takes gradients outside the engine's backward).",
    )
    grad_ratio_max: float = option(10.0, "Upper clamp of the gradient-norm ratio.", gt=0)
    distribution_matching: DistributionMatchingConfig = option(
        doc="The fake score of a DistributionMatchingLoss term in training.loss (rollout mode only).",
        factory=DistributionMatchingConfig,
    )
    mse_skip_sampler_timesteps: bool = option(
        False,
        "Train the MSE batch on no timestep the K-step sampler visits (generation_steps, "
        "scheduler.timestep_spacing): a drawn timestep that is one is redrawn, per sample, "
        "uniformly from the others. Validation keeps every timestep.",
    )

    def check(self, where, prefix):
        ks = self.train_steps
        if ks is not None and (
            not isinstance(ks, list) or not ks or not all(isinstance(k, int) and k >= 1 for k in ks)
        ):
            raise error_at(where, f"{prefix}.train_steps", "a non-empty list of integers >= 1 (or null)", ks)
        lo_hi = self.adaptive_band
        if len(lo_hi) != 2 or not 0 <= lo_hi[0] < lo_hi[1] <= 1:
            raise error_at(where, f"{prefix}.adaptive_band", "two numbers 0 <= low < high <= 1", lo_hi)
        kind, sep, path = self.metric_features.partition(":")
        if self.metric_features != "raw" and not (
            kind in ("classifier", "inception") and sep and path.strip()
        ):
            raise error_at(
                where,
                f"{prefix}.metric_features",
                "raw, classifier:PATH or inception:PATH",
                self.metric_features,
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
