"""A discriminator on a diffusion UNet's own features: a small classifier head on the bottleneck (the
mid-block output) of a diffusers UNet2DModel, which stage 2 puts on the distribution-matching fake score
(trainer/stage2/feature_discriminator.py, docs/STAGE2.md#feature-discriminator).

`unet_bottleneck` runs only the UNet's encoder half (time embedding, conv_in, down blocks, mid block), so
scoring a sample costs about half a UNet forward; `ScoreWithHead` holds the UNet and the head as one
module, so that one wrapper (DDP or a DeepSpeed engine) trains both in one backward.
"""

from __future__ import annotations

import math

import torch
from torch import nn

from models.discriminator import class_embedding, projected

HEAD_FORMAT = "advdiff.feature_discriminator"


def unet_bottleneck(unet, x: torch.Tensor, t: torch.Tensor, class_labels=None) -> torch.Tensor:
    """The mid-block output of UNet2DModel `unet` at (x, t) (the last down block's where it has no mid
    block), with a class-conditional UNet's class embedding of `class_labels`; the same steps as the model's
    own forward up to there."""
    if unet.config.center_input_sample:
        x = 2 * x - 1.0
    t = torch.as_tensor(t, device=x.device)
    t = t.reshape(-1) * torch.ones(x.shape[0], dtype=t.dtype, device=x.device)
    emb = unet.time_embedding(unet.time_proj(t).to(dtype=unet.dtype))
    if unet.class_embedding is not None:
        if class_labels is None:
            raise ValueError("a class-conditional UNet's bottleneck needs the samples' class labels")
        emb = emb + unet.class_embedding(class_labels).to(dtype=emb.dtype)
    skip, h = x, unet.conv_in(x)
    for block in unet.down_blocks:
        if hasattr(block, "skip_conv"):
            h, _, skip = block(hidden_states=h, temb=emb, skip_sample=skip)
        else:
            h, _ = block(hidden_states=h, temb=emb)
    return unet.mid_block(h, emb) if unet.mid_block is not None else h


def bottleneck_channels(unet_config: dict) -> int:
    return int(unet_config["block_out_channels"][-1])


def _group_norm(ch: int) -> nn.GroupNorm:
    return nn.GroupNorm(math.gcd(32, ch), ch)  # per-sample statistics: no batch dependence under DDP


class FeatureHead(nn.Module):
    """Two 3x3 conv layers (GroupNorm, SiLU), a global average pool, a linear layer: one logit per sample.
    With num_classes, a projection term too (the inner product of a class embedding with the pooled
    features), so that it judges (sample, label) pairs."""

    def __init__(self, in_channels: int, channels: int = 64, num_classes: int = 0):
        super().__init__()
        self.config = {"in_channels": in_channels, "channels": channels}
        if num_classes:
            self.config["num_classes"] = num_classes
        self.num_classes = num_classes
        self.body = nn.Sequential(
            _group_norm(in_channels),
            nn.SiLU(),
            nn.Conv2d(in_channels, channels, 3, padding=1),
            _group_norm(channels),
            nn.SiLU(),
            nn.Conv2d(channels, channels, 3, padding=1),
            _group_norm(channels),
            nn.SiLU(),
        )
        self.out = nn.Linear(channels, 1)
        if num_classes:
            self.class_embed = class_embedding(num_classes, channels)

    def forward(self, features: torch.Tensor, class_labels: torch.Tensor | None = None) -> torch.Tensor:
        pooled = self.body(features).mean(dim=(2, 3))
        logit = self.out(pooled).squeeze(1)
        if not self.num_classes:
            return logit
        return projected(logit, self.class_embed, class_labels, pooled, "head")


class ScoreWithHead(nn.Module):
    """A score UNet with a classifier head on its bottleneck. forward(x, t) is the UNet's own output (what
    a caller of the bare UNet gets); forward(x, t, x_cls, t_cls) also classifies x_cls at t_cls and returns
    (the UNet's output sample, the logits)."""

    def __init__(self, unet, head: FeatureHead):
        super().__init__()
        self.unet, self.head = unet, head

    def logits(self, x: torch.Tensor, t: torch.Tensor, class_labels=None) -> torch.Tensor:
        return self.head(unet_bottleneck(self.unet, x, t, class_labels), class_labels)

    def forward(self, x, t, x_cls=None, t_cls=None, class_labels=None, cls_labels=None):
        """class_labels: x's classes, cls_labels: x_cls's (a class-conditional UNet's; else None)."""
        out = self.unet(x, t, class_labels=class_labels)
        if x_cls is None:
            return out
        return out.sample, self.logits(x_cls, t_cls, cls_labels)
