"""The two scores behind a DistributionMatchingLoss term (docs/STAGE2.md#distribution-matching).

The real score is the frozen stage-1 teacher: the EMA weights of the stage-1 checkpoint the run started
from (the same teacher in every iteration), in eval mode, never trained. The fake score is a trainable copy
of it that tracks the generator: before each generator step it takes `n_fake` denoising steps (the stage-1
objective, t uniform over the schedule) on fresh K-step samples of the current weights, made without
gradient. The generator's signal is the difference of the two scores' x0 predictions on its own samples,
noised to a level in [t_min, t_max) x num_steps (trainer/training/losses.py, distribution_matching_loss).

Every draw is per sample index, from (seed, stage, step, update, index), so the fake score's samples, their
noise and timesteps are the same at any world size and after any resume. Under DDP the fake score is a
second DDP module of the same Accelerator, as the online discriminator is (stage2/online.py), and under
DeepSpeed a second engine behind a second Accelerator (engine.prepare_second), which the online D would need
too: that combination is refused before any compute. Its weights and optimizer are part of the fine-tune's
resume state (under DeepSpeed the optimizer partitions are in the engine's own checkpoint beside it).

With a feature discriminator (discriminator.config.type unet_features, stage2/feature_discriminator.py) the
trained module is the fake score with a classifier head on its bottleneck: one module, one wrapper, one
optimizer (the head in its own parameter group), the head's loss added to each update's denoising loss.

A class-conditional run's scores take each sample's label: the teacher at stage2.guidance_scale (the scale
the generator's rollouts sample at), the fake score conditional alone (scale 1), trained on the rollouts with
their labels.
"""

from __future__ import annotations

import contextlib

import torch
import torch.nn.functional as F

from models.feature_discriminator import ScoreWithHead
from trainer.core.errors import UserError
from trainer.diffusion.conditioning import model_output
from trainer.diffusion.noise import per_sample_noise, per_sample_timesteps
from trainer.parallel import engine
from trainer.parallel.accelerator import fast_optimizer, prepare_module
from trainer.parallel.collectives import all_reduce_sum, gather_shards, shard_range
from trainer.stage2 import feature_discriminator as features
from trainer.stage2.discriminator_trainer import check_r1_supported
from trainer.training.loop import local_weight, walk_rows
from trainer.training.optim import build_optimizer

TERM = "DistributionMatchingLoss"


def enabled(cfg) -> bool:
    """Whether training.loss has a distribution-matching term (the config refuses one of weight 0)."""
    return any(t.type == TERM for t in cfg.training.loss.losses)


def check_distribution_matching_supported(acc, cfg) -> None:
    """One line, before any compute, where the term cannot run: under DeepSpeed beside an online D (the
    fake score and the online D would each need the one second engine)."""
    online = cfg.discriminator.training.mode == "online"
    if enabled(cfg) and online and engine.is_deepspeed(acc):
        i = next(i for i, t in enumerate(cfg.training.loss.losses) if t.type == TERM)
        raise UserError(
            f"training.loss.losses[{i}]: {TERM} beside an online discriminator is not supported under "
            "DeepSpeed (each needs the one second engine); set discriminator.training.mode to offline "
            "or train with DDP"
        )


def fingerprint(cfg) -> dict:
    """The fields that define a fine-tune with the term (its resume fingerprint's `distribution_matching`)."""
    return dict(vars(cfg.stage2.distribution_matching))


@torch.no_grad()
def score_predictions(schedule, real, fake, x_t, t, autocast=None, labels=None, y=None):
    """(p_real, p_fake): the x0 predictions of the real and fake score models at (x_t, t), in fp32; with a
    class-conditional run's RunLabels and the samples' labels y, the real score's at the run's guidance
    scale and the fake score's conditional alone."""
    preds = []
    for model, scale in ((real, None if labels is None else labels.scale), (fake, 1.0)):
        with autocast() if autocast is not None else contextlib.nullcontext():
            if y is None:
                out = model(x_t, t).sample.float()
            else:
                out = model_output(model, x_t, t, y, scale, labels.null_class).float()
        preds.append(schedule.predictions(out, x_t, t)[1])
    return preds[0], preds[1]


class DistributionMatching:
    """The teacher, the fake score, its optimizer and the Accelerator that owns its (DDP) wrapper."""

    def __init__(self, acc, cfg, base, schedule, latent_shape, reals=None, labels=None, real_labels=None):
        """base: the stage-1 checkpoint the run started from (its EMA weights are the teacher); reals: (this
        rank's reals, the global train mask), which a feature discriminator on the fake score reads; labels:
        a class-conditional run's RunLabels, real_labels the classes of this rank's reals."""
        check_distribution_matching_supported(acc, cfg)
        dm, s2 = cfg.stage2.distribution_matching, cfg.stage2
        self.cfg, self.main_acc, self.schedule, self.latent_shape = cfg, acc, schedule, latent_shape
        self.labels = labels
        self.batch = dm.batch_size or s2.rollout_batch_size or cfg.training.batch_size
        self.teacher = base.new_unet(base.weights).to(acc.device).eval().requires_grad_(False)
        module = fake = base.new_unet(base.weights).train()
        groups = [{"params": list(fake.parameters())}]
        self.features = None  # the feature discriminator: a head on the fake score's bottleneck
        if features.enabled(cfg):
            check_r1_supported(acc, cfg.discriminator.training)  # R1 on the head: a double backward
            self.features = features.FeatureDiscriminator(acc, cfg, schedule, *reals, self.batch, real_labels)
            classes = 0 if labels is None else labels.conditioning.num_classes
            module = ScoreWithHead(fake, features.new_head(cfg, base.unet_config, classes))
            td = cfg.discriminator.training
            head = {"lr": td.learning_rate, "betas": tuple(td.betas), "weight_decay": td.weight_decay}
            groups.append({"params": list(module.head.parameters()), **head})
        module = prepare_module(module.to(acc.device), cfg.performance, acc)
        opt = build_optimizer(
            groups,
            dm.learning_rate,
            dm.weight_decay,
            "AdamW",
            dm.betas,
            **fast_optimizer(cfg.performance, acc),
        )
        self.module, self.fake = module, module.unet if self.features is not None else module
        if self.features is not None:
            self.features.module = module
        second = engine.prepare_second(acc, module, opt, self.batch, dm.max_grad_norm)
        self.acc, self.wrapped, self.opt = second
        self.skipped = 0

    @property
    def columns(self) -> list[str]:
        """Its history columns: the fake score's denoising loss, and the feature head's loss and accuracy."""
        return ["train_fake_loss"] + (["train_d_loss", "train_d_acc"] if self.features is not None else [])

    def frozen(self):
        """The fake score (and its head) take no gradient inside: the generator step, where the feature
        discriminator's term back-propagates through them."""
        return self.features.frozen() if self.features is not None else contextlib.nullcontext()

    # -- the generator's signal ----------------------------------------------------------------------
    def predictions(self, x, idx, parts, y=None):
        """(p_real, p_fake) of the generator's samples x (global indices idx; a class-conditional run's labels
        y), each noised to its own level t in [t_min, t_max) x num_steps with its own noise, both drawn from
        (parts, index); no gradient."""
        dm, n = self.cfg.stage2.distribution_matching, self.schedule.num_steps
        lo = min(int(dm.t_min * n), n - 1)
        hi = max(lo + 1, int(dm.t_max * n))
        x = x.detach().float()
        noise = per_sample_noise(idx, tuple(x.shape[1:]), *parts, "noise").to(x.device)
        t = (per_sample_timesteps(idx, hi - lo, *parts, "t") + lo).to(x.device)
        x_t = self.schedule.add_noise(x, noise, t)
        fake = engine.forward_module(self.acc, self.wrapped, self.fake)
        return score_predictions(
            self.schedule, self.teacher, fake, x_t, t, self.main_acc.autocast, self.labels, y
        )

    # -- the fake score's updates --------------------------------------------------------------------
    def fake_steps(self, step, model, rollouts, seed, stage) -> dict:
        """The n_fake fake-score updates before generator step `step` (call on every rank), each on fresh
        rollouts of `model` (no gradient). Returns the mean denoising loss (fake_loss), and with a feature
        discriminator its mean loss and accuracy (d_loss, d_acc)."""
        dm, world = self.cfg.stage2.distribution_matching, self.main_acc.num_processes
        mine = list(shard_range(self.batch, self.main_acc.process_index, world))
        sums = {}
        for c in range(dm.n_fake):
            parts = (seed, stage, "fake-score", step, c)
            with torch.no_grad():
                x0 = rollouts.train_sample(model, mine, (*parts, "rollout")).float()
            y = rollouts.labels_for(mine, (*parts, "rollout"))
            weight = local_weight(len(mine), self.batch, world)
            for key, value in self.update(x0, mine, parts, weight, step * dm.n_fake + c, y).items():
                sums[key] = sums.get(key, 0.0) + value / dm.n_fake
        return sums

    def warm_start(self, fake_local, n: int, seed, stage, fake_labels=None) -> dict:
        """stage2.distribution_matching.warm_start_steps updates of the fake score (and its head) on the
        iteration's N saved fakes (this rank's shard_range block `fake_local`), before the first generator
        step of a fine-tune that starts afresh (call on every rank). Update s takes the slots of the s-th
        batch of a walk over per-epoch permutations of the N fakes: the same at any world size. Returns the
        losses of the first and the last update, {"first": logs, "last": logs}, on this rank. fake_labels: a
        class-conditional run's labels of the N fakes."""
        steps, device = self.cfg.stage2.distribution_matching.warm_start_steps, self.main_acc.device
        if not steps:
            return {}
        fakes = gather_shards(fake_local.to(device).float(), n).cpu()
        world = self.main_acc.num_processes
        mine = list(shard_range(self.batch, self.main_acc.process_index, world))
        weight = local_weight(len(mine), self.batch, world)
        warm = f"{stage}:warm-start"
        out = {}
        for s in range(steps):
            rows = walk_rows(n, mine, s, self.batch, seed, warm, "fake")
            y = None if fake_labels is None else fake_labels[rows].to(device)
            logs = self.update(fakes[rows].to(device), mine, (seed, warm, s), weight, s, y)
            out.setdefault("first", logs)
            out["last"] = logs
        return out

    def update(self, x0, idx, parts, weight: float, draw: int = 0, y=None) -> dict:
        """One denoising step of the fake score on this rank's samples x0 (global indices idx), with the
        feature head's classification step (the phase's draw-th head batch) where there is one; weight
        turns the local mean into this rank's share of the global mean. A non-finite loss on any rank
        skips the update on every rank. y: a class-conditional run's labels of x0."""
        dm, device = self.cfg.stage2.distribution_matching, self.main_acc.device
        noise = per_sample_noise(idx, tuple(self.latent_shape), *parts, "noise").to(device)
        t = per_sample_timesteps(idx, self.schedule.num_steps, *parts, "t").to(device)
        x_t = self.schedule.add_noise(x0, noise, t)
        if self.features is None:
            with self.main_acc.autocast():
                out = self.wrapped(x_t, t, class_labels=y).sample.float()
        else:
            x_cls, t_cls, real_in, y_cls = self.features.inputs(x0, idx, parts, draw, y)
            with self.main_acc.autocast(), self.features.forward_context():
                out, logits = self.wrapped(x_t, t, x_cls, t_cls, y, y_cls)
            out = out.float()
        target = self.schedule.target(x0, noise, t).float()
        loss = F.mse_loss(out, target) if len(idx) else out.sum() * 0.0
        logs = {"fake_loss": float(loss.detach())}
        if self.features is not None:
            head_loss, head_logs = self.features.loss(logits, real_in)
            loss, logs = loss + head_loss, {**logs, **head_logs}
        bad = all_reduce_sum((~torch.isfinite(loss.detach())).float().reshape(1).to(device))
        if float(bad) > 0:
            self.opt.zero_grad(set_to_none=True)
            self.skipped += 1
            return {key: float("nan") for key in logs}
        self.acc.backward(loss * weight)
        if dm.max_grad_norm > 0 and not engine.is_deepspeed(self.acc):
            self.acc.clip_grad_norm_(self.wrapped.parameters(), dm.max_grad_norm)
        self.opt.step()
        self.opt.zero_grad(set_to_none=True)
        return logs

    # -- state -----------------------------------------------------------------------------------------
    def state(self, engine_folder) -> dict:
        """Weights and optimizer for the fine-tune's resume state (call on every rank)."""
        opt = engine.second_optimizer_state(self.acc, self.opt, engine_folder)
        state = {"fake": engine.state_dict(self.acc, self.fake), "optimizer": opt, "skipped": self.skipped}
        if self.features is not None:
            state["head"] = engine.state_dict(self.acc, self.module.head)
        return state

    def load_weights(self, state: dict, source) -> None:
        """The fake score's (and head's) weights of an earlier iteration's resume state, `source` its file:
        where stage2.distribution_matching.carry_over starts iteration k+1 (its optimizer starts afresh)."""
        engine.load_state_dict(self.acc, self.fake, state["fake"])
        if self.features is not None:
            if "head" not in state:
                raise UserError(f"{source}: no feature discriminator head to continue from")
            engine.load_state_dict(self.acc, self.module.head, state["head"])

    def load_state(self, state: dict, engine_folder) -> None:
        engine.load_state_dict(self.acc, self.fake, state["fake"])
        if self.features is not None:
            if "head" not in state:  # (the fingerprint names the head's fields first)
                raise UserError(f"{engine_folder}: a resume state without the feature discriminator's head")
            engine.load_state_dict(self.acc, self.module.head, state["head"])
        engine.load_second_optimizer_state(
            self.acc, self.opt, state["optimizer"], engine_folder, "fake score"
        )
        self.skipped = int(state.get("skipped", 0))

    def export_features(self, path, unet_config: dict, k: int, step: int) -> None:
        """The feature discriminator (the fake score's UNet and the head) at the end of the phase (call on
        every rank; main writes)."""
        unet, head = engine.state_dict(self.acc, self.fake), engine.state_dict(self.acc, self.module.head)
        self.features.export(path, unet, head, unet_config, k, step)
