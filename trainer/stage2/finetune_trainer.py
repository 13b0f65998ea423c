"""The fine-tune phase of a stage-2 iteration: fine-tune the diffusion UNet with the composite loss.

Around the generator live its helpers (helpers.py): the critic its DiscriminatorLoss term scores samples
with (critics.py: the offline D frozen, the online D, the feature head on the fake score), and the
networks its loss terms bring (distribution matching's teacher and fake score). The phase only loops over
them: each takes its own steps before every generator step, is frozen during it, and saves, loads,
fingerprints and exports itself.

The generator's samples come from the run's sample source (samples.py: K-step rollouts, or one-step x0
predictions of the step's noised reals); one wrapped forward runs the MSE batch and the rollouts' last
step, so DDP sees one graph. The loss, its logged parts, the gradient-norm ratio and the adaptive weight are
the CompositeLoss's (trainer/training/composite.py). Validation is finetune_validation.py.
"""

from __future__ import annotations

import copy
import time

import numpy as np
import torch

from models.unet import unet_from_config, unet_sample_shape
from trainer.core.errors import UserError
from trainer.files import atomic
from trainer.parallel import engine
from trainer.parallel.accelerator import prepare_module
from trainer.parallel.collectives import shard_range
from trainer.stage2 import registry
from trainer.stage2.critics import latent_view
from trainer.stage2.finetune_batch import export_blob_of, sampler_timesteps, step_batch
from trainer.stage2.finetune_columns import finetune_columns
from trainer.stage2.finetune_fingerprint import finetune_fingerprint
from trainer.stage2.finetune_validation import FinetuneValidation
from trainer.stage2.helpers import FinetuneContext, StepInputs, frozen, step_samples_of
from trainer.stage2.rollouts import Rollouts
from trainer.stage2.samples import sample_source
from trainer.training.composite import CompositeLoss
from trainer.training.ema import EMA
from trainer.training.loop import StepTrainer, draw_local, local_weight
from trainer.training.optim import build_lr_schedule, optimizer_from


class FinetuneTrainer(StepTrainer):
    def __init__(
        self,
        accelerator,
        cfg,
        k: int,
        layout,
        base,
        schedule,
        autoencoder,
        real: torch.Tensor,
        real_train: np.ndarray,
        d,
        init: dict,
        quality=None,
        labels=None,
        real_labels=None,
    ):
        """base: the stage-1 model's facts (DiffusionCheckpoint: spec, latent scaling); schedule: its noise
        schedule; autoencoder: the frozen AE's path (recorded in exports); real: this rank's real latents
        (own global range); real_train: global train mask; d: the iteration's best offline D (None: none);
        init: {"raw": state_dict, "ema": state_dict, and what helpers carry over, by name}; quality: model
        -> latent FD on fixed seeds (a collective), measured at each validation (column val_latent_fd)
        where given; labels: a class-conditional run's RunLabels, real_labels its classes of `real`."""
        latent_shape = unet_sample_shape(base.unet_config)
        ctx = FinetuneContext(accelerator, cfg, k, layout, base, schedule, latent_shape, real, real_train)
        ctx.labels, ctx.real_labels, ctx.init, ctx.source = labels, real_labels, init, sample_source(cfg)
        self.cfg, self.k, self.schedule, self.source = cfg, k, schedule, ctx.source
        self.unet_config, self.scaling, self.autoencoder = base.unet_config, base.scaling, autoencoder
        self.conditioning, self.latent_shape = base.conditioning, latent_shape
        s2, t = cfg.stage2, cfg.training
        self._data(accelerator, real, real_train, labels, real_labels)
        self.lr = s2.learning_rate or t.learning_rate
        self.loss = CompositeLoss.from_config(t.loss, balance=s2)
        fingerprint = finetune_fingerprint(cfg, self.unet_config, schedule, self.lr, self.source.name)
        fingerprint.update(registry.fingerprint_of(cfg))
        super().__init__(  # the latest export is also the resume state
            accelerator,
            stage=f"stage2_g{k}",
            phase_label=f"iteration {k}, diffusion phase",
            metric=s2.best_metric,
            state_path=layout.diffusion_checkpoint(k, "latest"),
            history_path=layout.finetune_history(k),
            max_steps=self.max_steps,
            eval_interval=s2.diffusion_eval_interval or self.per_epoch,
            log_interval=s2.diffusion_eval_interval or self.per_epoch,
            seed=t.seed,
            fingerprint=fingerprint,
            max_nonfinite_steps=t.max_nonfinite_steps,
        )
        self.best_path, self.quality = layout.diffusion_checkpoint(k, "best"), quality
        if quality is None and s2.best_metric == "val_latent_fd":
            raise ValueError("best_metric val_latent_fd needs a quality measure")
        self._generator(init)
        self._helpers(ctx, d)

    def _helpers(self, ctx, d) -> None:
        """The rollouts, the helpers (the critic first), the columns they add, and validation."""
        self.rollouts = Rollouts(self.accelerator, self.cfg, self.schedule, self.latent_shape, self.labels)
        self.helpers = registry.build_helpers(ctx, d)
        self.critic = ctx.critic
        self.history_fields = self._columns()
        self.warm_fakes = None  # (this rank's saved fakes, N, the N labels or None): the warm start (fit)
        self.step_samples = []  # the generator step's own samples (StepSample per micro-batch)
        self.sampler_t = sampler_timesteps(self.cfg, self.schedule)
        self.validation = FinetuneValidation(self)
        self.t0 = time.time()

    def _columns(self) -> list[str]:
        """The history's columns: the loss's, the quality measure's, the ratio's, then each helper's."""
        quality = ["val_latent_fd"] if self.quality is not None else []
        helpers = [c for helper in self.helpers for c in helper.columns]
        return finetune_columns(self.loss) + quality + self.loss.ratio_columns + helpers

    def _data(self, accelerator, real, real_train, labels, real_labels) -> None:
        """This rank's reals, their train/validation positions and the phase's step count."""
        s2, t = self.cfg.stage2, self.cfg.training
        own = shard_range(real_train.shape[0], accelerator.process_index, accelerator.num_processes)
        local = np.arange(own.start, own.stop)
        self.real, self.labels, self.real_labels = real, labels, real_labels
        self.tr, self.va = np.flatnonzero(real_train[local]), np.flatnonzero(~real_train[local])
        self.va_global = local[self.va]
        self.batch = t.batch_size
        self.per_epoch = max(1, int(real_train.sum()) // self.batch)
        self.max_steps = s2.diffusion_epochs * self.per_epoch
        if s2.diffusion_max_steps is not None:
            self.max_steps = min(self.max_steps, s2.diffusion_max_steps)

    def _generator(self, init: dict) -> None:
        """The UNet from the iteration's weights, its EMA copy, optimizer and LR schedule."""
        cfg, accelerator, s2, t = self.cfg, self.accelerator, self.cfg.stage2, self.cfg.training
        self.unet = unet_from_config(self.unet_config)
        self.unet.load_state_dict(init["raw"])
        if s2.gradient_checkpointing or t.gradient_checkpointing:  # recompute activations in backward
            self.unet.enable_gradient_checkpointing()
        self.ema_unet = copy.deepcopy(self.unet).requires_grad_(False)
        self.ema_unet.load_state_dict(init["ema"])
        self.ema = EMA(self.ema_unet.parameters(), decay=t.ema_decay) if t.ema_decay > 0 else None
        self.unet = prepare_module(self.unet, cfg.performance, accelerator)
        opt = optimizer_from(self.unet.parameters(), t, cfg.performance, accelerator, lr=self.lr)
        kind, total, offset = s2.lr_schedule or t.scheduler.type, self.max_steps, 0
        if kind == "cosine_run":  # one curve over every iteration's steps: iteration k is its k-th slice
            kind, total, offset = "cosine", self.max_steps * s2.num_iterations, self.max_steps * self.k
        self.sched = build_lr_schedule(opt, s2.warmup_steps, total, kind, offset)
        self.ddp_unet, self.opt = engine.prepare(accelerator, self.unet, opt, t.batch_size, t.max_grad_norm)
        self.ema_unet.to(accelerator.device)

    # -- the phase and the step --------------------------------------------------------------------
    def fit(self):
        """The phase; a fine-tune that starts afresh (no resume state on disk: a resume state holds the
        helpers as they stood) first lets each helper start (the fake score's warm start)."""
        if not self.state_path.is_file():
            for helper in self.helpers:
                helper.start(self)
        return super().fit()

    def helper(self, name: str):
        """The helper of that name, or None."""
        return next((h for h in self.helpers if h.name == name), None)

    def model(self):
        """The generator as its samples are drawn: the plain module (wrapper hooks fire on the one
        wrapped forward of the step)."""
        return engine.forward_module(self.accelerator, self.ddp_unet, self.unet)

    def view(self, sample, idx, *parts):
        """A generator sample as the critic scores it in the step."""
        if self.critic is None:
            return latent_view(self.cfg, self.schedule, sample, idx, *parts)
        return self.critic.view(sample, idx, *parts)

    def val_view(self, sample, idx, *parts):
        return self.critic.val_view(sample, idx, *parts)

    def critic_reals(self, n, draw):
        """n of this rank's training reals (and their labels), the phase's draw-th critic draw."""
        pos = draw_local(self.tr, n, draw, self.per_epoch, self.seed, self.stage, "critic-real", self.rank)
        y = None if self.real_labels is None else self.real_labels[pos].to(self.accelerator.device)
        return self.real[pos].to(self.accelerator.device).float(), y

    def train_step(self, step):
        inputs = StepInputs(self.model(), self.rollouts, self.seed, self.stage, self.critic_reals)
        logs = {}
        for helper in self.helpers:  # each helper's own updates on the current weights' samples
            logs.update(helper.pre_step(step, inputs))
        self.step_samples = []
        of, done = self.cfg.training.gradient_accumulation_steps, []

        def micro(i):  # micro-batch i's loss (the whole batch's without accumulation)
            loss, parts, n = self.compute_loss(step, i, of)
            done.append((float(loss.detach()), parts))
            return loss * local_weight(n, self.batch, self.world)

        with frozen(self.helpers):
            micros = [lambda i=i: micro(i) for i in range(of)]
            clip = self.cfg.training.max_grad_norm
            self.apply_update(micros, self.ddp_unet, self.unet, self.opt, self.sched, clip, self.ema)
        for helper in self.helpers:  # and those on the step's own samples
            logs.update(helper.post_step(step, inputs, self.step_samples))
        parts = {key: sum(p[key] for _, p in done) for key in done[0][1]}  # the loss's parts, adv_ratio
        return {"loss": sum(x for x, _ in done), **parts, **logs}

    def compute_loss(self, step, i=0, of=1):
        """The composite loss of `step` on this rank: (loss, parts, local batch); of > 1: micro-batch i's,
        of the same samples and draws, each term scaled by its share of the term's samples (they add up)."""
        b = step_batch(self, step, i, of)
        pending = self.source.begin(self, step, i, of) if self.loss.needs_generated else None
        inputs, ts, ys = b.inputs, b.ts, b.ys
        if pending is not None:
            inputs, ts, ys = inputs + pending.inputs, ts + pending.ts, ys + pending.ys
        labels = torch.cat(ys) if ys and ys[0] is not None else None
        with self.accelerator.autocast():
            out = self.ddp_unet(torch.cat(inputs), torch.cat(ts), class_labels=labels).sample.float()
        if b.inputs:
            b.outputs = self.rollouts.outputs(out[: b.n], b.x_t, b.t, b.x0, b.noise)
        share = 1.0
        if pending is not None:
            extra, share = self.source.finish(self, out[b.n :], b, pending, step)
            b.outputs.update(extra)
            self.step_samples += step_samples_of(extra)  # for the helpers' post-steps
        loss, parts = self.loss(
            b.outputs,
            self.loss_context(),
            shares={"batch": b.n / b.n_all if b.n_all else 0.0, "generated": share},
            ratio_at=self.unet.conv_out.weight,
            world=self.world,
        )
        return loss, parts, b.n_all

    def loss_context(self) -> dict:
        """What the loss terms read beside the outputs: each helper by name (the critic: "discriminator")."""
        ctx = {"discriminator": None, **{h.name: h for h in self.helpers}}
        return {**ctx, "d_loss": self.cfg.discriminator.training.loss}

    def evaluate(self):
        return self.validation.evaluate()

    def baseline(self):
        return self.validation.baseline()

    # -- state and exports -------------------------------------------------------------------------
    def missing_state(self, what: str) -> UserError:
        return UserError(
            f"{self.state_path}: written without {what}; delete it to restart iteration {self.k}'s fine-tune"
        )

    def model_state(self):
        state = {
            "optimizer": self.optimizer_state(self.opt),
            "lr_scheduler": self.sched.state_dict(),
            "ema": self.ema.state_dict() if self.ema is not None else None,
            "loss": self.loss.state_dict(),
        }
        for helper in self.helpers:
            part = helper.state(self)
            if part is not None:
                state[helper.state_key] = part
        if self.step >= self.max_steps:  # the helpers' files, written before the state marks completion
            for helper in self.helpers:
                helper.export(self)
        return state

    def load_model_state(self, state):
        for helper in self.helpers:
            if helper.state_key is not None:
                helper.load_state(state.get(helper.state_key), self)
        self.load_optimizer_state(self.opt, state["optimizer"])
        # states written before the loss kept its own state hold its weights in `adv_weights` here
        self.loss.load_state_dict(state.get("loss", state))
        self.sched.load_state_dict(state["lr_scheduler"])
        if self.ema is not None:
            self.ema.load_state_dict(state["ema"])

    def eval_model(self):
        return self.validation.eval_model()

    def wrap_state(self, state):
        blob = export_blob_of(self, self.history[-1] if self.history else {})
        blob.update(state=state, complete=state["complete"])
        return blob

    def unwrap_state(self, blob):
        engine.load_state_dict(self.accelerator, self.unet, blob["raw_state_dict"])
        return blob["state"]

    def export(self, tag, metrics):
        if tag == "best":
            blob = export_blob_of(self, metrics)
            if self.accelerator.is_main_process:
                atomic.save_torch(blob, self.best_path)
