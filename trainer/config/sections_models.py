"""Config sections of the networks' architecture: the autoencoder (and its stage-0 training), the diffusion
UNet and its noise schedule."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

from trainer.config import optimizer_fields as optim
from trainer.config.schema import error_at, option


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
    learning_rate: float = optim.learning_rate(2e-3, "AdamW learning rate.")
    weight_decay: float = optim.weight_decay(0.0, "AdamW weight decay.")
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
    num_class_embeds: Optional[int] = option(
        None,
        "Class-conditional UNet: the number of classes C of dataset.label_column (the UNet gets C + 1 "
        "class embeddings, the last the null label of training.label_dropout). null: unconditional.",
        ge=1,
    )


@dataclass
class SchedulerConfig:
    type: str = option(
        "cosine", "Noise schedule (diffusers beta schedule).", choices=("linear", "scaled_linear", "cosine")
    )
    num_steps: int = option(1000, "Training diffusion steps.", ge=2)
    prediction_type: str = option(
        "v_prediction", "What the UNet predicts.", choices=("v_prediction", "epsilon")
    )
    timestep_spacing: Optional[str] = option(
        None,
        "DDIM timestep spacing, stored in the model's scheduler config: trailing starts K-step sampling "
        "at t = T-1, leading (diffusers' default) at T - T/K. null: a new stage-1 model stores trailing; "
        "stage 2 and the commands that read a checkpoint keep its own (leading for models written before "
        "this field); a value overrides it.",
        choices=("leading", "trailing", "linspace"),
    )
