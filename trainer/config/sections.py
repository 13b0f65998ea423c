"""The typed advdiff config. YAML only stores it; every field has a doc and a default.

Top-level sections: experiment, diffusion, autoencoder, discriminator, dataset, unet, scheduler and
training (the stage-2 README's layout), then stage2 and performance for the knobs of their own.
`Config` and the training and performance sections are here; the others are in sections_io (experiment,
diffusion, dataset), sections_models (autoencoder, unet, scheduler) and sections_discriminator (discriminator)
and sections_stage2 (stage2), and every one is importable from here.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

from trainer.config import optimizer_fields as optim
from trainer.config.loss_types import LOSS_TYPES, logged_parts
from trainer.config.schema import error_at, option, to_dict
from trainer.config.sections_discriminator import (
    DiscriminatorArch,
    DiscriminatorConfig,
    DiscriminatorTraining,
    check_feature_discriminator,
)
from trainer.config.sections_io import DatasetConfig, DatasetOutputs, DiffusionConfig, ExperimentConfig
from trainer.config.sections_models import (
    AutoencoderConfig,
    AutoencoderModelConfig,
    AutoencoderTrainConfig,
    SchedulerConfig,
    UNetConfig,
)
from trainer.config.sections_stage2 import DistributionMatchingConfig, Stage2Config


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
    learning_rate: float = optim.learning_rate(5e-5, "Peak learning rate.")
    optimizer: str = option("AdamW", "Optimizer.", choices=("AdamW", "Adam"))
    weight_decay: float = optim.weight_decay(0.1, "Decoupled weight decay.")
    betas: list[float] = optim.betas((0.9, 0.999), "Adam betas.")
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
    label_dropout: float = option(
        0.1,
        "Class-conditional stage 1: the probability that a sample's label is replaced by the null "
        "label, which classifier-free guidance (stage2.guidance_scale) needs; 0 trains no null label.",
        ge=0,
        lt=1,
    )
    loss: LossConfig = option(doc="Diffusion loss (CompositeLoss).", factory=LossConfig)

    def check(self, where, prefix):
        optim.check_betas(self, where, prefix)

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
    discriminator: DiscriminatorConfig = option(
        doc="Discriminator: on the latents, or a head on the fake score's UNet features.",
        factory=DiscriminatorConfig,
    )
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
        if self.stage2.train_steps and self.stage2.generator_loss_mode != "rollout":
            raise error_at(
                where,
                "stage2.train_steps",
                "null when stage2.generator_loss_mode is x0_pred (it has no rollouts to sample at K steps)",
                self.stage2.train_steps,
            )
        if self.discriminator.training.mode == "online" and self.stage2.generator_loss_mode != "rollout":
            raise error_at(
                where,
                "discriminator.training.mode",
                "offline when stage2.generator_loss_mode is "
                f"{self.stage2.generator_loss_mode} (online D trains on fresh rollouts)",
                "online",
            )

        for i, term in enumerate(self.training.loss.losses):
            if term.type != "DistributionMatchingLoss":
                continue
            if term.weight <= 0:  # its fake score costs n_fake updates per step: leave the term out instead
                path = f"training.loss.losses[{i}].weight"
                raise error_at(where, path, "a positive weight (drop the term to turn it off)", term.weight)
            if self.stage2.generator_loss_mode != "rollout":
                raise error_at(
                    where,
                    f"training.loss.losses[{i}].type",
                    "another term when stage2.generator_loss_mode is x0_pred (distribution matching "
                    "moves the generator's own K-step samples, which only rollout mode makes)",
                    term.type,
                )
        check_feature_discriminator(self, where)
        metric, parts = self.stage2.best_metric, logged_parts(self.training.loss.losses)
        if metric not in ("val_loss", "val_latent_fd") and metric[len("val_") :] not in parts:
            logged = ", ".join(["val_loss", *(f"val_{p}" for p in parts), "val_latent_fd"])
            expected = f"one of {logged} (what this run's loss logs)"
            raise error_at(where, "stage2.best_metric", expected, metric)

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


__all__ = [
    "AutoencoderConfig",
    "AutoencoderModelConfig",
    "AutoencoderTrainConfig",
    "Config",
    "DatasetConfig",
    "DatasetOutputs",
    "DiffusionConfig",
    "DiscriminatorArch",
    "DiscriminatorConfig",
    "DiscriminatorTraining",
    "DistributionMatchingConfig",
    "ExperimentConfig",
    "LOSS_TYPES",
    "LRScheduleConfig",
    "LossConfig",
    "LossTerm",
    "PerformanceConfig",
    "SchedulerConfig",
    "Stage2Config",
    "TrainingConfig",
    "UNetConfig",
]
