"""A latent-space discriminator that returns logits, optionally conditioned on the noise level and, for a
class-conditional model, on the class label by projection: the logit gets the inner product of a learnt class
embedding with D's pooled features (Miyato & Koyama, 2018), so D judges a (latent, label) pair."""

from __future__ import annotations

import math

import torch
from torch import nn


def timestep_embedding(t: torch.Tensor, dim: int, max_period: float = 10000.0) -> torch.Tensor:
    half = dim // 2
    freqs = torch.exp(-math.log(max_period) * torch.arange(half, device=t.device, dtype=torch.float32) / half)
    args = t.float()[:, None] * freqs[None]
    return torch.cat([torch.cos(args), torch.sin(args)], dim=-1)


def class_embedding(num_classes: int, channels: int) -> nn.Embedding:
    """A projection head's class embedding, initialised small (unit-norm rows in expectation)."""
    embed = nn.Embedding(num_classes, channels)
    nn.init.normal_(embed.weight, std=channels**-0.5)
    return embed


def projected(logit: torch.Tensor, embed: nn.Embedding, class_labels, pooled: torch.Tensor, what: str):
    """`logit` plus the projection term: the inner product of each sample's class embedding with its pooled
    features; `what` names the module in the error for missing labels."""
    if class_labels is None:
        raise ValueError(f"a class-conditional {what} needs the samples' class labels")
    return logit + (embed(class_labels.to(pooled.device)) * pooled).sum(dim=1).to(logit.dtype)


def _norm(kind: str, ch: int) -> nn.Module:
    if kind == "group":
        # GroupNorm's statistics are per sample, so they do not depend on the batch (or its split
        # across ranks, or on real and fake batches being separate), unlike BatchNorm.
        return nn.GroupNorm(min(32, ch // 4) if ch >= 4 else 1, ch)
    return nn.Identity()


class LatentDiscriminator(nn.Module):
    """Stride-2 conv levels, global average pool, linear head. Output: one logit per sample."""

    def __init__(
        self,
        latent_channels: int = 4,
        base_channels: int = 64,
        num_layers: int = 3,
        max_channels: int = 512,
        norm: str = "group",
        noise_conditioned: bool = False,
        dropout: float = 0.0,
        num_classes: int = 0,
    ):
        super().__init__()
        self.config = dict(
            latent_channels=latent_channels,
            base_channels=base_channels,
            num_layers=num_layers,
            max_channels=max_channels,
            norm=norm,
            noise_conditioned=noise_conditioned,
            dropout=dropout,
        )
        if num_classes:  # stored only for a conditional D: configs of unconditional ones stay as they were
            self.config["num_classes"] = num_classes
        self.stem = nn.Conv2d(latent_channels, base_channels, 3, padding=1)
        self.noise_conditioned = noise_conditioned
        if noise_conditioned:
            self.t_embed = nn.Sequential(
                nn.Linear(base_channels, base_channels * 2),
                nn.SiLU(),
                nn.Linear(base_channels * 2, base_channels),
            )
        levels = []
        ch = base_channels
        for _ in range(num_layers):
            out = min(ch * 2, max_channels)
            levels.append(
                nn.Sequential(
                    _norm(norm, ch),
                    nn.SiLU(),
                    nn.Conv2d(ch, out, 4, stride=2, padding=1),
                    _norm(norm, out),
                    nn.SiLU(),
                    nn.Conv2d(out, out, 3, padding=1),
                )
            )
            ch = out
        self.levels = nn.Sequential(*levels)
        self.head = nn.Sequential(nn.SiLU(), nn.Dropout(dropout), nn.Linear(ch, 1))
        self.num_classes = num_classes
        if num_classes:
            self.class_embed = class_embedding(num_classes, ch)

    def forward(
        self, z: torch.Tensor, timesteps: torch.Tensor | None = None, class_labels: torch.Tensor | None = None
    ) -> torch.Tensor:
        h = self.stem(z)
        if self.noise_conditioned:
            if timesteps is None:
                timesteps = torch.zeros(z.shape[0], device=z.device)
            h = h + self.t_embed(timestep_embedding(timesteps, h.shape[1]))[:, :, None, None]
        pooled = self.levels(h).mean(dim=(2, 3))
        logit = self.head(pooled).squeeze(1)
        if not self.num_classes:
            return logit
        return projected(logit, self.class_embed, class_labels, nn.functional.silu(pooled), "discriminator")


def build_discriminator(cfg, num_classes: int = 0) -> LatentDiscriminator:
    """Build from a `DiscriminatorArch`-like object or a dict of its fields (a saved config's `num_classes`,
    or the argument, makes a class-conditional D)."""
    get = cfg.get if isinstance(cfg, dict) else (lambda k, d=None: getattr(cfg, k, d))
    return LatentDiscriminator(
        latent_channels=get("latent_channels"),
        base_channels=get("base_channels"),
        num_layers=get("num_layers"),
        max_channels=get("max_channels", 512),
        norm=get("norm", "group"),
        noise_conditioned=get("noise_conditioned", False),
        dropout=get("dropout", 0.0),
        num_classes=get("num_classes", 0) or num_classes,
    )
