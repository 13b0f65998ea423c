"""The discriminator phase of a stage-2 iteration: train a latent discriminator, real vs fake, on per-rank
shards.

Balance: every rank owns the same global index range of reals and of fakes, so its shard holds
(up to one sample) equal numbers of each, and each step takes half of its batch from each class.
The train/val split is drawn per class over global indices (shuffled, fixed seed), so the
validation set always holds both classes. Steps per epoch are fixed from the global counts, so
every rank runs the same number of steps (DDP needs that).
"""

from __future__ import annotations

import time

import numpy as np
import torch

from models.discriminator import build_discriminator
from trainer.core.errors import UserError
from trainer.core.seeds import derive_seed
from trainer.diffusion.noise import noised_inputs
from trainer.files import atomic
from trainer.parallel import engine
from trainer.parallel.accelerator import prepare_module
from trainer.parallel.collectives import Totals, shard_range
from trainer.stage2.critic_step import critic_loss, r1_inputs
from trainer.stage2.samples import sample_source
from trainer.training.loop import StepTrainer, draw_local, local_weight
from trainer.training.losses import d_loss_terms
from trainer.training.optim import optimizer_from

D_FORMAT = "advdiff.discriminator"
D_HISTORY_FIELDS = [
    "epoch",
    "step",
    "train_loss",
    "train_acc",
    "val_loss",
    "val_acc",
    "val_real_acc",
    "val_fake_acc",
    "lr",
    "seconds",
    "nonfinite_skipped",
]


def save_d(accelerator, d, path, k: int, step: int, inputs: dict, metrics=None, mode=None) -> None:
    """A D file (call on every rank; main writes): D's config and weights, the iteration and step, what
    it was trained on (`inputs`: the sample source's d_inputs), and its metrics or its training mode."""
    weights = engine.state_dict(accelerator, d)
    if accelerator.is_main_process:
        blob = {"format": D_FORMAT, "config": d.config, "state_dict": weights, "iteration": k, "step": step}
        blob.update({"metrics": metrics} if mode is None else {"mode": mode})
        atomic.save_torch({**blob, "inputs": inputs}, path)


def load_discriminator(path):
    blob = torch.load(path, map_location="cpu", weights_only=True)
    d = build_discriminator(blob["config"])
    d.load_state_dict(blob["state_dict"])
    return d


# DiscriminatorTraining fields added later: in the resume fingerprint only when not at their defaults, so
# states written before them still resume
_LATER_FIELDS = {
    "mode": "offline",
    "n_critic": 1,
    "online_batch_size": None,
    "noise_inputs": False,
    "noise_max_timestep": 0.5,
}


def _fingerprinted(td) -> dict:
    return {k: v for k, v in td.__dict__.items() if k not in _LATER_FIELDS or v != _LATER_FIELDS[k]}


def check_r1_supported(accelerator, td) -> None:
    """R1 differentiates D's input gradient (a double backward); DeepSpeed's gradient hooks fire inside that
    inner backward and fail, so it is refused up front."""
    if td.r1_gamma > 0 and engine.is_deepspeed(accelerator):
        raise UserError(
            f"discriminator.training.r1_gamma: {td.r1_gamma} needs a double backward, which DeepSpeed's "
            "gradient hooks do not support; set it to 0 under DeepSpeed, or train with DDP"
        )


def d_fingerprint(cfg) -> dict:
    """The fields that define the offline D's training (its resume fingerprint)."""
    arch = cfg.discriminator.config
    return {
        # `conditional` only when set: states written before the field still resume
        "arch": {k: v for k, v in arch.__dict__.items() if k != "conditional" or v},
        "training": _fingerprinted(cfg.discriminator.training),
        "seed": cfg.training.seed,
        "num_samples": cfg.stage2.num_samples,
        "mode": sample_source(cfg).name,
    }


class DiscriminatorTrainer(StepTrainer):
    history_fields = D_HISTORY_FIELDS

    def __init__(
        self,
        accelerator,
        cfg,
        k: int,
        layout,
        real,
        fake,
        real_train,
        fake_train,
        real_t=None,
        fake_t=None,
        warm_start_from=None,
        schedule=None,
        real_labels=None,
        fake_labels=None,
        num_classes: int = 0,
    ):
        """real/fake: this rank's shards (own global range); *_train: global boolean train masks;
        *_t: timesteps for a noise-conditioned D (x0_pred mode), else None (t = 0); layout: the run's
        RunLayout; warm_start_from: a D export to start from; schedule: the diffusion model's noise
        schedule (needed by discriminator.training.noise_inputs); *_labels: a class-conditional run's
        classes of this rank's rows, which D sees with its inputs (a projection D, num_classes > 0, uses
        them)."""
        self.cfg, self.k, self.schedule = cfg, k, schedule
        td = cfg.discriminator.training
        if td.noise_inputs and (schedule is None or real_t is not None):
            raise ValueError("noise_inputs needs the noise schedule and rollout-mode fakes")
        max_steps = self._data(accelerator, real, fake, real_train, fake_train)
        self.real_t, self.fake_t = real_t, fake_t
        self.real_labels, self.fake_labels = real_labels, fake_labels
        interval = td.eval_interval or self.per_epoch
        arch = cfg.discriminator.config
        super().__init__(
            accelerator,
            stage=f"stage2_d{k}",
            phase_label=f"iteration {k}, discriminator phase",
            state_path=layout.discriminator_state(k),
            history_path=layout.discriminator_history(k),
            max_steps=max_steps,
            eval_interval=interval,
            log_interval=interval,
            seed=cfg.training.seed,
            fingerprint=d_fingerprint(cfg),
            max_nonfinite_steps=cfg.training.max_nonfinite_steps,
        )
        self.best_path = layout.discriminator_best(k)
        torch.manual_seed(derive_seed(cfg.training.seed, "init", "discriminator", k))
        self.d = build_discriminator(arch, num_classes=num_classes if arch.conditional else 0)
        if warm_start_from is not None:
            self.d.load_state_dict(load_discriminator(warm_start_from).state_dict())
            self.log(f"D warm-started from {warm_start_from}")
        self.d = prepare_module(self.d, cfg.performance, accelerator)
        opt = optimizer_from(self.d.parameters(), td, cfg.performance, accelerator)
        self.ddp_d, self.opt = engine.prepare(accelerator, self.d, opt, td.batch_size, td.max_grad_norm)
        self.t0 = time.time()

    def _data(self, accelerator, real, fake, real_train, fake_train) -> int:
        """This rank's reals and fakes, their train/validation positions; returns the phase's steps."""
        td = self.cfg.discriminator.training
        own = shard_range(real_train.shape[0], accelerator.process_index, accelerator.num_processes)
        self.own_start, self.real, self.fake = own.start, real, fake
        local = np.arange(own.start, own.stop)
        self.tr_real = np.flatnonzero(real_train[local])
        self.tr_fake = np.flatnonzero(fake_train[local])
        self.va_real = np.flatnonzero(~real_train[local])
        self.va_fake = np.flatnonzero(~fake_train[local])
        self.half = td.batch_size // 2
        self.per_epoch = max(1, int(real_train.sum()) // self.half)
        max_steps = td.epochs * self.per_epoch
        return max_steps if td.max_steps is None else min(max_steps, td.max_steps)

    def _draw(self, positions: np.ndarray, step: int, label: str) -> np.ndarray:
        """This rank's share of the class half-batch, from its own per-epoch permutation."""
        n_local = len(shard_range(self.half, self.rank, self.world))
        return draw_local(positions, n_local, step, self.per_epoch, self.seed, self.stage, label, self.rank)

    def _inputs(self, which: str, pos: np.ndarray, *noise_parts):
        """D's inputs at this rank's positions (z, t, labels); with noise_inputs, forward-noised from
        (noise_parts, class, global index) draws; labels None for an unconditional run."""
        y = self.real_labels if which == "real" else self.fake_labels
        y = None if y is None else y[pos].to(self.acc.device)
        return (*self._latents(which, pos, *noise_parts), y)

    def _latents(self, which: str, pos: np.ndarray, *noise_parts):
        z = (self.real if which == "real" else self.fake)[pos].to(self.acc.device)
        td = self.cfg.discriminator.training
        if td.noise_inputs:
            return noised_inputs(
                self.schedule,
                z.float(),
                self.own_start + pos,
                td.noise_max_timestep,
                self.seed,
                self.stage,
                *noise_parts,
                which,
            )
        t_all = self.real_t if which == "real" else self.fake_t
        t = None if t_all is None else t_all[pos].to(self.acc.device)
        return z, t

    def train_step(self, step):
        td = self.cfg.discriminator.training
        pr, pf = self._draw(self.tr_real, step, "real"), self._draw(self.tr_fake, step, "fake")
        zr, tr, yr = self._inputs("real", pr, step)
        zf, tf, yf = self._inputs("fake", pf, step)
        zr = r1_inputs(td, zr)
        z = torch.cat([zr, zf])
        t = None if tr is None else torch.cat([tr, tf])
        y = None if yr is None else torch.cat([yr, yf])
        with self.acc.autocast():
            logits = self.ddp_d(z, t, y).float()  # one DDP forward for both classes
        loss, accuracy = critic_loss(td, logits, zr)
        # the shared guarded update (non-finite loss/gradient skips); D has no LR schedule and no EMA
        self.apply_update(
            loss * local_weight(len(zr) + len(zf), 2 * self.half, self.world),
            self.ddp_d,
            self.d,
            self.opt,
            None,
            td.max_grad_norm,
        )
        return {"loss": loss.item(), "acc": accuracy.item()}

    @torch.no_grad()
    def evaluate(self):
        with engine.full_parameters(self.acc, self.d):
            return self._evaluate()

    def _evaluate(self):
        td = self.cfg.discriminator.training
        self.d.eval()
        sums = Totals(
            ["loss_real", "loss_fake", "correct_real", "correct_fake", "n_real", "n_fake"], self.acc.device
        )
        for which, positions in (("real", self.va_real), ("fake", self.va_fake)):
            for s in range(0, len(positions), 256):
                z, t, y = self._inputs(which, positions[s : s + 256], "val")
                logits = self.d(z, t, y).float()
                real = which == "real"
                sums.add(f"loss_{which}", d_loss_terms(td.loss, logits, real=real).sum())
                sums.add(f"correct_{which}", ((logits > 0) if real else (logits < 0)).sum())
                sums.add(f"n_{which}", len(logits))
        self.d.train()
        s = sums.reduced()
        n_r, n_f = max(s["n_real"], 1), max(s["n_fake"], 1)
        ok_r, ok_f = s["correct_real"], s["correct_fake"]
        return {
            "epoch": round(self.step / self.per_epoch, 4),
            "val_loss": s["loss_real"] / n_r + s["loss_fake"] / n_f,
            "val_acc": (ok_r + ok_f) / (n_r + n_f),
            "val_real_acc": ok_r / n_r,
            "val_fake_acc": ok_f / n_f,
            "lr": self.opt.param_groups[0]["lr"],
            "seconds": round(time.time() - self.t0, 2),
        }

    def model_state(self):
        return {"d": engine.state_dict(self.acc, self.d), "optimizer": self.optimizer_state(self.opt)}

    def load_model_state(self, state):
        engine.load_state_dict(self.acc, self.d, state["d"])
        self.load_optimizer_state(self.opt, state["optimizer"])

    def export(self, tag, metrics):
        if tag == "best":
            save_d(
                self.acc,
                self.d,
                self.best_path,
                self.k,
                self.step,
                sample_source(self.cfg).d_inputs(),
                metrics,
            )
