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
"""

from __future__ import annotations

import contextlib

import torch

from trainer.diffusion.noise import noised_inputs
from trainer.files import atomic
from trainer.parallel import engine
from trainer.parallel.accelerator import fast_optimizer, prepare_module
from trainer.parallel.collectives import all_reduce_sum, shard_range
from trainer.stage2.discriminator_trainer import D_FORMAT, check_r1_supported, d_inputs
from trainer.training.loop import local_weight
from trainer.training.losses import d_loss, r1_term
from trainer.training.optim import build_optimizer


class OnlineDiscriminator:
    """D, its optimizer and the Accelerator that owns its (DDP or DeepSpeed) wrapper."""

    def __init__(self, acc, cfg, d):
        td = cfg.discriminator.training
        self.cfg, self.main_acc = cfg, acc
        self.batch = td.online_batch_size or td.batch_size
        self.half = max(1, self.batch // 2)
        d = prepare_module(d.to(acc.device).train().requires_grad_(True), cfg.performance, acc)
        opt = build_optimizer(
            d.parameters(),
            td.learning_rate,
            td.weight_decay,
            "AdamW",
            td.betas,
            **fast_optimizer(cfg.performance, acc),
        )
        self.d = d
        check_r1_supported(acc, td)
        self.acc, self.wrapped, self.opt = engine.prepare_second(acc, d, opt, 2 * self.half, td.max_grad_norm)
        self.skipped = 0

    @contextlib.contextmanager
    def frozen(self):
        """D's parameters take no gradient inside (the generator step); trainable again after."""
        self.d.requires_grad_(False)
        try:
            yield self.d
        finally:
            self.d.requires_grad_(True)

    def step(self, real, real_t, fake, fake_t, weight: float, real_y=None, fake_y=None) -> dict:
        """One D update on this rank's reals and fakes (t: None or per-sample timesteps; y: a
        class-conditional run's labels, else None); weight turns the local mean into this rank's share of
        the global mean. Call on every rank."""
        td = self.cfg.discriminator.training
        if td.r1_gamma > 0:
            real = real.detach().requires_grad_(True)
        z = torch.cat([real, fake.detach()])
        t = None if real_t is None else torch.cat([real_t, fake_t])
        y = None if real_y is None else torch.cat([real_y, fake_y])
        with self.main_acc.autocast():
            logits = self.wrapped(z, t, y).float()
        lr_, lf = logits[: len(real)], logits[len(real) :]
        loss = d_loss(td.loss, lr_, lf)
        if td.r1_gamma > 0:
            loss = loss + td.r1_gamma * r1_term(lr_, real)
        acc_ = ((lr_ > 0).float().sum() + (lf < 0).float().sum()) / max(1, len(logits))
        # a non-finite loss on any rank skips the update on every rank (no rank runs a lone backward)
        bad = all_reduce_sum((~torch.isfinite(loss.detach())).float().reshape(1).to(self.main_acc.device))
        if float(bad) > 0:
            self.opt.zero_grad(set_to_none=True)
            self.skipped += 1
            return {"d_loss": float("nan"), "d_acc": float(acc_)}
        self.acc.backward(loss * weight)
        if td.max_grad_norm > 0 and not engine.is_deepspeed(self.acc):
            self.acc.clip_grad_norm_(self.wrapped.parameters(), td.max_grad_norm)
        self.opt.step()
        self.opt.zero_grad(set_to_none=True)
        return {"d_loss": float(loss.detach()), "d_acc": float(acc_)}

    def critic_steps(self, step, model, rollouts, draw_reals, seed, stage) -> dict:
        """The n_critic D updates before generator step `step` (call on every rank): each on fresh rollouts
        of `model` (rollouts: stage2/rollouts.py) against reals, draw_reals(n, i) giving n of this rank's
        reals (and their labels, or None) for the phase's i-th critic draw. Returns the mean d_loss and
        d_acc."""
        td = self.cfg.discriminator.training
        world = self.main_acc.num_processes
        sums = {"d_loss": 0.0, "d_acc": 0.0}
        mine = list(shard_range(self.half, self.main_acc.process_index, world))
        for c in range(td.n_critic):
            parts = (seed, stage, "critic", step, c)
            with torch.no_grad():
                fake = rollouts.train_sample(model, mine, (*parts, "rollout")).float()
            real, real_y = draw_reals(len(mine), step * td.n_critic + c)
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
    def state(self, engine_folder) -> dict:
        """Weights and optimizer for the fine-tune's resume state (call on every rank)."""
        opt = engine.second_optimizer_state(self.acc, self.opt, engine_folder)
        return {"d": engine.state_dict(self.acc, self.d), "optimizer": opt, "skipped": self.skipped}

    def load_state(self, state: dict, engine_folder) -> None:
        engine.load_state_dict(self.acc, self.d, state["d"])
        engine.load_second_optimizer_state(
            self.acc, self.opt, state.get("optimizer"), engine_folder, "online discriminator"
        )
        self.skipped = int(state.get("skipped", 0))

    def export(self, path, k: int, step: int) -> None:
        """The D as it stands, in the offline D's file format (call on every rank; main writes)."""
        weights = engine.state_dict(self.acc, self.d)
        if self.main_acc.is_main_process:
            atomic.save_torch(
                {
                    "format": D_FORMAT,
                    "config": self.d.config,
                    "state_dict": weights,
                    "iteration": k,
                    "step": step,
                    "mode": "online",
                    "inputs": d_inputs(self.cfg),
                },
                path,
            )
