"""The online discriminator (`discriminator.training.mode: online`): D keeps learning during the fine-tune.

An offline D is trained once per iteration on a fixed pool of fakes; the generator then fine-tunes
against it until it is fooled, and the D goes stale. Online, that D is only the warm start: before each
generator step it takes `n_critic` steps on fresh rollouts of the current model against the
iteration's reals, and it is frozen (no parameter requires a gradient) while the generator's loss
back-propagates through it.

Noise-conditioned inputs (`noise_inputs`): both classes, and the samples D scores in the generator
loss, are forward-noised to a random timestep below `noise_max_timestep x num_steps`, and D gets t.
The draws are per sample, from (seed, stage, step, class, index), so a resumed run repeats them.

Under DDP the online D is a second DDP module of the same Accelerator; under DeepSpeed it is a second
engine behind a second Accelerator (dist.engine.prepare_second).

It is the critic of (latent, online) (critics.py): the LatentCritic's views and logits, with its own steps,
state and file.
"""

from __future__ import annotations

import contextlib

import torch

from trainer.diffusion.noise import noised_inputs
from trainer.parallel import engine
from trainer.parallel.accelerator import prepare_module
from trainer.parallel.collectives import shard_range
from trainer.stage2.critic_step import critic_loss, guarded_update, r1_inputs
from trainer.stage2.critics import LatentCritic, online_fields
from trainer.stage2.discriminator_trainer import save_d
from trainer.training.loop import local_weight
from trainer.training.optim import optimizer_from


class OnlineCritic(LatentCritic):
    """D, its optimizer and the Accelerator that owns its (DDP or DeepSpeed) wrapper."""

    columns = ["train_d_loss", "train_d_acc"]
    state_key = "online_d"

    def __init__(self, ctx, d):
        accelerator, cfg = ctx.accelerator, ctx.cfg
        td = cfg.discriminator.training
        self.cfg, self.schedule, self.main_acc, self.k = cfg, ctx.schedule, accelerator, ctx.k
        self.path = ctx.layout.discriminator_online(ctx.k)
        self.engine_path = ctx.layout.online_engine_state(ctx.k)
        self.d_inputs = ctx.source.d_inputs()
        self.batch = td.online_batch_size or td.batch_size
        self.half = max(1, self.batch // 2)
        d = d.to(accelerator.device).train().requires_grad_(True)
        d = prepare_module(d, cfg.performance, accelerator)
        opt = optimizer_from(d.parameters(), td, cfg.performance, accelerator)
        self.d = d
        second = engine.prepare_second(accelerator, d, opt, 2 * self.half, td.max_grad_norm)
        self.acc, self.wrapped, self.opt = second
        self.skipped = 0

    @classmethod
    def fingerprint_of(cls, cfg) -> dict:
        return {"discriminator": online_fields(cfg.discriminator.training)}

    @contextlib.contextmanager
    def frozen(self):
        """D's parameters take no gradient inside (the generator step); trainable again after."""
        self.d.requires_grad_(False)
        try:
            yield self.d
        finally:
            self.d.requires_grad_(True)

    @contextlib.contextmanager
    def evaluating(self):
        self.d.eval()
        try:
            yield
        finally:
            self.d.train()

    def step(self, real, real_t, fake, fake_t, weight: float, real_y=None, fake_y=None) -> dict:
        """One D update on this rank's reals and fakes (t: None or per-sample timesteps; y: a
        class-conditional run's labels, else None); weight turns the local mean into this rank's share of
        the global mean. Call on every rank."""
        td = self.cfg.discriminator.training
        real = r1_inputs(td, real)
        z = torch.cat([real, fake.detach()])
        t = None if real_t is None else torch.cat([real_t, fake_t])
        y = None if real_y is None else torch.cat([real_y, fake_y])
        with self.main_acc.autocast():
            logits = self.wrapped(z, t, y).float()
        loss, accuracy = critic_loss(td, logits, real)
        params = self.wrapped.parameters()
        if not guarded_update(self.main_acc, self.acc, self.opt, params, loss, weight, td.max_grad_norm):
            self.skipped += 1
            return {"d_loss": float("nan"), "d_acc": float(accuracy)}
        return {"d_loss": float(loss.detach()), "d_acc": float(accuracy)}

    def pre_step(self, step, inputs) -> dict:
        """The n_critic D updates before generator step `step` (call on every rank): each on fresh rollouts
        of the generator against this rank's reals for the phase's (step x n_critic + c)-th critic draw.
        Returns the mean d_loss and d_acc."""
        td = self.cfg.discriminator.training
        world = self.main_acc.num_processes
        sums = {"d_loss": 0.0, "d_acc": 0.0}
        mine = list(shard_range(self.half, self.main_acc.process_index, world))
        rollouts = inputs.samples
        for c in range(td.n_critic):
            parts = (inputs.seed, inputs.stage, "critic", step, c)
            with torch.no_grad():
                fake = rollouts.train_sample(inputs.model, mine, (*parts, "rollout")).float()
            real, real_y = inputs.reals(len(mine), step * td.n_critic + c)
            fake_y = rollouts.labels_for(mine, (*parts, "rollout"))
            real_t = fake_t = None
            if td.noise_inputs:
                schedule, top = rollouts.schedule, td.noise_max_timestep
                real, real_t = noised_inputs(schedule, real, mine, top, *parts, "real")
                fake, fake_t = noised_inputs(schedule, fake, mine, top, *parts, "fake")
            weight = local_weight(2 * len(mine), 2 * self.half, world)
            out = self.step(real, real_t, fake, fake_t, weight, real_y, fake_y)
            for key in sums:
                sums[key] += out[key] / td.n_critic
        return sums

    # -- state -------------------------------------------------------------------------------------
    def state(self, run) -> dict:
        """Weights and optimizer for the fine-tune's resume state (call on every rank)."""
        opt = engine.second_optimizer_state(self.acc, self.opt, self.engine_path)
        return {"d": engine.state_dict(self.acc, self.d), "optimizer": opt, "skipped": self.skipped}

    def load_state(self, state, run) -> None:
        if state is None:
            raise run.missing_state("an online discriminator")
        engine.load_state_dict(self.acc, self.d, state["d"])
        engine.load_second_optimizer_state(
            self.acc, self.opt, state.get("optimizer"), self.engine_path, "online discriminator"
        )
        self.skipped = int(state.get("skipped", 0))

    def export(self, run) -> None:
        """The D as it stands, in the offline D's file format (call on every rank; main writes)."""
        save_d(self.acc, self.d, self.path, self.k, run.step, self.d_inputs, mode="online")
