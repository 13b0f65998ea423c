"""The generator's rollouts in the fine-tune, and the outputs its loss terms read.

Rollouts are DDIM from fresh noise with the current weights (stage2.generation_steps, eta): every step but
the last K (stage2.rollout_grad_steps) runs without gradients. The noise, and eta's per-step noise, are
drawn per sample index from the seed parts, so a sample is the same at any world size and batch size.
The training rollouts (`train_sample`, and the generator's `start(..., steps_for(parts))`) sample at a step
count drawn per batch from stage2.train_steps, from the batch's seed parts alone (the same on every rank).
A class-conditional run's rollout i carries a label drawn from (seed parts, i) (stage2/labels.py) and is
sampled at stage2.guidance_scale.

With stage2.backward_simulation a training rollout batch stops early: at step j of its K, drawn per batch
from its seed parts (the same on every rank), it runs steps 0..j-1 without gradient and returns the x0
prediction of step j, the one UNet call the caller keeps the gradient of. `sample` (validation) always
runs all K steps.
"""

from __future__ import annotations

import torch

from trainer.core.seeds import derive_seed
from trainer.diffusion.conditioning import model_output
from trainer.diffusion.noise import eta_generators, per_sample_noise
from trainer.diffusion.sampling import ddim_step


class Rollouts:
    def __init__(self, accelerator, cfg, schedule, latent_shape, labels=None):
        self.acc, self.cfg, self.schedule, self.latent_shape = accelerator, cfg, schedule, latent_shape
        self.ddim = schedule.ddim()
        self.labels = labels  # a class-conditional run's RunLabels

    def labels_for(self, idx, parts):
        """The class labels of rollouts idx with seed parts `parts` (None: an unconditional run)."""
        return None if self.labels is None else self.labels.rollouts(idx, *parts).to(self.acc.device)

    def out(self, model, x, t, y):
        """The model's output for rollouts with labels y, at the run's guidance scale."""
        if y is None:
            return model(x, t).sample
        return model_output(model, x, t, y, self.labels.scale, self.labels.null_class)

    def steps_for(self, parts) -> int:
        """The step count of a training rollout batch with seed parts `parts`: drawn from
        stage2.train_steps (generation_steps without one)."""
        ks = self.cfg.stage2.train_steps
        if not ks:
            return self.cfg.stage2.generation_steps
        return ks[derive_seed(*parts, "train-steps") % len(ks)]

    def start(self, model, idx, parts, steps: int | None = None, backsim: bool = False):
        """Noise for rollout indices, DDIM (`steps` steps; default generation_steps) up to the last step;
        the last K-1 steps keep gradients. Returns (x, the last timestep, eta's generators) for the last
        step, which the caller runs. backsim (stage2.backward_simulation): the "last" step is step j,
        drawn from the parts, and the steps before it run without gradient."""
        s2 = self.cfg.stage2
        x = per_sample_noise(idx, self.latent_shape, *parts).to(self.acc.device)
        self.ddim.set_timesteps(steps or s2.generation_steps, device=x.device)
        steps = list(self.ddim.timesteps)
        if backsim:  # stop at step j: the steps after it are not run
            steps = steps[: derive_seed(*parts, "backward-simulation") % len(steps) + 1]
        k = min(s2.rollout_grad_steps, len(steps))
        gens = eta_generators(idx, *parts) if s2.eta > 0 else None
        y = self.labels_for(idx, parts)
        with torch.no_grad(), self.acc.autocast():
            for t in steps[: len(steps) - k]:
                x = ddim_step(self.ddim, self.out(model, x, t, y), t, x, s2.eta, gens)
        with self.acc.autocast():
            for t in steps[len(steps) - k : -1]:
                # Earlier grad steps run on the unwrapped module; their parameter gradients are summed
                # into the same leaves before DDP's hooks fire on the final, wrapped forward.
                x = ddim_step(self.ddim, self.out(model, x, t, y), t, x, s2.eta, gens)
        return x, steps[-1], gens

    def last_step(self, model_output, t_last, x, gens, backsim: bool = False):
        """The sample from the last step's model output: its DDIM step, or with backsim its x0 prediction."""
        if backsim:
            t = t_last.reshape(1).expand(x.shape[0]).to(x.device)
            return self.schedule.predictions(model_output.float(), x.float(), t)[1]
        return ddim_step(self.ddim, model_output, t_last, x, self.cfg.stage2.eta, gens)

    def sample(self, model, idx, parts, steps: int | None = None, backsim: bool = False):
        """Whole rollouts of `model` for the indices (the caller chooses whether gradients flow); backsim:
        the x0 prediction at the batch's step j instead."""
        x, t_last, gens = self.start(model, idx, parts, steps, backsim)
        with self.acc.autocast():
            out = self.out(model, x, t_last, self.labels_for(idx, parts))
            return self.last_step(out, t_last, x, gens, backsim)

    def train_sample(self, model, idx, parts):
        """Whole rollouts at the batch's training step count (steps_for), or with
        stage2.backward_simulation its x0 prediction at a drawn step."""
        return self.sample(model, idx, parts, self.steps_for(parts), self.cfg.stage2.backward_simulation)

    def outputs(self, model_output, x_t, t, x0, noise) -> dict:
        """What the loss terms read (trainer/training/losses.py names the keys)."""
        pred_noise, pred_latent = self.schedule.predictions(model_output, x_t, t)
        return {
            "pred_noise": pred_noise,
            "noise": noise,
            "pred_latent": pred_latent,
            "latent": x0,
            "model_output": model_output,
            "model_target": self.schedule.target(x0, noise, t),
        }
