"""The fine-tune's validation (FinetuneTrainer's evaluate): the EMA weights on the held-out reals at fixed
noise and timesteps, D's view of the generator's samples, and the history row.

The loss's columns (val_loss, val_mse, val_adv, ...) come from the CompositeLoss, which measures its terms
on the validation batch and on the generated samples; the rest of the row is D's accuracy and mean
probability on those samples, and the run's counters. After the row, the composite adapts its weights to
D's accuracy (stage2.adaptive_weight).
"""

from __future__ import annotations

import time

import torch

from trainer.diffusion.conditioning import model_output
from trainer.diffusion.noise import per_sample_noise, per_sample_timesteps
from trainer.parallel.collectives import Totals, shard_range
from trainer.training.ema import sync_eval_copy


class FinetuneValidation:
    """Mixed into FinetuneTrainer; uses its data (real, va, va_global), models (ema, ema_unet, unet, d,
    online), loss, rollouts and counters."""

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
        # prob/fake_correct over generated samples (n_gen), real_correct over reals (n_real)
        sums = Totals(
            [*self.loss.val_sums, "n_val", "prob", "n_gen", "fake_correct", "real_correct", "n_real"],
            self.acc.device,
        )
        ctx = self.loss_context()
        for s in range(0, len(self.va), 256):
            pos = self.va[s : s + 256]
            x0 = self.real[pos].to(self.acc.device)
            idx = self.va_global[s : s + 256]
            noise = per_sample_noise(idx, self.latent_shape, self.seed, "gval", self.k).to(x0.device)
            t = per_sample_timesteps(idx, self.schedule.num_steps, self.seed, "gval-t", self.k).to(x0.device)
            x_t = self.schedule.add_noise(x0, noise, t)
            y = None if self.real_labels is None else self.real_labels[pos].to(x0.device)
            with self.acc.autocast():
                out = model_output(model, x_t, t, y).float()
            outputs = self.rollouts.outputs(out, x_t, t, x0, noise)
            self.loss.add_val_batch(outputs, ctx, sums)
            sums.add("n_val", len(pos))
            if self.d is not None and s2.generator_loss_mode == "x0_pred":
                keep = self.rollouts.x0_pred_mask(t)
                y_keep = None if y is None else y[keep]
                self._score(outputs["pred_latent"][keep], t[keep], sums, ctx, {"generated_labels": y_keep})
                self._score_real(x0[keep], t[keep], sums, y_keep)
            elif self.d is not None:
                z, t_d = self.rollouts.for_validation(x0, idx, self.seed, "gval-d-real", self.k)
                self._score_real(z, t_d, sums, y)
        if self.d is not None and s2.generator_loss_mode == "rollout":
            mine = list(shard_range(s2.val_samples, self.rank, self.world))
            if mine:
                parts = (self.seed, "gval-rollout", self.k)
                z = self.rollouts.sample(model, mine, parts)
                seed = (self.seed, "gval-dm", self.k)  # the distribution-matching term's draws on them
                extra = {"generated_sample": z, "generated_index": mine, "generated_seed": seed}
                extra["generated_labels"] = self.rollouts.labels_for(mine, parts)
                z_d, t_d = self.rollouts.for_validation(z, mine, self.seed, "gval-d-fake", self.k)
                self._score(z_d, t_d, sums, ctx, extra)
        s = sums.reduced()
        n_val, n_gen, n_real = max(s["n_val"], 1), s["n_gen"], s["n_real"]
        d_acc = (
            0.5 * (s["fake_correct"] / n_gen + s["real_correct"] / n_real)
            if n_gen and n_real
            else float("nan")
        )
        row = {
            "epoch": round(self.step / self.per_epoch, 4),
            **self.loss.val_row(s, n_val, n_gen),
            "d_prob_fake": s["prob"] / n_gen if n_gen else float("nan"),
            "lr": self.sched.get_last_lr()[0],
            "seconds": round(time.time() - self.t0, 2),
            "d_val_acc": d_acc,
            "adv_weight": self.loss.adversarial_weight,
        }
        if self.quality is not None:
            row["val_latent_fd"] = self.quality(model)
        self.loss.adapt(d_acc)
        return row

    @torch.no_grad()
    def baseline(self):
        """The starting weights' quality, when the best checkpoint is chosen by it."""
        if self.quality is None or self.cfg.stage2.best_metric != "val_latent_fd":
            return None
        return {"val_latent_fd": self.quality(self._eval_model())}

    def _score_real(self, z, t, sums, y=None):
        if len(z):
            sums.add("real_correct", (self._d(z, t, y) > 0).sum())
            sums.add("n_real", len(z))

    def _score(self, z, t, sums, ctx, extra=None):
        """D's view of generated samples; the loss measures its generated parts on the same logits (and on
        `extra`: what rollouts give the other generated terms, trainer/stage2/rollouts.py)."""
        if len(z) == 0:
            return
        logits = self._d(z, t, (extra or {}).get("generated_labels")).float()
        outputs = {"generated": z, "generated_t": t, "generated_logits": logits, **(extra or {})}
        self.loss.add_val_generated(outputs, ctx, sums)
        sums.add("prob", torch.sigmoid(logits).sum())
        sums.add("n_gen", len(z))
        sums.add("fake_correct", (logits < 0).sum())

    def _d(self, z, t, y=None):
        """D's logits; with a class-conditional run's labels y, of the (sample, label) pairs."""
        return self.d(z, t) if y is None else self.d(z, t, y)
