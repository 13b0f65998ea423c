"""The fine-tune phase of a stage-2 iteration: fine-tune the diffusion UNet with the composite loss, D frozen.

The sample D scores comes from the distribution D was trained on:
  rollout  DDIM from fresh noise with the current weights; gradients flow through the last K steps
           only. D was trained on fully sampled fakes from the same DDIM settings.
  x0_pred  one-step x0 predictions from noised real latents; D was trained on exactly those (at
           timesteps from the same range) as its fakes.

With `discriminator.training.mode: online` D is not frozen for the whole phase: before each generator
step it takes n_critic steps on fresh rollouts of the current weights (stage2/online.py), and it is
frozen only during the generator step itself.

A DistributionMatchingLoss term brings a teacher and a fake score (stage2/distribution_matching.py); the
fake score takes n_fake steps before each generator step, as the online D does. With
`discriminator.config.type: unet_features` D is a head on the fake score (stage2/feature_discriminator.py).

The loss, its logged parts, the gradient-norm ratio and the adaptive weight are the CompositeLoss's
(trainer/training/composite.py); this module makes what it reads (the samples: rollouts.py) and steps.
Validation is finetune_validation.py.
"""

from __future__ import annotations

import contextlib
import copy
import time

import numpy as np
import torch

from models.unet import unet_from_config, unet_sample_shape
from trainer.core.errors import UserError
from trainer.diffusion.checkpoints import export_blob
from trainer.diffusion.noise import avoid_timesteps, batch_noise_and_timesteps
from trainer.files import atomic
from trainer.parallel import engine
from trainer.parallel.accelerator import fast_optimizer, prepare_module
from trainer.parallel.collectives import shard_range
from trainer.stage2 import distribution_matching as dmatch
from trainer.stage2.finetune_columns import check_grad_ratio_supported, finetune_columns
from trainer.stage2.finetune_fingerprint import finetune_fingerprint
from trainer.stage2.finetune_validation import FinetuneValidation
from trainer.stage2.online import OnlineDiscriminator
from trainer.stage2.rollouts import Rollouts
from trainer.training.composite import CompositeLoss
from trainer.training.ema import EMA
from trainer.training.loop import StepTrainer, draw_local, local_weight
from trainer.training.optim import build_lr_schedule, build_optimizer


class FinetuneTrainer(FinetuneValidation, StepTrainer):
    def __init__(
        self,
        acc,
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
        (own global range); real_train: global train mask; d: the iteration's best D (frozen here);
        init: {"raw": state_dict, "ema": state_dict, and with a carried-over fake score "dm": (its resume
        state, its file)}; quality: model -> latent FD on fixed seeds (a
        collective), measured at each validation (column val_latent_fd) where given; labels: a
        class-conditional run's RunLabels (stage2/labels.py), real_labels its classes of `real`."""
        self.cfg, self.k, self.schedule = cfg, k, schedule
        self.unet_config, self.scaling, self.autoencoder = base.unet_config, base.scaling, autoencoder
        self.latent_shape = unet_sample_shape(base.unet_config)
        s2, t = cfg.stage2, cfg.training
        engine.check_accumulation(
            acc, t.gradient_accumulation_steps, t.batch_size
        )  # before any compute of this phase
        own = shard_range(real_train.shape[0], acc.process_index, acc.num_processes)
        local = np.arange(own.start, own.stop)
        self.real, self.labels, self.real_labels = real, labels, real_labels
        self.conditioning = base.conditioning
        self.tr = np.flatnonzero(real_train[local])
        self.va = np.flatnonzero(~real_train[local])
        self.va_global = local[self.va]
        self.batch = t.batch_size
        self.per_epoch = max(1, int(real_train.sum()) // self.batch)
        max_steps = s2.diffusion_epochs * self.per_epoch
        if s2.diffusion_max_steps is not None:
            max_steps = min(max_steps, s2.diffusion_max_steps)
        interval = s2.diffusion_eval_interval or self.per_epoch
        self.lr = s2.learning_rate or t.learning_rate
        td = cfg.discriminator.training
        self.online_mode = td.mode == "online" and d is not None and s2.generator_loss_mode == "rollout"
        fingerprint = finetune_fingerprint(cfg, self.unet_config, schedule, self.lr, self.online_mode)
        # the latest export is also the resume state
        super().__init__(
            acc,
            stage=f"stage2_g{k}",
            phase_label=f"iteration {k}, diffusion phase",
            metric=s2.best_metric,
            state_path=layout.diffusion_checkpoint(k, "latest"),
            history_path=layout.finetune_history(k),
            max_steps=max_steps,
            eval_interval=interval,
            log_interval=interval,
            seed=t.seed,
            fingerprint=fingerprint,
            max_nonfinite_steps=t.max_nonfinite_steps,
        )
        self.best_path = layout.diffusion_checkpoint(k, "best")
        self.online_path, self.online_engine_path = (
            layout.discriminator_online(k),
            layout.online_engine_state(k),
        )
        self.fake_engine_path = layout.fake_score_engine_state(k)
        self.feature_path = layout.discriminator_features(k)
        self.quality = quality
        self.loss = CompositeLoss.from_config(t.loss, balance=s2)
        self.history_fields = finetune_columns(self.loss)
        if quality is not None:
            self.history_fields = self.history_fields + ["val_latent_fd"]
        elif s2.best_metric == "val_latent_fd":
            raise ValueError("best_metric val_latent_fd needs a quality measure")

        self.unet = unet_from_config(self.unet_config)
        self.unet.load_state_dict(init["raw"])
        if (
            s2.gradient_checkpointing or t.gradient_checkpointing
        ):  # recompute activations in backward (K-step rollouts)
            self.unet.enable_gradient_checkpointing()
        self.ema_unet = copy.deepcopy(self.unet).requires_grad_(False)
        self.ema_unet.load_state_dict(init["ema"])
        self.ema = EMA(self.ema_unet.parameters(), decay=t.ema_decay) if t.ema_decay > 0 else None
        self.unet = prepare_module(self.unet, cfg.performance, acc)
        opt = build_optimizer(
            self.unet.parameters(),
            self.lr,
            t.weight_decay,
            t.optimizer,
            t.betas,
            **fast_optimizer(cfg.performance, acc),
        )
        kind, total, offset = s2.lr_schedule or t.scheduler.type, max_steps, 0
        if kind == "cosine_run":  # one curve over every iteration's steps: iteration k is its k-th slice
            kind, total, offset = "cosine", max_steps * s2.num_iterations, max_steps * k
        self.sched = build_lr_schedule(opt, s2.warmup_steps, total, kind, offset)
        self.ddp_unet, self.opt = engine.prepare(acc, self.unet, opt, t.batch_size, t.max_grad_norm)
        self.ema_unet.to(acc.device)
        self.d = d
        check_grad_ratio_supported(acc, s2, t.gradient_accumulation_steps)
        self.history_fields = self.history_fields + self.loss.ratio_columns
        self.online = None
        if self.online_mode:  # D trains beside the UNet; frozen only inside the generator step
            self.online = OnlineDiscriminator(acc, cfg, d)
            self.d = self.online.d
            self.history_fields = self.history_fields + ["train_d_loss", "train_d_acc"]
        elif d is not None:
            d.requires_grad_(False)  # frozen: gradients reach the UNet through D, never D itself
            self.d = d.to(acc.device).eval()
        self.rollouts = Rollouts(acc, cfg, schedule, self.latent_shape, labels)
        self.dm = None  # the teacher and the fake score of a DistributionMatchingLoss term
        if dmatch.enabled(cfg):  # with a feature discriminator, its head is on the fake score: the D here
            reals = (real, real_train)
            self.dm = dmatch.DistributionMatching(
                acc, cfg, base, schedule, self.latent_shape, reals, labels, real_labels
            )
            if "dm" in init:  # carry_over: the last iteration's fake score (a resume state replaces it)
                self.dm.load_weights(*init["dm"])
            self.history_fields = self.history_fields + self.dm.columns
            self.d = self.dm.features or self.d
        self.warm_fakes = None  # (this rank's saved fakes, N, the N labels or None): the warm start (fit)
        # mse_skip_sampler_timesteps: the timesteps the K-step sampler visits, and with train_steps those
        # of every listed step count too
        self.sampler_t = schedule.sampler_timesteps(s2.generation_steps)
        if s2.train_steps:
            ks = sorted({s2.generation_steps, *s2.train_steps})
            self.sampler_t = torch.unique(torch.cat([schedule.sampler_timesteps(k) for k in ks]))
        self.t0 = time.time()

    # -- the fake score's warm start -----------------------------------------------------------------
    def fit(self):
        """The phase; a distribution-matching fine-tune that starts afresh (no resume state on disk: a
        resume state holds the fake score as it stood) first warm-starts its fake score on the iteration's
        saved fakes (`warm_fakes`: this rank's block, N and a class-conditional run's N labels, set by the
        iteration)."""
        if self.dm is not None and self.warm_fakes is not None and not self.state_path.is_file():
            steps = self.cfg.stage2.distribution_matching.warm_start_steps
            fakes, n, labels = self.warm_fakes
            logs = self.dm.warm_start(fakes, n, self.seed, self.stage, labels)
            if logs:
                first, last = (" ".join(f"{k}={v:.4g}" for k, v in logs[x].items()) for x in logs)
                self.log(f"fake score warm start: {steps} updates on the saved fakes: {first} -> {last}")
        return super().fit()

    # -- the step ----------------------------------------------------------------------------------
    def train_step(self, step):
        logs = self.critic_steps(step) if self.online is not None else {}
        if self.dm is not None:  # the fake score's n_fake updates on the current weights' samples
            model = engine.forward_module(self.acc, self.ddp_unet, self.unet)
            logs.update(self.dm.fake_steps(step, model, self.rollouts, self.seed, self.stage))
        of, done = self.cfg.training.gradient_accumulation_steps, []

        # micro-batch i's loss (the whole batch's without accumulation), run inside apply_update
        def micro(i):
            loss, parts, n = self.compute_loss(step, i, of)
            done.append((float(loss.detach()), parts))
            return loss * local_weight(n, self.batch, self.world)

        with contextlib.ExitStack() as frozen:  # the online D and the fake score (its feature head)
            for model in (m for m in (self.online, self.dm) if m is not None):
                frozen.enter_context(model.frozen())
            self.apply_update(
                [lambda i=i: micro(i) for i in range(of)],
                self.ddp_unet,
                self.unet,
                self.opt,
                self.sched,
                self.cfg.training.max_grad_norm,
                self.ema,
            )
        parts = {key: sum(p[key] for _, p in done) for key in done[0][1]}  # the loss's parts, adv_ratio
        return {"loss": sum(x for x, _ in done), **parts, **logs}

    def critic_steps(self, step) -> dict:
        """Online mode: the online D's n_critic updates before generator step `step`."""

        def reals(n, draw):  # n of this rank's training reals, the phase's draw-th critic draw
            pos = draw_local(
                self.tr, n, draw, self.per_epoch, self.seed, self.stage, "critic-real", self.rank
            )
            y = None if self.real_labels is None else self.real_labels[pos].to(self.acc.device)
            return self.real[pos].to(self.acc.device).float(), y

        model = engine.forward_module(self.acc, self.ddp_unet, self.unet)
        return self.online.critic_steps(step, model, self.rollouts, reals, self.seed, self.stage)

    def compute_loss(self, step, i=0, of=1):
        """The composite loss of `step` on this rank: (loss, parts, local batch size); with of > 1, that of
        micro-batch i of the same samples and draws, each term scaled by its share of the term's samples:
        they add up."""
        s2 = self.cfg.stage2
        n_local = len(shard_range(self.batch, self.rank, self.world))
        pos = draw_local(self.tr, n_local, step, self.per_epoch, self.seed, self.stage, "epoch", self.rank)
        x0 = self.real[pos]
        noise, t = batch_noise_and_timesteps(
            x0.shape, self.schedule.num_steps, self.seed, self.stage, step, self.rank
        )
        if s2.mse_skip_sampler_timesteps:  # a timestep the sampler visits is redrawn from the others
            t = avoid_timesteps(
                t, self.sampler_t, self.schedule.num_steps, self.seed, self.stage, step, self.rank
            )
        y_true = y = None
        if self.labels is not None:  # the reals' classes, each dropped to the null label as stage 1 did
            y_true = self.real_labels[pos]
            y = self.labels.dropped(y_true, range(len(pos)), self.seed, self.stage, step, self.rank, "mse")
        in_range = (
            self.rollouts.x0_pred_mask(t) if y is None else self.rollouts.x0_pred_mask(t) & (y == y_true)
        )
        mb, kept = np.array_split(np.arange(len(pos)), of)[i], int(in_range.sum())  # mb: all if of == 1
        x0, noise, t = (v[mb].to(self.acc.device) for v in (x0, noise, t))
        if y is not None:
            y, y_true, in_range = (v[mb].to(self.acc.device) for v in (y, y_true, in_range))
        x_t = self.schedule.add_noise(x0, noise, t)
        generated, generated_share = self.loss.needs_generated, 1.0
        inputs, ts, ys = [x_t], [t], [y]
        rollout = generated and s2.generator_loss_mode == "rollout"
        if rollout:
            every = list(shard_range(s2.rollout_batch_size or self.batch, self.rank, self.world))
            mine = np.array_split(np.asarray(every, dtype=np.int64), of)[i].tolist()
            generated_share = len(mine) / max(len(every), 1)
            parts = (self.seed, self.stage, "rollout", step)
            x_r, t_last, gens = self.rollouts.start(
                engine.forward_module(self.acc, self.ddp_unet, self.unet),
                mine,
                parts,
                self.rollouts.steps_for(parts),
            )
            y_r = self.rollouts.labels_for(mine, parts)
            guided = y_r is not None and self.labels.scale != 1.0
            for copy_ in (x_r, x_r) if guided else (x_r,):  # guidance: the null label's output too
                inputs.append(copy_)
                ts.append(t_last.reshape(1).expand(len(mine)).to(self.acc.device))
            if y_r is not None:
                ys += [y_r, torch.full_like(y_r, self.labels.null_class)] if guided else [y_r]
        labels = None if ys[0] is None else torch.cat(ys)
        with self.acc.autocast():
            # One wrapped forward for the MSE batch and the rollouts' last step: DDP sees one graph.
            out = self.ddp_unet(torch.cat(inputs), torch.cat(ts), class_labels=labels).sample.float()
        n = x0.shape[0]
        outputs = self.rollouts.outputs(out[:n], x_t, t, x0, noise)
        if rollout:
            last = out[n:]
            if guided:  # classifier-free guidance of the last step (conditioning.model_output's formula)
                cond, uncond = last[: len(mine)], last[len(mine) :]
                last = uncond + self.labels.scale * (cond - uncond)
            sample = self.rollouts.last_step(last, t_last, x_r, gens)
            outputs.update(self.rollouts.generated(sample, mine, self.seed, self.stage, step, y_r))
        elif generated:  # a dropped label's prediction is unconditional: D does not score it
            keep = self.rollouts.x0_pred_mask(t) if y is None else in_range
            outputs["generated"] = outputs["pred_latent"][keep]
            outputs["generated_t"] = t[keep]
            outputs["generated_labels"] = None if y is None else y_true[keep]
            generated_share = int(keep.sum()) / max(kept, 1)  # of the batch's samples in the x0_pred range
        loss, parts = self.loss(
            outputs,
            self.loss_context(),
            shares={"batch": n / len(pos), "generated": generated_share},
            ratio_at=self.unet.conv_out.weight,
            world=self.world,
        )
        return loss, parts, len(pos)

    def loss_context(self) -> dict:
        return {
            "discriminator": self.d,
            "d_loss": self.cfg.discriminator.training.loss,
            "distribution_matching": self.dm,
        }

    # -- state and exports -------------------------------------------------------------------------
    def model_state(self):
        state = {
            "optimizer": self.optimizer_state(self.opt),
            "lr_scheduler": self.sched.state_dict(),
            "ema": self.ema.state_dict() if self.ema is not None else None,
            "loss": self.loss.state_dict(),
        }
        if self.dm is not None:
            state["distribution_matching"] = self.dm.state(self.fake_engine_path)
            if self.dm.features is not None and self.step >= self.max_steps:  # written before the state
                self.dm.export_features(self.feature_path, self.unet_config, self.k, self.step)
        if self.online is not None:
            state["online_d"] = self.online.state(self.online_engine_path)
            if (
                self.step >= self.max_steps
            ):  # the final D, written before the state that marks the phase complete
                self.online.export(self.online_path, self.k, self.step)
        return state

    def load_model_state(self, state):
        if self.online is not None:
            if "online_d" not in state:
                raise UserError(
                    f"{self.state_path}: written without an online discriminator; delete it to restart "
                    f"iteration {self.k}'s fine-tune"
                )
            self.online.load_state(state["online_d"], self.online_engine_path)
        if self.dm is not None:
            if "distribution_matching" not in state:  # (the fingerprint names the term's fields first)
                raise UserError(f"{self.state_path}: written without a fake score; delete it to restart")
            self.dm.load_state(state["distribution_matching"], self.fake_engine_path)
        self.load_optimizer_state(self.opt, state["optimizer"])
        # states written before the loss kept its own state hold its weights in `adv_weights` here
        self.loss.load_state_dict(state.get("loss", state))
        self.sched.load_state_dict(state["lr_scheduler"])
        if self.ema is not None:
            self.ema.load_state_dict(state["ema"])

    def _export(self, metrics):
        s2 = self.cfg.stage2
        # the sampler these weights were fine-tuned for (few-step weights are meant for exactly K steps)
        blob = export_blob(
            self.unet_config,
            engine.state_dict(self.acc, self._eval_model()),
            self.scaling,
            self.step,
            metrics,
            schedule=self.schedule.to_dict(),
            autoencoder=self.autoencoder,
            config=self.cfg.to_dict(),
            dest=self.best_path,
            raw_weights=engine.state_dict(self.acc, self.unet),
            sampling={"sampler": "ddim", "steps": s2.generation_steps, "eta": s2.eta},
            conditioning=self.conditioning,
        )
        blob.update(iteration=self.k, epoch=metrics.get("epoch"), stage="stage2")
        return blob

    def wrap_state(self, state):
        blob = self._export(self.history[-1] if self.history else {})
        blob.update(state=state, complete=state["complete"])
        return blob

    def unwrap_state(self, blob):
        engine.load_state_dict(self.acc, self.unet, blob["raw_state_dict"])
        return blob["state"]

    def export(self, tag, metrics):
        if tag == "best":
            blob = self._export(metrics)
            if self.acc.is_main_process:
                atomic.save_torch(blob, self.best_path)
