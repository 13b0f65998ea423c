"""The class labels of a class-conditional stage 2: which label each fake, real and rollout carries.

  fakes     draw_labels: the data's class frequencies exactly, in a seeded order over the N global indices,
            so every world size draws the same N labels; saved beside the fakes (fake_labels.pt)
  reals     the class of each real's manifest row (real_labels.pt)
  rollouts  one label per rollout index from the data's class frequencies, from the batch's seed parts
  MSE batch the real latents' own labels, each dropped to the null label with the stage-1 model's label
            dropout (so the null label, which guidance needs, keeps its meaning)

Samples are drawn at stage2.guidance_scale (classifier-free guidance; 1 by default).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from trainer.data.labels import class_counts, draw_labels, dropped_labels, per_sample_labels
from trainer.diffusion.conditioning import Conditioning


@dataclass(frozen=True)
class RunLabels:
    conditioning: Conditioning
    counts: np.ndarray  # rows per class in the filtered manifest
    row_labels: np.ndarray  # each manifest row's class
    scale: float  # stage2.guidance_scale

    @staticmethod
    def of(cfg, conditioning: Conditioning | None, rows) -> "RunLabels | None":
        if conditioning is None:
            return None
        idx = np.asarray(rows["label_index"], dtype=np.int64)
        scale = cfg.stage2.guidance_scale
        return RunLabels(
            conditioning,
            class_counts(idx, conditioning.num_classes),
            idx,
            1.0 if scale is None else float(scale),
        )

    @property
    def null_class(self):
        return self.conditioning.null_class

    def fakes(self, n: int, seed: int, k: int) -> torch.Tensor:
        """The N fakes' labels of iteration k (every rank computes all N)."""
        return draw_labels(n, self.counts, seed, "fake", k)

    def of_rows(self, picked) -> torch.Tensor:
        return torch.from_numpy(self.row_labels[np.asarray(picked, dtype=np.int64)])

    def rollouts(self, idx, *parts) -> torch.Tensor:
        return per_sample_labels(idx, self.counts, *parts)

    def dropped(self, labels: torch.Tensor, positions, *parts) -> torch.Tensor:
        c = self.conditioning
        return dropped_labels(labels, positions, c.label_dropout, c.null_class, *parts)

    def sampling(self, labels: torch.Tensor | None) -> dict:
        """ddim_sample's keywords for samples with these labels."""
        return dict(class_labels=labels, guidance_scale=self.scale, null_class=self.null_class)
