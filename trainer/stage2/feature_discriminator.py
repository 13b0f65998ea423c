"""The feature discriminator (`discriminator.config.type: unet_features`, docs/STAGE2.md#feature-
discriminator): a classifier head on the bottleneck of the distribution-matching fake score's UNet
(models/feature_discriminator.py), as in DMD2.

It is trained in the fake score's own updates (stage2/distribution_matching.py): each of the n_fake updates
adds the head's classification loss (discriminator.training.loss, optional R1 on the noised reals), weighted
by feature_loss_weight, to the denoising loss, on the iteration's reals against the same fresh rollouts the
fake score denoises. Both classes are forward-noised to t in [feature_t_min, feature_t_max) x num_steps, and
the UNet gets that t: the features of a noised sample are what the fake score computes anyway, and noise
keeps the two classes' supports overlapping, so the head's gradient stays informative. Its gradient reaches
the fake score's encoder too: the UNet and the head are one module behind one wrapper (one DDP module, or
under DeepSpeed one engine) with one optimizer, the head in its own parameter group (the discriminator's
learning rate, betas and weight decay).

The generator's DiscriminatorLoss term scores its rollouts, noised the same way, through the encoder and
the head (`critic`), both frozen during the generator step.

Every draw is per sample slot: the noise and t from (seed parts, class, slot index), and the reals from a
per-epoch permutation of the global training reals (every rank holds all of them, gathered once per phase),
so the head's batches are the same at any world size and after a resume.

A class-conditional run's head is a projection head (discriminator.config.conditional): each real carries
its own class and each rollout its label, and the UNet's bottleneck takes the class embedding too.
"""

from __future__ import annotations

import contextlib

import numpy as np
import torch
from torch.nn.attention import SDPBackend, sdpa_kernel

from models.feature_discriminator import HEAD_FORMAT, FeatureHead, bottleneck_channels
from trainer.config.sections_stage2 import feature_t_range
from trainer.core.seeds import derive_seed
from trainer.diffusion.noise import per_sample_noise, per_sample_timesteps
from trainer.files import atomic
from trainer.parallel.collectives import gather_shards
from trainer.training.loop import walk_rows
from trainer.training.losses import d_loss, r1_term


def enabled(cfg) -> bool:
    return cfg.discriminator.config.type == "unet_features"


def fingerprint(cfg) -> dict:
    """The fields that define its training (the fine-tune's resume fingerprint's `feature_discriminator`)."""
    td = cfg.discriminator.training
    keys = ("loss", "r1_gamma", "learning_rate", "betas", "weight_decay", "feature_loss_weight")
    return {
        "head_channels": cfg.discriminator.config.head_channels,
        "t_range": list(feature_t_range(cfg)),
        **{k: getattr(td, k) for k in keys},
    }


def noised_between(schedule, z, idx, t_min: float, t_max: float, *parts):
    """(z_t, t): `z` forward-noised to t in [t_min, t_max) x num_steps per sample, noise and t drawn from
    (parts, idx[i]); differentiable in z."""
    n = schedule.num_steps
    lo = min(int(t_min * n), n - 1)
    hi = max(lo + 1, int(t_max * n))
    noise = per_sample_noise(idx, tuple(z.shape[1:]), *parts, "noise").to(z.device, z.dtype)
    t = (per_sample_timesteps(idx, hi - lo, *parts, "t") + lo).to(z.device)
    return schedule.add_noise(z, noise, t), t


def noised_for_head(cfg, schedule, z, idx, *parts):
    """A sample as the feature discriminator scores it (Rollouts.for_discriminator)."""
    return noised_between(schedule, z.float(), idx, *feature_t_range(cfg), *parts)


def new_head(cfg, unet_config: dict, num_classes: int = 0) -> FeatureHead:
    """A fresh head for a UNet of `unet_config`, seeded (it does not touch the global random state); a
    projection head of num_classes classes where discriminator.config.conditional is set."""
    classes = num_classes if cfg.discriminator.config.conditional else 0
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(derive_seed(cfg.training.seed, "init", "feature-head"))
        return FeatureHead(bottleneck_channels(unet_config), cfg.discriminator.config.head_channels, classes)


class FeatureDiscriminator:
    """The head's inputs and loss in the fake score's updates, and the critic of the generator's term.
    `module` (a ScoreWithHead) is set by the DistributionMatching that owns the fake score."""

    def __init__(
        self, acc, cfg, schedule, real_local: torch.Tensor, real_train: np.ndarray, batch: int, labels=None
    ):
        """real_local: this rank's reals (its shard_range block of the iteration's reals); real_train: the
        global train mask; batch: the fake-score update's global batch (as many reals as fakes); labels: a
        class-conditional run's classes of real_local."""
        self.acc, self.cfg, self.schedule, self.batch = acc, cfg, schedule, batch
        n = int(real_train.shape[0])
        self.reals = gather_shards(real_local.to(acc.device).float(), n).cpu()
        self.labels = None  # every real's class, gathered like the reals (as floats: exact for classes)
        if labels is not None:
            self.labels = gather_shards(labels.to(acc.device).float().reshape(-1, 1), n).cpu().long()[:, 0]
        self.train_idx = np.flatnonzero(real_train)
        self.module = None

    # -- the fake score's updates ------------------------------------------------------------------
    def draw_reals(self, idx, draw: int, seed, stage) -> torch.Tensor:
        """The reals of slots idx in the phase's draw-th head batch: slot i takes place draw x batch + i of
        a walk over per-epoch permutations of the training reals (the same at any world size)."""
        walk = walk_rows(len(self.train_idx), idx, draw, self.batch, seed, stage, "feature-real")
        rows = self.train_idx[walk]
        return self.reals[rows], None if self.labels is None else self.labels[rows]

    def inputs(self, fake, idx, parts, draw: int, fake_labels=None):
        """(x, t, real_in, labels): the head's batch of this rank's slots idx, reals then fakes, both noised;
        real_in is the noised reals (requiring grad where R1 needs their input gradient); labels: a
        class-conditional run's classes of the batch (the reals' own, then `fake_labels`), else None."""
        real, real_labels = self.draw_reals(idx, draw, parts[0], parts[1])
        real = real.to(fake.device)
        zr, tr = noised_for_head(self.cfg, self.schedule, real, idx, *parts, "real")
        zf, tf = noised_for_head(self.cfg, self.schedule, fake.detach(), idx, *parts, "fake")
        if self.cfg.discriminator.training.r1_gamma > 0:
            zr = zr.detach().requires_grad_(True)
        y = None if real_labels is None else torch.cat([real_labels.to(fake.device), fake_labels])
        return torch.cat([zr, zf]), torch.cat([tr, tf]), zr, y

    def forward_context(self):
        """Around the update's forward: R1 differentiates the input gradient, through the UNet's attention
        too, and only PyTorch's math attention kernel has that double backward (flash and memory-efficient
        kernels do not); without R1 any kernel."""
        if self.cfg.discriminator.training.r1_gamma > 0:
            return sdpa_kernel([SDPBackend.MATH])
        return contextlib.nullcontext()

    def loss(self, logits: torch.Tensor, real_in: torch.Tensor):
        """(weighted loss, logs): the head's classification loss of logits (reals first), with R1."""
        td = self.cfg.discriminator.training
        n = len(real_in)
        if n == 0:  # a process without a slot of its own
            return logits.sum() * 0.0, {"d_loss": float("nan"), "d_acc": float("nan")}
        lr_, lf = logits[:n].float(), logits[n:].float()
        loss = d_loss(td.loss, lr_, lf)
        if td.r1_gamma > 0:
            loss = loss + td.r1_gamma * r1_term(lr_, real_in)
        acc_ = ((lr_ > 0).float().sum() + (lf < 0).float().sum()) / len(logits)
        logs = {"d_loss": float(loss.detach()), "d_acc": float(acc_)}
        return td.feature_loss_weight * loss, logs

    # -- the generator's term and validation ---------------------------------------------------------
    def __call__(self, z: torch.Tensor, t: torch.Tensor, class_labels=None) -> torch.Tensor:
        """Logits of (already noised) samples z at t (with a class-conditional run's labels), through the
        fake score's encoder and the head (the plain modules: no wrapper hooks; frozen in the generator
        step)."""
        with self.acc.autocast():
            return self.module.logits(z.float(), t, class_labels).float()

    @contextlib.contextmanager
    def frozen(self):
        """The UNet's and the head's parameters take no gradient inside (the generator step)."""
        self.module.requires_grad_(False)
        try:
            yield
        finally:
            self.module.requires_grad_(True)

    def export(self, path, unet_weights: dict, head_weights: dict, unet_config: dict, k: int, step: int):
        """The encoder and head as they stand at the end of the phase (main process writes)."""
        if self.acc.is_main_process:
            atomic.save_torch(
                {
                    "format": HEAD_FORMAT,
                    "unet_config": unet_config,
                    "unet": unet_weights,
                    "head_config": self.module.head.config,
                    "head": head_weights,
                    "iteration": k,
                    "step": step,
                    "inputs": {"kind": "noised", "t_range": list(feature_t_range(self.cfg))},
                },
                path,
            )
