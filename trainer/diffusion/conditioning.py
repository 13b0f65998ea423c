"""Class conditioning of a diffusion model: what a conditional model records, and its output under
classifier-free guidance.

A class-conditional advdiff UNet is a diffusers UNet2DModel with `num_class_embeds = C + 1`: classes
0..C-1 are the data's, and class C is the null label that stage 1's label dropout
(`training.label_dropout`) trains as "no class", which classifier-free guidance needs. A diffusers folder
from elsewhere with `num_class_embeds = M` and no advdiff record has M classes and no null label, so it
samples at guidance scale 1 only.

Guidance at scale w: out = out(null) + w * (out(y) - out(null)), on the model's own output (epsilon or v,
both linear in the score), so w = 1 is the conditional output exactly (one forward, no null pass).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

import torch


@dataclass(frozen=True)
class Conditioning:
    """What a class-conditional model records (checkpoints, pipeline folders, the run)."""

    num_classes: int  # C, the data's classes
    class_names: tuple  # C names (trainer.data.labels.class_names_of)
    null_class: int | None  # C where stage 1 trained a null label, None for a model without one
    label_dropout: float = 0.0

    def to_dict(self) -> dict:
        d = asdict(self)
        d["class_names"] = list(self.class_names)
        return d

    @staticmethod
    def from_dict(d: dict | None) -> "Conditioning | None":
        if not d:
            return None
        return Conditioning(
            num_classes=int(d["num_classes"]),
            class_names=tuple(str(n) for n in d["class_names"]),
            null_class=None if d.get("null_class") is None else int(d["null_class"]),
            label_dropout=float(d.get("label_dropout", 0.0)),
        )

    @staticmethod
    def of_unet_config(unet_config: dict, recorded: dict | None = None) -> "Conditioning | None":
        """The conditioning a UNet config stands for: the record where there is one, else M classes and
        no null label for `num_class_embeds = M`; None for an unconditional UNet."""
        if recorded:
            return Conditioning.from_dict(recorded)
        m = unet_config.get("num_class_embeds")
        if not m:
            return None
        return Conditioning(int(m), tuple(str(i) for i in range(int(m))), None, 0.0)

    @staticmethod
    def new(class_names, label_dropout: float) -> "Conditioning":
        """A stage-1 model's: C classes and the null label C (its embedding is trained by label dropout)."""
        names = tuple(str(n) for n in class_names)
        return Conditioning(len(names), names, len(names), float(label_dropout))

    @property
    def num_class_embeds(self) -> int:
        return self.num_classes + (self.null_class is not None)

    def guidable(self) -> bool:
        """Whether classifier-free guidance at a scale other than 1 means anything for this model."""
        return self.null_class is not None and self.label_dropout > 0


def model_output(unet, x, t, labels=None, scale: float = 1.0, null_class: int | None = None):
    """The UNet's output at (x, t) for class labels `labels` (None: an unconditional model) under
    classifier-free guidance at `scale` (1: the conditional output, one forward)."""
    if labels is None:
        return unet(x, t).sample
    labels = labels.to(x.device)
    if scale == 1.0:
        return unet(x, t, class_labels=labels).sample
    if null_class is None:
        raise ValueError("guidance scale other than 1 needs a model with a null class")
    n = x.shape[0]
    tt = torch.as_tensor(t, device=x.device)
    tt = tt.reshape(1).expand(n) if tt.dim() == 0 else tt
    both = unet(
        torch.cat([x, x]),
        torch.cat([tt, tt]),
        class_labels=torch.cat([labels, torch.full_like(labels, null_class)]),
    ).sample
    cond, uncond = both[:n], both[n:]
    return uncond + scale * (cond - uncond)
