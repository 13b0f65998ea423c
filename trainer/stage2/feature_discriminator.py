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

from models.feature_discriminator import HEAD_FORMAT, FeatureHead, ScoreWithHead, bottleneck_channels
from models.unet import unet_from_config
from trainer.config.sections_discriminator import feature_t_range
from trainer.core.seeds import derive_seed
from trainer.diffusion.noise import noised_between
from trainer.files import atomic
from trainer.parallel import engine
from trainer.parallel.collectives import gather_shards
from trainer.stage2.critic_step import critic_loss, r1_inputs
from trainer.stage2.critics import Critic
from trainer.stage2.discriminator_trainer import D_HISTORY_FIELDS
from trainer.training.loop import walk_rows


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


def noised_for_head(cfg, schedule, z, idx, *parts):
    """A sample as the feature discriminator scores it (its view, in the step and in validation)."""
    return noised_between(schedule, z.float(), idx, *feature_t_range(cfg), *parts)


def new_head(cfg, unet_config: dict, num_classes: int = 0) -> FeatureHead:
    """A fresh head for a UNet of `unet_config`, seeded (it does not touch the global random state); a
    projection head of num_classes classes where discriminator.config.conditional is set."""
    classes = num_classes if cfg.discriminator.config.conditional else 0
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(derive_seed(cfg.training.seed, "init", "feature-head"))
        return FeatureHead(bottleneck_channels(unet_config), cfg.discriminator.config.head_channels, classes)


class FeatureCritic(Critic):
    """The head's inputs and loss in the fake score's updates, and the critic of the generator's term. It
    lives on the fake score (host "fake_score"): the DistributionMatching helper mounts `head` on its UNet
    and sets `module` (the ScoreWithHead) and `mount` (itself), whose updates train it and whose state holds
    its weights."""

    host = "fake_score"
    host_columns = ["train_d_loss", "train_d_acc"]  # what the host's updates log for it

    def __init__(self, ctx, batch: int):
        """batch: the fake-score update's global batch (as many reals as fakes)."""
        accelerator, cfg = ctx.accelerator, ctx.cfg
        self.acc, self.cfg, self.schedule, self.batch = accelerator, cfg, ctx.schedule, batch
        self.path, self.k = ctx.layout.discriminator_features(ctx.k), ctx.k
        self.unet_config = ctx.base.unet_config
        self.history_path = ctx.layout.discriminator_history(ctx.k)
        n = int(ctx.real_train.shape[0])
        self.reals = gather_shards(ctx.real.to(accelerator.device).float(), n).cpu()
        self.labels = None  # every real's class, gathered like the reals (as floats: exact for classes)
        if ctx.real_labels is not None:
            y = ctx.real_labels.to(accelerator.device).float().reshape(-1, 1)
            self.labels = gather_shards(y, n).cpu().long()[:, 0]
        self.train_idx = np.flatnonzero(ctx.real_train)
        classes = 0 if ctx.labels is None else ctx.labels.conditioning.num_classes
        self.head = new_head(cfg, ctx.base.unet_config, classes)
        self.module = self.mount = None  # set by the helper that mounts it

    @classmethod
    def build(cls, ctx, d):
        from trainer.stage2.distribution_matching import batch_size

        return cls(ctx, batch_size(ctx.cfg))

    @classmethod
    def fingerprint_of(cls, cfg) -> dict:
        return {"feature_discriminator": fingerprint(cfg)}

    @classmethod
    def summary_discriminator(cls, s, k: int):
        """The head iteration k's fine-tune ended with, as the summary scores samples (FeatureScorer)."""
        blob = torch.load(s.layout.discriminator_features(k), map_location="cpu", weights_only=True)
        return FeatureScorer(blob, s.schedule, s.cfg.training.seed)

    def view(self, sample, idx, *parts):
        return noised_for_head(self.cfg, self.schedule, sample, idx, *parts)

    @property
    def param_group(self) -> dict:
        """The head's parameter group in the host's optimizer: the discriminator's lr, betas, decay."""
        td = self.cfg.discriminator.training
        head = {"lr": td.learning_rate, "betas": tuple(td.betas), "weight_decay": td.weight_decay}
        return {"params": list(self.head.parameters()), **head}

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
        zr = r1_inputs(self.cfg.discriminator.training, zr)
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
        if len(real_in) == 0:  # a process without a slot of its own
            return logits.sum() * 0.0, {"d_loss": float("nan"), "d_acc": float("nan")}
        loss, accuracy = critic_loss(td, logits, real_in)
        logs = {"d_loss": float(loss.detach()), "d_acc": float(accuracy)}
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

    def export(self, run) -> None:
        """The encoder and head as they stand at the end of the phase (call on every rank; main writes)."""
        unet = engine.state_dict(self.mount.acc, self.mount.fake)
        head = engine.state_dict(self.mount.acc, self.module.head)
        if self.acc.is_main_process:
            atomic.save_torch(
                {
                    "format": HEAD_FORMAT,
                    "unet_config": self.unet_config,
                    "unet": unet,
                    "head_config": self.module.head.config,
                    "head": head,
                    "iteration": self.k,
                    "step": run.step,
                    "inputs": {"kind": "noised", "t_range": list(feature_t_range(self.cfg))},
                },
                self.path,
            )
            self.write_history(run)

    def write_history(self, run) -> None:
        """The head's history in the offline D's layout (discriminator_iter_k/discriminator_history.csv):
        its training loss and accuracy and its validation accuracy on the generator's samples against
        reals, at the fine-tune's validations (main process)."""
        names = {"train_loss": "train_d_loss", "train_acc": "train_d_acc", "val_acc": "d_val_acc"}
        names.update({key: key for key in ("epoch", "step", "seconds", "nonfinite_skipped")})
        nan = float("nan")
        rows = [{key: row.get(names.get(key), nan) for key in D_HISTORY_FIELDS} for row in run.history]
        atomic.write_csv(rows, self.history_path, D_HISTORY_FIELDS)


class FeatureScorer(torch.nn.Module):
    """An exported feature discriminator (discriminator_features.pt) as the summary scores samples: each
    noised to its own t in the head's range, noise and t drawn from the seed and the sample's global index
    (`takes_index`: the evaluator passes them), then the fake score's encoder and the head."""

    takes_index = True

    def __init__(self, blob: dict, schedule, seed: int):
        super().__init__()
        with torch.random.fork_rng(devices=[]):  # building it leaves the run's random state alone
            unet, head = unet_from_config(blob["unet_config"]), FeatureHead(**blob["head_config"])
        unet.load_state_dict(blob["unet"])
        head.load_state_dict(blob["head"])
        self.module, self.schedule, self.seed = ScoreWithHead(unet, head), schedule, seed
        self.t_range = tuple(blob["inputs"]["t_range"])

    @torch.no_grad()
    def forward(self, z, t=None, y=None, index=None):
        z_t, t_z = noised_between(self.schedule, z.float(), index, *self.t_range, self.seed, "summary-d")
        return self.module.logits(z_t, t_z, y)
