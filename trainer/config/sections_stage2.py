"""Config sections of stage 2's iterations: their own knobs (stage2) and distribution matching's fake
score (stage2.distribution_matching). The discriminator's sections are sections_discriminator.py."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Optional

from trainer.config import optimizer_fields as optim
from trainer.config.loss_types import BEST_METRICS
from trainer.config.schema import error_at, option


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
    reuse_generator_samples: bool = option(
        False,
        "One of the n_fake updates trains on the generator step's own samples (detached) instead of a "
        "fresh rollout: n_fake - 1 updates before the generator step, one after it (as in DMD2). Needs "
        "batch_size null (the generator's rollout batch).",
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
    backward_simulation: bool = option(
        False,
        "Rollout mode, K > 1: each rollout batch (the generator's and each fake-score update's) stops at a "
        "step j drawn uniformly from the K, runs steps 0..j-1 without gradient and takes the x0 prediction "
        "of step j (one UNet call with gradient) as its sample (DMD2's backward simulation); validation, "
        "the summary and the grids still sample all K steps. Needs rollout_grad_steps 1.",
    )
    real_batch: str = option(
        "auto",
        "The generator step's noised reals: auto runs them only when a loss term (MSE) or the sample "
        "source (x0_pred) reads them; always runs them in every step (the path before 2026-12-07, kept "
        "to measure against).",
        choices=("auto", "always"),
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
    recipes: Optional[dict[str, dict[str, Any]]] = option(
        None,
        "Settings by step count: {K: {config path: value}}; the recipe of the run's generation_steps "
        "replaces the file's own values, flags and --set still win (docs/STAGE2.md#a-recipe-per-step-count).",
    )
    mse_skip_sampler_timesteps: bool = option(
        False,
        "Train the MSE batch on no timestep the K-step sampler visits (generation_steps, "
        "scheduler.timestep_spacing): a drawn timestep that is one is redrawn, per sample, "
        "uniformly from the others. Validation keeps every timestep.",
    )

    def check(self, where, prefix):
        if self.backward_simulation and self.generator_loss_mode != "rollout":
            raise error_at(
                where,
                f"{prefix}.backward_simulation",
                "false when generator_loss_mode is x0_pred (it has no rollouts)",
                True,
            )
        if self.backward_simulation and self.rollout_grad_steps != 1:
            raise error_at(
                where,
                f"{prefix}.rollout_grad_steps",
                "1 when backward_simulation is true (its one UNet call keeps the gradient)",
                self.rollout_grad_steps,
            )
        dm = self.distribution_matching
        if dm.reuse_generator_samples and dm.batch_size not in (None, self.rollout_batch_size):
            raise error_at(
                where,
                f"{prefix}.distribution_matching.batch_size",
                "null when reuse_generator_samples is true (the reused batch is the generator's rollout "
                "batch, stage2.rollout_batch_size)",
                dm.batch_size,
            )
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
