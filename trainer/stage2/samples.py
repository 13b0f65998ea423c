"""Where the generator's samples come from: the one place stage2.generator_loss_mode is read.

  rollout  (RolloutSource) DDIM from fresh noise with the current weights, gradients through the last K
           steps (rollouts.py); the offline D was trained on fully sampled fakes of the same settings.
  x0_pred  (X0PredSource) the one-step x0 predictions of the step's noised reals at timesteps below
           x0_pred_max_timestep; the offline D was trained on exactly those, with their t.

A source gives the fine-tune's step the samples its "generated" terms read (`begin`: what the step's one
wrapped forward must also run; `finish`: the samples from that forward's output, as the critic scores them),
gives validation the samples D scores (`validate_batch`, `validate_generated`), the offline D its fakes
(`fakes_for_discriminator`), and records what D was trained on (`d_inputs`).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from trainer.parallel.collectives import shard_range
from trainer.stage2.generation import x0_pred_fakes


def x0_pred_mask(cfg, t, num_steps: int):
    """The timesteps whose one-step x0 predictions D scores in x0_pred mode."""
    return t < int(cfg.stage2.x0_pred_max_timestep * num_steps)


@dataclass
class Pending:
    """The rollouts of a step waiting for their last, wrapped forward: the inputs it adds (x, t, labels)."""

    inputs: list
    ts: list
    ys: list
    mine: list
    share: float
    x: object = None
    t_last: object = None
    gens: object = None
    labels: object = None
    guided: bool = False


class RolloutSource:
    name = "rollout"
    reads_batch = False  # its samples come from fresh noise

    def __init__(self, cfg):
        self.cfg = cfg

    def d_inputs(self) -> dict:
        """What an offline or online D file's D was trained on: rollout samples, noised where noise_inputs."""
        td = self.cfg.discriminator.training
        if td.noise_inputs:
            return {"kind": "noised", "max_timestep": td.noise_max_timestep}
        return {"kind": "clean", "max_timestep": 0.0}

    def fakes_for_discriminator(self, accelerator, s, shard, gen_unet, k):
        """(fakes, fake_t, fake_labels, real_t) the offline D trains on: the iteration's saved fakes."""
        return shard.fake, None, shard.fake_labels, None

    def begin(self, run, step: int, i: int, of: int) -> Pending:
        """Rollouts of micro-batch i of `of` up to their last step, and that step's inputs."""
        s2, device = self.cfg.stage2, run.accelerator.device
        every = list(shard_range(s2.rollout_batch_size or run.batch, run.rank, run.world))
        mine = np.array_split(np.asarray(every, dtype=np.int64), of)[i].tolist()
        parts = (run.seed, run.stage, "rollout", step)
        rollouts = run.rollouts
        backsim = s2.backward_simulation
        x, t_last, gens = rollouts.start(run.model(), mine, parts, rollouts.steps_for(parts), backsim)
        y = rollouts.labels_for(mine, parts)
        guided = y is not None and run.labels.scale != 1.0
        copies = 2 if guided else 1  # guidance: the null label's output too
        ts = [t_last.reshape(1).expand(len(mine)).to(device)] * copies
        ys = [] if y is None else ([y, torch.full_like(y, run.labels.null_class)] if guided else [y])
        share = len(mine) / max(len(every), 1)
        return Pending([x] * copies, ts, ys, mine, share, x, t_last, gens, y, guided)

    def finish(self, run, out: torch.Tensor, batch, pending: Pending, step: int):
        """(the outputs the generated terms read, their share of the step's samples)."""
        last = out
        if pending.guided:  # classifier-free guidance of the last step (conditioning.model_output's formula)
            n = len(pending.mine)
            cond, uncond = last[:n], last[n:]
            last = uncond + run.labels.scale * (cond - uncond)
        sample = run.rollouts.last_step(
            last, pending.t_last, pending.x, pending.gens, self.cfg.stage2.backward_simulation
        )
        z, t = run.view(sample, pending.mine, run.seed, run.stage, "generated", step)
        generated = {
            "generated_labels": pending.labels,
            "generated": z,
            "generated_t": t,
            "generated_sample": sample,
            "generated_index": list(pending.mine),
            "generated_seed": (run.seed, run.stage, "dm", step),
        }
        return generated, pending.share

    def validate_batch(self, val, x0, t, y, outputs, idx) -> None:
        """D's view of a validation chunk's reals (the generated samples are validate_generated's)."""
        z, t_d = val.run.val_view(x0, idx, val.run.seed, "gval-d-real", val.run.k)
        val.score_real(z, t_d, y)

    def validate_generated(self, val, model) -> None:
        """Fresh rollouts of the EMA weights, as D and the generated terms see them."""
        run, s2 = val.run, self.cfg.stage2
        mine = list(shard_range(s2.val_samples, run.rank, run.world))
        if not mine:
            return
        parts = (run.seed, "gval-rollout", run.k)
        z = run.rollouts.sample(model, mine, parts)
        seed = (run.seed, "gval-dm", run.k)  # the distribution-matching term's draws on them
        extra = {"generated_sample": z, "generated_index": mine, "generated_seed": seed}
        extra["generated_labels"] = run.rollouts.labels_for(mine, parts)
        z_d, t_d = run.val_view(z, mine, run.seed, "gval-d-fake", run.k)
        val.score(z_d, t_d, extra)


class X0PredSource:
    name = "x0_pred"
    reads_batch = True  # its samples are the predictions of the step's noised reals

    def __init__(self, cfg):
        self.cfg = cfg

    def d_inputs(self) -> dict:
        return {"kind": "x0_pred", "max_timestep": self.cfg.stage2.x0_pred_max_timestep}

    def fakes_for_discriminator(self, accelerator, s, shard, gen_unet, k):
        """One-step predictions from the reals, with their timesteps and the reals' labels."""
        fakes, t = x0_pred_fakes(
            accelerator,
            self.cfg,
            s.schedule,
            gen_unet,
            shard.real,
            shard.own,
            k,
            s.latent_shape,
            s.labels,
            shard.real_labels,
        )
        return fakes, t, shard.real_labels, t

    def mask(self, t, num_steps: int):
        return x0_pred_mask(self.cfg, t, num_steps)

    def begin(self, run, step: int, i: int, of: int) -> Pending:
        return Pending([], [], [], [], 1.0)

    def finish(self, run, out, batch, pending: Pending, step: int):
        """The in-range predictions of the step's reals (a dropped label's prediction is unconditional: D
        does not score it)."""
        keep = self.mask(batch.t, run.schedule.num_steps) if batch.y is None else batch.in_range
        generated = {
            "generated": batch.outputs["pred_latent"][keep],
            "generated_t": batch.t[keep],
            "generated_labels": None if batch.y is None else batch.y_true[keep],
        }
        return generated, int(keep.sum()) / max(batch.kept, 1)  # of the batch's in-range samples

    def validate_batch(self, val, x0, t, y, outputs, idx) -> None:
        keep = self.mask(t, val.run.schedule.num_steps)
        y_keep = None if y is None else y[keep]
        val.score(outputs["pred_latent"][keep], t[keep], {"generated_labels": y_keep})
        val.score_real(x0[keep], t[keep], y_keep)

    def validate_generated(self, val, model) -> None:
        pass


SOURCES = {"rollout": RolloutSource, "x0_pred": X0PredSource}


def sample_source(cfg):
    """The run's sample source (stage2.generator_loss_mode)."""
    return SOURCES[cfg.stage2.generator_loss_mode](cfg)
