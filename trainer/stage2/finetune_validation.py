"""The fine-tune's validation (FinetuneTrainer's evaluate): the EMA weights on the held-out reals at fixed
noise and timesteps, the critic's view of the generator's samples, and the history row.

The loss's columns (val_loss, val_mse, val_adv, ...) come from the CompositeLoss, which measures its terms
on the validation batch and on the generated samples (the sample source, samples.py, says which); the rest
of the row is the critic's accuracy and mean probability on those samples, and the run's counters. After
the row, the composite adapts its weights to the critic's accuracy (stage2.adaptive_weight).
"""

from __future__ import annotations

import contextlib
import time

import torch

from trainer.diffusion.conditioning import model_output
from trainer.diffusion.noise import per_sample_noise, per_sample_timesteps
from trainer.parallel.collectives import Totals
from trainer.training.ema import sync_eval_copy


class FinetuneValidation:
    """The validation of one FinetuneTrainer (`run`): its data, models, critic, loss and counters."""

    def __init__(self, run):
        self.run = run
        self.sums = self.ctx = None

    def eval_model(self):
        run = self.run
        return sync_eval_copy(run.ema, run.ema_unet, run.accelerator, run.unet)

    @torch.no_grad()
    def evaluate(self) -> dict:
        run = self.run
        model = self.eval_model()
        # prob/fake_correct over generated samples (n_gen), real_correct over reals (n_real)
        names = [*run.loss.val_sums, "n_val", "prob", "n_gen", "fake_correct", "real_correct", "n_real"]
        self.sums, self.ctx = Totals(names, run.accelerator.device), run.loss_context()
        critic = run.critic
        with critic.evaluating() if critic is not None else contextlib.nullcontext():
            for s in range(0, len(run.va), 256):
                self._chunk(model, s)
            if critic is not None:
                run.source.validate_generated(self, model)
        return self._row(model, self.sums.reduced())

    def _chunk(self, model, s: int) -> None:
        run = self.run
        pos, idx = run.va[s : s + 256], run.va_global[s : s + 256]
        x0 = run.real[pos].to(run.accelerator.device)
        noise = per_sample_noise(idx, run.latent_shape, run.seed, "gval", run.k).to(x0.device)
        t = per_sample_timesteps(idx, run.schedule.num_steps, run.seed, "gval-t", run.k).to(x0.device)
        x_t = run.schedule.add_noise(x0, noise, t)
        y = None if run.real_labels is None else run.real_labels[pos].to(x0.device)
        with run.accelerator.autocast():
            out = model_output(model, x_t, t, y).float()
        outputs = run.rollouts.outputs(out, x_t, t, x0, noise)
        run.loss.add_val_batch(outputs, self.ctx, self.sums)
        self.sums.add("n_val", len(pos))
        if run.critic is not None:
            run.source.validate_batch(self, x0, t, y, outputs, idx)

    def _row(self, model, s: dict) -> dict:
        run = self.run
        n_val, n_gen, n_real = max(s["n_val"], 1), s["n_gen"], s["n_real"]
        d_acc = (
            0.5 * (s["fake_correct"] / n_gen + s["real_correct"] / n_real)
            if n_gen and n_real
            else float("nan")
        )
        row = {
            "epoch": round(run.step / run.per_epoch, 4),
            **run.loss.val_row(s, n_val, n_gen),
            "d_prob_fake": s["prob"] / n_gen if n_gen else float("nan"),
            "lr": run.sched.get_last_lr()[0],
            "seconds": round(time.time() - run.t0, 2),
            "d_val_acc": d_acc,
            "adv_weight": run.loss.adversarial_weight,
        }
        if run.quality is not None:
            row["val_latent_fd"] = run.quality(model)
        run.loss.adapt(d_acc)
        return row

    @torch.no_grad()
    def baseline(self):
        """The starting weights' quality, when the best checkpoint is chosen by it."""
        run = self.run
        if run.quality is None or run.cfg.stage2.best_metric != "val_latent_fd":
            return None
        return {"val_latent_fd": run.quality(self.eval_model())}

    def score_real(self, z, t, y=None) -> None:
        if len(z):
            self.sums.add("real_correct", (self.run.critic(z, t, y) > 0).sum())
            self.sums.add("n_real", len(z))

    def score(self, z, t, extra=None) -> None:
        """The critic's view of generated samples; the loss measures its generated parts on the same logits
        (and on `extra`: what the sample source gives the other generated terms)."""
        if len(z) == 0:
            return
        logits = self.run.critic(z, t, (extra or {}).get("generated_labels")).float()
        outputs = {"generated": z, "generated_t": t, "generated_logits": logits, **(extra or {})}
        self.run.loss.add_val_generated(outputs, self.ctx, self.sums)
        self.sums.add("prob", torch.sigmoid(logits).sum())
        self.sums.add("n_gen", len(z))
        self.sums.add("fake_correct", (logits < 0).sum())
