"""The typed advdiff config. YAML only stores it; every field has a doc and a default.

Top-level sections: experiment, diffusion, autoencoder, discriminator, dataset, unet, scheduler and
training (the stage-2 README's layout), then stage2 and performance for the knobs of their own.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional

from trainer.config.loss_types import LOSS_TYPES
from trainer.config.schema import error_at, option, to_dict


@dataclass
class ExperimentConfig:
    name: str = option("advdiff", "Experiment name; prefixes checkpoint and metric file names.")
    save_path: str = option("runs/advdiff", "Output folder; every output of the run lives under it.")

    def check(self, where, prefix):
        if not self.name or any(c in self.name for c in "/\\"):
            raise error_at(where, f"{prefix}.name", "a non-empty name without slashes", self.name)


@dataclass
class DiffusionConfig:
    stage1_checkpoint: Optional[str] = option(None, "Stage-1 checkpoint (.pt) that stage 2 fine-tunes.")


@dataclass
class AutoencoderModelConfig:
    in_channels: int = option(1, "Image channels (1 grey, 3 RGB).", ge=1)
    latent_channels: int = option(4, "Latent channels of the autoencoder.", ge=1)
    block_out_channels: list[int] = option(
        doc="Channels per encoder level; 2**(levels-1) is the downsampling.", factory=lambda: [16, 32, 32]
    )
    layers_per_block: int = option(1, "ResNet layers per level.", ge=1)
    norm_num_groups: int = option(8, "GroupNorm groups; must divide every channel count.", ge=1)
    sample_size: int = option(32, "Image resolution the autoencoder is trained at.", ge=1)

    def check(self, where, prefix):
        for i, ch in enumerate(self.block_out_channels):
            if ch < 1 or ch % self.norm_num_groups:
                raise error_at(
                    where,
                    f"{prefix}.block_out_channels[{i}]",
                    f"a positive multiple of norm_num_groups ({self.norm_num_groups})",
                    ch,
                )


@dataclass
class AutoencoderTrainConfig:
    max_steps: int = option(300, "Optimizer steps for stage 0 (autoencoder training).", ge=1)
    batch_size: int = option(64, "Global batch size (split across processes).", ge=1)
    learning_rate: float = option(2e-3, "AdamW learning rate.", gt=0)
    weight_decay: float = option(0.0, "AdamW weight decay.", ge=0)
    kl_weight: float = option(1e-6, "Weight of the KL term against the reconstruction MSE.", ge=0)
    warmup_steps: int = option(20, "Linear warm-up steps before the cosine decay.", ge=0)
    eval_interval: int = option(100, "Steps between validation passes (and checkpoints).", ge=1)
    log_interval: int = option(50, "Steps between status lines.", ge=1)


@dataclass
class AutoencoderConfig:
    checkpoint: Optional[str] = option(None, "Frozen AE: a diffusers AutoencoderKL folder or an advdiff .pt.")
    frozen: bool = option(True, "Keep the AE frozen in stages 1 and 2 (only true is supported).")
    scaling: str = option(
        "config",
        "Latent scaling: from the AE config, or measured on the training data.",
        choices=("config", "measure"),
    )
    encode_batch_size: int = option(64, "Images per encoder forward pass, per process.", ge=1)
    model: AutoencoderModelConfig = option(doc="Architecture for stage 0.", factory=AutoencoderModelConfig)
    training: AutoencoderTrainConfig = option(doc="Stage-0 optimisation.", factory=AutoencoderTrainConfig)

    def check(self, where, prefix):
        if not self.frozen:
            raise error_at(where, f"{prefix}.frozen", "true (the AE is never trained in stages 1-2)", False)


@dataclass
class DiscriminatorArch:
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
    learning_rate: float = option(2e-4, "D learning rate (AdamW).", gt=0)
    weight_decay: float = option(0.0, "D weight decay.", ge=0)
    betas: list[float] = option(doc="D Adam betas.", factory=lambda: [0.5, 0.999])
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
        choices=("val_loss", "val_mse", "val_adv", "val_latent_fd"),
    )
    learning_rate: Optional[float] = option(
        None, "Fine-tuning learning rate; default training.learning_rate.", gt=0
    )
    warmup_steps: int = option(0, "Fine-tuning LR warm-up steps per iteration.", ge=0)
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

    def check(self, where, prefix):
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


@dataclass
class DatasetOutputs:
    latent: str = option(
        "latent_path", "Manifest column with pre-embedded latents (.pt), used where present."
    )


@dataclass
class DatasetConfig:
    manifest: Optional[str] = option(
        None,
        "Manifest CSV (relative paths in it resolve against its folder), or a "
        "folder of images: every .png/.jpg/.jpeg/.bmp/.webp/.gif/.tif/.tiff under it "
        "(any case; hidden files and folders skipped), sorted by relative path, as "
        "the CSV `advdiff manifest DIR` writes; filters may then only name "
        "image_column.",
    )
    image_column: str = option("image_path", "Manifest column holding image paths.")
    outputs: DatasetOutputs = option(doc="Output columns of the manifest.", factory=DatasetOutputs)
    filters: dict[str, list[Any]] = option(doc="Keep rows whose column value is in the list.", factory=dict)
    resolution: Optional[int] = option(
        None, "Resize images to this side; default: the AE's sample_size.", ge=1
    )


@dataclass
class UNetConfig:
    preset: Optional[str] = option(
        None, "A named preset (see `advdiff models`); other fields then override it."
    )
    in_channels: Optional[int] = option(None, "Latent channels in; default: the AE's latent channels.", ge=1)
    out_channels: Optional[int] = option(None, "Latent channels out; default: in_channels.", ge=1)
    base_channels: Optional[int] = option(None, "Channels at the first level.", ge=1)
    depth: Optional[int] = option(None, "Number of resolution levels.", ge=1)
    channel_mult: Optional[list[int]] = option(None, "Channel multiplier per level; default 1, 2, 4, 8, ...")
    num_res_blocks: Optional[int] = option(None, "ResNet blocks per level.", ge=1)
    attention: Optional[bool] = option(None, "Self-attention at the lowest resolution.")
    time_dim: Optional[int] = option(None, "Timestep embedding width; default 4 x base_channels.", ge=1)
    norm_groups: Optional[int] = option(None, "GroupNorm groups.", ge=1)
    dropout: Optional[float] = option(None, "Dropout inside ResNet blocks.", ge=0, le=1)
    sample_size: Optional[int] = option(None, "Latent side; default: derived from the AE.", ge=1)


@dataclass
class SchedulerConfig:
    type: str = option(
        "cosine", "Noise schedule (diffusers beta schedule).", choices=("linear", "scaled_linear", "cosine")
    )
    num_steps: int = option(1000, "Training diffusion steps.", ge=2)
    prediction_type: str = option(
        "v_prediction", "What the UNet predicts.", choices=("v_prediction", "epsilon")
    )


@dataclass
class LRScheduleConfig:
    type: str = option("cosine", "LR schedule after warm-up.", choices=("cosine", "constant"))
    warmup_steps: int = option(0, "Linear warm-up steps.", ge=0)


@dataclass
class LossTerm:
    type: str = option("MSELoss", "Registered loss type.")
    key: str = option("pred_noise", "Model output the term reads.")
    target: Optional[str] = option("noise", "Target it compares against (null for DiscriminatorLoss).")
    weight: float = option(1.0, "Weight of the term in the sum.", ge=0)

    def check(self, where, prefix):
        rule = LOSS_TYPES.get(self.type)
        if rule is None:
            raise error_at(where, f"{prefix}.type", "one of " + ", ".join(LOSS_TYPES), self.type)
        if self.key not in rule.keys:
            raise error_at(where, f"{prefix}.key", "one of " + ", ".join(rule.keys), self.key)
        if rule.targets is not None and self.target not in rule.targets:
            raise error_at(where, f"{prefix}.target", "one of " + ", ".join(rule.targets), self.target)


@dataclass
class LossConfig:
    type: str = option(
        "CompositeLoss", "Only CompositeLoss: a weighted sum of terms.", choices=("CompositeLoss",)
    )
    losses: list[LossTerm] = option(doc="The weighted terms.", factory=lambda: [LossTerm()])

    def check(self, where, prefix):
        if not self.losses:
            raise error_at(where, f"{prefix}.losses", "at least one loss term", [])
        if not any(t.weight > 0 for t in self.losses):
            raise error_at(
                where,
                f"{prefix}.losses",
                "at least one term with a positive weight",
                [t.weight for t in self.losses],
            )


@dataclass
class TrainingConfig:
    seed: int = option(42, "Seed of every random draw (noise, timesteps, batches).", ge=0)
    train_split: float = option(
        0.8, "Fraction of manifest rows used for training; the rest validates.", gt=0, le=1
    )
    split_seed: int = option(0, "Seed of the shuffled train/val split.", ge=0)
    batch_size: int = option(64, "Global batch size (divided across processes).", ge=1)
    num_workers: int = option(0, "DataLoader workers for image decoding.", ge=0)
    learning_rate: float = option(5e-5, "Peak learning rate.", gt=0)
    optimizer: str = option("AdamW", "Optimizer.", choices=("AdamW", "Adam"))
    weight_decay: float = option(0.1, "Decoupled weight decay.", ge=0)
    betas: list[float] = option(doc="Adam betas.", factory=lambda: [0.9, 0.999])
    use_amp: Optional[bool] = option(
        None, "Compatibility field of older configs: true means mixed_precision bf16 unless set."
    )
    mixed_precision: Optional[str] = option(
        None, "no, fp16 or bf16 (accelerate); the AE always runs in fp32.", choices=("no", "fp16", "bf16")
    )
    max_grad_norm: float = option(0.5, "Gradient clipping norm (0 disables).", ge=0)
    gradient_checkpointing: bool = option(
        False,
        "Recompute the UNet's activations in backward instead of storing "
        "them, stage 1 and 2: less memory, about one more forward per step.",
    )
    gradient_accumulation_steps: int = option(
        1,
        "UNet steps in N micro-batches of the same samples and draws: ~N x "
        "less activation memory, same update; not under DeepSpeed.",
        ge=1,
    )
    max_nonfinite_steps: int = option(
        5,
        "Every stage (0, 1, 2's D and diffusion phases) skips a step whose loss "
        "(on any process) or gradient norm is NaN/Inf; after this many skipped "
        "steps in a row the run stops (exit 2), keeping the last checkpoint.",
        ge=1,
    )
    deterministic: bool = option(
        False,
        "GPU: deterministic kernels (torch.use_deterministic_algorithms, no cuDNN "
        "autotuning, CUBLAS_WORKSPACE_CONFIG) so training repeats bit for bit; slower. "
        "CPU runs repeat either way.",
    )
    scheduler: LRScheduleConfig = option(doc="Learning-rate schedule.", factory=LRScheduleConfig)
    max_steps: int = option(1000, "Stage-1 optimizer steps.", ge=1)
    ema_decay: float = option(0.999, "EMA decay of the exported weights (0 disables EMA).", ge=0, le=1)
    eval_interval: int = option(
        250, "Steps between validation passes, best-checkpoint choice and resume states.", ge=1
    )
    log_interval: int = option(50, "Steps between status lines.", ge=1)
    sample_steps: int = option(25, "DDIM steps for the stage-1 sample grid.", ge=1)
    loss: LossConfig = option(doc="Diffusion loss (CompositeLoss).", factory=LossConfig)

    def check(self, where, prefix):
        if len(self.betas) != 2 or not all(0 <= b < 1 for b in self.betas):
            raise error_at(where, f"{prefix}.betas", "two numbers in [0, 1)", self.betas)

    def resolved_mixed_precision(self) -> str:
        if self.mixed_precision is not None:
            return self.mixed_precision
        return "bf16" if self.use_amp else "no"


@dataclass
class PerformanceConfig:
    """Speed switches. None of them changes the maths beyond rounding; defaults are measured
    (docs/PERFORMANCE.md). CUDA-only switches do nothing on CPU."""

    tf32: bool = option(
        True,
        "CUDA: TF32 tensor-core matrix products and convolutions for fp32 work (products "
        "keep about 3 significant digits; bf16/fp16 runs are unaffected).",
    )
    channels_last: bool = option(False, "Channels-last memory format for the UNet and D (CUDA convolutions).")
    fused_optimizer: bool = option(
        True, "CUDA: fused AdamW/Adam kernels (one launch per step instead of several per parameter)."
    )
    compile_generation: bool = option(
        False,
        "torch.compile the generation UNet (compiles once per batch shape; "
        "pays off only for long generation passes).",
    )


@dataclass
class Config:
    experiment: ExperimentConfig = option(doc="Name and output folder.", factory=ExperimentConfig)
    diffusion: DiffusionConfig = option(doc="Stage-1 checkpoint for stage 2.", factory=DiffusionConfig)
    autoencoder: AutoencoderConfig = option(
        doc="Frozen autoencoder (and its stage-0 training).", factory=AutoencoderConfig
    )
    discriminator: DiscriminatorConfig = option(doc="Latent discriminator.", factory=DiscriminatorConfig)
    dataset: DatasetConfig = option(doc="Manifest and filters.", factory=DatasetConfig)
    unet: UNetConfig = option(doc="Diffusion UNet architecture.", factory=UNetConfig)
    scheduler: SchedulerConfig = option(doc="Noise schedule.", factory=SchedulerConfig)
    training: TrainingConfig = option(doc="Diffusion optimisation.", factory=TrainingConfig)
    stage2: Stage2Config = option(doc="Adversarial fine-tuning (stage 2).", factory=Stage2Config)
    performance: PerformanceConfig = option(
        doc="Speed switches (measured defaults).", factory=PerformanceConfig
    )

    # Where the config came from; relative paths in it resolve against this folder.
    source: Optional[str] = option(None, "Set by the loader: the YAML file this config came from.")

    def check(self, where, prefix):
        d = self.discriminator.config
        if d.use_batch_norm:
            d.norm = "group"
        if self.discriminator.training.noise_inputs and self.stage2.generator_loss_mode != "rollout":
            raise error_at(
                where,
                "discriminator.training.noise_inputs",
                "false when stage2.generator_loss_mode is "
                f"{self.stage2.generator_loss_mode} (x0_pred fakes carry their own timesteps)",
                True,
            )
        if self.discriminator.training.mode == "online" and self.stage2.generator_loss_mode != "rollout":
            raise error_at(
                where,
                "discriminator.training.mode",
                "offline when stage2.generator_loss_mode is "
                f"{self.stage2.generator_loss_mode} (online D trains on fresh rollouts)",
                "online",
            )

    def resolve_path(self, value: Optional[str]) -> Optional[Path]:
        """Resolve a path from the config: absolute as is, relative against the YAML's folder."""
        if value is None:
            return None
        p = Path(os.path.expanduser(value))
        if p.is_absolute() or self.source is None:
            return p
        return Path(self.source).parent / p

    @property
    def out_dir(self) -> Path:
        return self.resolve_path(self.experiment.save_path)

    def to_dict(self) -> dict:
        d = to_dict(self)
        d.pop("source", None)
        return d
