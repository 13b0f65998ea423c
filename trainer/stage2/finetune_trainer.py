"""The fine-tune phase of a stage-2 iteration: fine-tune the diffusion UNet with the composite loss, D frozen.

The sample D scores comes from the distribution D was trained on:
  rollout  DDIM from fresh noise with the current weights; gradients flow through the last K steps
           only. D was trained on fully sampled fakes from the same DDIM settings.
  x0_pred  one-step x0 predictions from noised real latents; D was trained on exactly those (at
           timesteps from the same range) as its fakes.

With `discriminator.training.mode: online` D is not frozen for the whole phase: before each generator
step it takes n_critic steps on fresh rollouts of the current weights (stage2/online.py), and it is
frozen only during the generator step itself.
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
from trainer.diffusion.noise import (
    batch_noise_and_timesteps,
    eta_generators,
    noised_inputs,
    per_sample_noise,
    per_sample_timesteps,
)
from trainer.diffusion.sampling import ddim_step
from trainer.parallel import engine
from trainer.parallel.accelerator import fast_optimizer, prepare_module
from trainer.parallel.collectives import Totals, all_reduce_sum, shard_range
from trainer.files import atomic
from trainer.stage2.online import OnlineDiscriminator
from trainer.training.ema import EMA, sync_eval_copy
from trainer.training.loop import StepTrainer, draw_local, local_weight
from trainer.training.losses import CompositeLoss, g_loss_terms, grad_norm_ratio
from trainer.training.optim import build_lr_schedule, build_optimizer

METRIC_FIELDS = [
    "epoch",
    "step",
    "train_loss",
    "train_mse",
    "train_adv",
    "val_loss",
    "val_mse",
    "val_adv",
    "d_prob_fake",
    "lr",
    "seconds",
    "d_val_acc",
    "adv_weight",
    "nonfinite_skipped",
]


def check_grad_ratio_supported(acc, s2, micro_batches: int = 1) -> None:
    """The gradient-norm ratio takes whole-batch gradients outside the backward: not in DeepSpeed or micro-batches."""
    if s2.grad_ratio_weight and (engine.is_deepspeed(acc) or micro_batches > 1):
        raise UserError(
            "stage2.grad_ratio_weight: takes the whole batch's gradients outside the backward, which "
            "DeepSpeed and training.gradient_accumulation_steps > 1 do not allow; set it to false there"
        )


class FinetuneTrainer(StepTrainer):
    history_fields = METRIC_FIELDS

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
    ):
        """base: the stage-1 model's facts (DiffusionCheckpoint: spec, latent scaling); schedule: its noise
        schedule; autoencoder: the frozen AE's path (recorded in exports); real: this rank's real latents
        (own global range); real_train: global train mask; d: the iteration's best D (frozen here);
        init: {"raw": state_dict, "ema": state_dict}; quality: model -> latent FD on fixed seeds (a
        collective), measured at each validation (column val_latent_fd) where given."""
        self.cfg, self.k, self.schedule = cfg, k, schedule
        self.unet_config, self.scaling, self.autoencoder = base.unet_config, base.scaling, autoencoder
        self.latent_shape = unet_sample_shape(base.unet_config)
        s2, t = cfg.stage2, cfg.training
        engine.check_accumulation(
            acc, t.gradient_accumulation_steps, t.batch_size
        )  # before any compute of this phase
        own = shard_range(real_train.shape[0], acc.process_index, acc.num_processes)
        local = np.arange(own.start, own.stop)
        self.real = real
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
        fingerprint = {
            "unet": self.unet_config,
            "scheduler": schedule.to_dict(),
            "seed": t.seed,
            "num_samples": s2.num_samples,
            "mode": s2.generator_loss_mode,
            "loss": [dict(x.__dict__) for x in t.loss.losses],
            "lr": self.lr,
            "batch_size": t.batch_size,
            "generation_steps": s2.generation_steps,
            "eta": s2.eta,
            "rollout_grad_steps": s2.rollout_grad_steps,
            "ema_decay": t.ema_decay,
        }
        if s2.grad_ratio_weight:
            fingerprint["grad_ratio_max"] = s2.grad_ratio_max
        td = cfg.discriminator.training
        self.online_mode = td.mode == "online" and d is not None and s2.generator_loss_mode == "rollout"
        if self.online_mode or td.noise_inputs:  # (older states have neither key)
            fingerprint["discriminator"] = {
                k: getattr(td, k)
                for k in (
                    "mode",
                    "n_critic",
                    "online_batch_size",
                    "noise_inputs",
                    "noise_max_timestep",
                    "loss",
                    "r1_gamma",
                    "learning_rate",
                    "betas",
                    "weight_decay",
                )
            }
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
        self.quality = quality
        if quality is not None:
            self.history_fields = METRIC_FIELDS + ["val_latent_fd"]
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
        self.sched = build_lr_schedule(opt, s2.warmup_steps, max_steps, t.scheduler.type)
        self.ddp_unet, self.opt = engine.prepare(acc, self.unet, opt, t.batch_size, t.max_grad_norm)
        self.ema_unet.to(acc.device)
        self.loss = CompositeLoss.from_config(t.loss)
        self.d = d
        if s2.grad_ratio_weight:
            check_grad_ratio_supported(acc, s2, t.gradient_accumulation_steps)
            self.history_fields = self.history_fields + ["train_adv_ratio"]
        self.online = None
        if self.online_mode:  # D trains beside the UNet; frozen only inside the generator step
            self.online = OnlineDiscriminator(acc, cfg, d)
            self.d = self.online.d
            self.history_fields = self.history_fields + ["train_d_loss", "train_d_acc"]
        elif d is not None:
            d.requires_grad_(False)  # frozen: gradients reach the UNet through D, never D itself
            self.d = d.to(acc.device).eval()
        self.ddim = schedule.ddim()
        self.t0 = time.time()

    # -- sampling pieces -------------------------------------------------------------------------
    def _rollout_start(self, model, idx, parts):
        """Noise for rollout indices, DDIM up to the last step; the last K-1 steps keep gradients."""
        s2 = self.cfg.stage2
        x = per_sample_noise(idx, self.latent_shape, *parts).to(self.acc.device)
        self.ddim.set_timesteps(s2.generation_steps, device=x.device)
        steps = list(self.ddim.timesteps)
        k = min(s2.rollout_grad_steps, len(steps))
        gens = eta_generators(idx, *parts) if s2.eta > 0 else None
        with torch.no_grad(), self.acc.autocast():
            for t in steps[: len(steps) - k]:
                x = ddim_step(self.ddim, model(x, t).sample, t, x, s2.eta, gens)
        with self.acc.autocast():
            for t in steps[len(steps) - k : -1]:
                # Earlier grad steps run on the unwrapped module; their parameter gradients are summed
                # into the same leaves before DDP's hooks fire on the final, wrapped forward.
                x = ddim_step(self.ddim, model(x, t).sample, t, x, s2.eta, gens)
        return x, steps[-1], gens

    def _outputs(self, model_output, x_t, t, x0, noise):
        pred_noise, pred_latent = self.schedule.predictions(model_output, x_t, t)
        return {
            "pred_noise": pred_noise,
            "noise": noise,
            "pred_latent": pred_latent,
            "latent": x0,
            "model_output": model_output,
            "model_target": self.schedule.target(x0, noise, t),
        }

    def _x0_pred_mask(self, t):
        return t < int(self.cfg.stage2.x0_pred_max_timestep * self.schedule.num_steps)

    # -- the step ----------------------------------------------------------------------------------
    def train_step(self, step):
        logs = self.critic_steps(step) if self.online is not None else {}
        of, done = self.cfg.training.gradient_accumulation_steps, []

        def micro(
            i,
        ):  # micro-batch i's loss (the whole batch's without accumulation), run inside apply_update
            loss, parts, n = self.compute_loss(step, i, of)
            done.append((float(loss.detach()), parts))
            return loss * local_weight(n, self.batch, self.world)

        with self.online.frozen() if self.online is not None else contextlib.nullcontext():
            self.apply_update(
                [lambda i=i: micro(i) for i in range(of)],
                self.ddp_unet,
                self.unet,
                self.opt,
                self.sched,
                self.cfg.training.max_grad_norm,
                self.ema,
            )
        parts = {key: sum(p[key] for _, p in done) for key in done[0][1]}  # mse, adv (and adv_ratio)
        return {"loss": sum(x for x, _ in done), **parts, **logs}

    def critic_steps(self, step) -> dict:
        """Online mode: n_critic D updates on fresh rollouts of the current weights against this rank's reals."""
        td = self.cfg.discriminator.training
        online, sums = self.online, {"d_loss": 0.0, "d_acc": 0.0}
        mine = list(shard_range(online.half, self.rank, self.world))
        model = engine.forward_module(self.acc, self.ddp_unet, self.unet)
        for c in range(td.n_critic):
            parts = (self.seed, self.stage, "critic", step, c)
            with torch.no_grad():
                x, t_last, gens = self._rollout_start(model, mine, (*parts, "rollout"))
                with self.acc.autocast():
                    fake = ddim_step(
                        self.ddim, model(x, t_last).sample, t_last, x, self.cfg.stage2.eta, gens
                    ).float()
            pos = draw_local(
                self.tr,
                len(mine),
                step * td.n_critic + c,
                self.per_epoch,
                self.seed,
                self.stage,
                "critic-real",
                self.rank,
            )
            real = self.real[pos].to(self.acc.device).float()
            real_t = fake_t = None
            if td.noise_inputs:
                real, real_t = noised_inputs(self.schedule, real, mine, td.noise_max_timestep, *parts, "real")
                fake, fake_t = noised_inputs(self.schedule, fake, mine, td.noise_max_timestep, *parts, "fake")
            out = online.step(
                real, real_t, fake, fake_t, local_weight(2 * len(mine), 2 * online.half, self.world)
            )
            for key in sums:
                sums[key] += out[key] / td.n_critic
        return sums

    def compute_loss(self, step, i=0, of=1):
        """The composite loss of `step` on this rank: (loss, parts, local batch size); with of > 1, that of micro-batch
        i of the same samples and draws, each term scaled by its share of the term's samples: they add up."""
        s2 = self.cfg.stage2
        n_local = len(shard_range(self.batch, self.rank, self.world))
        pos = draw_local(self.tr, n_local, step, self.per_epoch, self.seed, self.stage, "epoch", self.rank)
        x0 = self.real[pos]
        noise, t = batch_noise_and_timesteps(
            x0.shape, self.schedule.num_steps, self.seed, self.stage, step, self.rank
        )
        mb, kept = (
            np.array_split(np.arange(len(pos)), of)[i],
            int(self._x0_pred_mask(t).sum()),
        )  # mb: all if of == 1
        x0, noise, t = (v[mb].to(self.acc.device) for v in (x0, noise, t))
        x_t = self.schedule.add_noise(x0, noise, t)
        adv = self.loss.needs_discriminator
        inputs, ts = [x_t], [t]
        rollout = adv and s2.generator_loss_mode == "rollout"
        if rollout:
            every = list(shard_range(s2.rollout_batch_size or self.batch, self.rank, self.world))
            mine = np.array_split(np.asarray(every, dtype=np.int64), of)[i].tolist()
            adv_share = len(mine) / max(len(every), 1)
            x_r, t_last, gens = self._rollout_start(
                engine.forward_module(self.acc, self.ddp_unet, self.unet),
                mine,
                (self.seed, self.stage, "rollout", step),
            )
            inputs.append(x_r)
            ts.append(t_last.reshape(1).expand(len(mine)).to(self.acc.device))
        with self.acc.autocast():
            # One wrapped forward for the MSE batch and the rollouts' last step: DDP sees one graph.
            out = self.ddp_unet(torch.cat(inputs), torch.cat(ts)).sample.float()
        n = x0.shape[0]
        outputs = self._outputs(out[:n], x_t, t, x0, noise)
        if rollout:
            outputs["generated"] = ddim_step(self.ddim, out[n:], t_last, x_r, s2.eta, gens)
            outputs["generated_t"] = None
            td = self.cfg.discriminator.training
            if (
                td.noise_inputs
            ):  # D scores the sample forward-noised, as it was trained (still differentiable)
                outputs["generated"], outputs["generated_t"] = noised_inputs(
                    self.schedule,
                    outputs["generated"].float(),
                    mine,
                    td.noise_max_timestep,
                    self.seed,
                    self.stage,
                    "generated",
                    step,
                )
        elif adv:
            keep = self._x0_pred_mask(t)
            outputs["generated"] = outputs["pred_latent"][keep]
            outputs["generated_t"] = t[keep]
            adv_share = int(keep.sum()) / max(kept, 1)  # of the batch's samples in the x0_pred range
        ctx = {"discriminator": self.d, "d_loss": self.cfg.discriminator.training.loss}
        if s2.grad_ratio_weight and adv:
            anchor, adversarial = self.loss.parts(outputs, ctx)
            if anchor is not None:
                ratio = grad_norm_ratio(anchor, adversarial, self.unet.conv_out.weight, s2.grad_ratio_max)
                ratio = all_reduce_sum(ratio.reshape(1).float()) / self.world  # every rank weighs alike
                loss = anchor + ratio[0] * adversarial
                # logged like CompositeLoss's parts: the terms' unweighted values
                w_mse = sum(x.weight for x in self.loss.terms if not x.needs_discriminator)
                w_adv = sum(x.weight for x in self.loss.terms if x.needs_discriminator)
                return (
                    loss,
                    {
                        "mse": float(anchor.detach()) / w_mse,
                        "adv": float(adversarial.detach()) / w_adv,
                        "adv_ratio": float(ratio[0]),
                    },
                    n,
                )
        loss, parts = 0.0, {"mse": 0.0, "adv": 0.0}
        for (
            term
        ) in self.loss.terms:  # CompositeLoss's sum, each term scaled by its share (1 without accumulation)
            value = term(outputs, ctx) * (adv_share if term.needs_discriminator else n / len(pos))
            loss = loss + term.weight * value
            parts["adv" if term.needs_discriminator else "mse"] += float(value.detach())
        return loss, parts, len(pos)

    # -- validation --------------------------------------------------------------------------------
    def _eval_model(self):
        return sync_eval_copy(self.ema, self.ema_unet, self.acc, self.unet)

    @torch.no_grad()
    def evaluate(self):
        if self.online is None:
            return self._evaluate()
        self.d.eval()
        try:
            return self._evaluate()
        finally:
            self.d.train()

    def _evaluate(self):
        s2 = self.cfg.stage2
        model = self._eval_model()
        # adv/prob/fake_correct over generated samples (n_gen), real_correct over reals (n_real)
        sums = Totals(
            [
                "mse_weighted",
                "mse_raw",
                "n_val",
                "adv",
                "prob",
                "n_gen",
                "fake_correct",
                "real_correct",
                "n_real",
            ],
            self.acc.device,
        )
        mse_terms = [term for term in self.loss.terms if not term.needs_discriminator]
        for s in range(0, len(self.va), 256):
            pos = self.va[s : s + 256]
            x0 = self.real[pos].to(self.acc.device)
            idx = self.va_global[s : s + 256]
            noise = per_sample_noise(idx, self.latent_shape, self.seed, "gval", self.k).to(x0.device)
            t = per_sample_timesteps(idx, self.schedule.num_steps, self.seed, "gval-t", self.k).to(x0.device)
            x_t = self.schedule.add_noise(x0, noise, t)
            with self.acc.autocast():
                out = model(x_t, t).sample.float()
            outputs = self._outputs(out, x_t, t, x0, noise)
            for term in mse_terms:
                per = ((outputs[term.key].float() - outputs[term.target].float()) ** 2).flatten(1).mean(1)
                sums.add("mse_weighted", term.weight * per.sum())
                sums.add("mse_raw", per.sum())
            sums.add("n_val", len(pos))
            if self.d is not None and s2.generator_loss_mode == "x0_pred":
                keep = self._x0_pred_mask(t)
                self._score(outputs["pred_latent"][keep], t[keep], sums)
                self._score_real(x0[keep], t[keep], sums)
            elif self.d is not None:
                self._score_real(x0, None, sums)
        if self.d is not None and s2.generator_loss_mode == "rollout":
            mine = list(shard_range(s2.val_samples, self.rank, self.world))
            if mine:
                x, t_last, gens = self._rollout_start(model, mine, (self.seed, "gval-rollout", self.k))
                with self.acc.autocast():
                    x = ddim_step(self.ddim, model(x, t_last).sample, t_last, x, s2.eta, gens)
                self._score(x, None, sums)
        s = sums.reduced()
        n_val, n_gen, n_real = max(s["n_val"], 1), s["n_gen"], s["n_real"]
        val_adv = s["adv"] / n_gen if n_gen else float("nan")
        adv_weight = sum(term.weight for term in self.loss.terms if term.needs_discriminator)
        d_acc = (
            0.5 * (s["fake_correct"] / n_gen + s["real_correct"] / n_real)
            if n_gen and n_real
            else float("nan")
        )
        row = {
            "epoch": round(self.step / self.per_epoch, 4),
            "val_loss": s["mse_weighted"] / n_val + adv_weight * (val_adv if n_gen else 0.0),
            "val_mse": s["mse_raw"] / n_val,
            "val_adv": val_adv,
            "d_prob_fake": s["prob"] / n_gen if n_gen else float("nan"),
            "lr": self.sched.get_last_lr()[0],
            "seconds": round(time.time() - self.t0, 2),
            "d_val_acc": d_acc,
            "adv_weight": adv_weight,
        }
        if self.quality is not None:
            row["val_latent_fd"] = self.quality(model)
        self._adapt(d_acc)
        return row

    @torch.no_grad()
    def baseline(self):
        """The starting weights' quality, when the best checkpoint is chosen by it."""
        if self.quality is None or self.cfg.stage2.best_metric != "val_latent_fd":
            return None
        return {"val_latent_fd": self.quality(self._eval_model())}

    def _adapt(self, d_acc: float) -> None:
        """Keep D's accuracy in the band: push harder when D wins, ease off when it is fooled."""
        s2 = self.cfg.stage2
        if not s2.adaptive_weight or d_acc != d_acc:
            return
        low, high = s2.adaptive_band
        factor = s2.adaptive_factor if d_acc > high else (1 / s2.adaptive_factor if d_acc < low else 1.0)
        for term in self.loss.terms:
            if term.needs_discriminator:
                term.weight *= factor

    def _score_real(self, z, t, sums):
        if len(z):
            sums.add("real_correct", (self.d(z, t) > 0).sum())
            sums.add("n_real", len(z))

    def _score(self, z, t, sums):
        if len(z) == 0:
            return
        logits = self.d(z, t).float()
        sums.add("adv", g_loss_terms(self.cfg.discriminator.training.loss, logits).sum())
        sums.add("prob", torch.sigmoid(logits).sum())
        sums.add("n_gen", len(z))
        sums.add("fake_correct", (logits < 0).sum())

    # -- state and exports -------------------------------------------------------------------------
    def model_state(self):
        state = {
            "optimizer": self.optimizer_state(self.opt),
            "lr_scheduler": self.sched.state_dict(),
            "ema": self.ema.state_dict() if self.ema is not None else None,
            "adv_weights": [term.weight for term in self.loss.terms],
        }
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
        self.load_optimizer_state(self.opt, state["optimizer"])
        for term, weight in zip(self.loss.terms, state.get("adv_weights", [])):
            term.weight = weight
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
