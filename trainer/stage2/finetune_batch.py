"""What the fine-tune's step reads of the reals (`mse_batch`: the step's noised reals and their draws), the
timesteps its MSE term may avoid, and the blob its exports and resume state are written as."""

from __future__ import annotations

from types import SimpleNamespace

import numpy as np
import torch

from trainer.diffusion.checkpoints import export_blob
from trainer.diffusion.noise import avoid_timesteps, batch_noise_and_timesteps
from trainer.parallel import engine
from trainer.parallel.collectives import shard_range
from trainer.stage2.samples import x0_pred_mask
from trainer.training.loop import draw_local


def mse_batch(run, step, i, of):
    """Micro-batch i of `of` of the step's noised reals (of > 1: the same samples and draws, split)."""
    s2, device = run.cfg.stage2, run.accelerator.device
    n_local = len(shard_range(run.batch, run.rank, run.world))
    pos = draw_local(run.tr, n_local, step, run.per_epoch, run.seed, run.stage, "epoch", run.rank)
    x0 = run.real[pos]
    parts = (run.seed, run.stage, step, run.rank)
    noise, t = batch_noise_and_timesteps(x0.shape, run.schedule.num_steps, *parts)
    if s2.mse_skip_sampler_timesteps:  # a timestep the sampler visits is redrawn from the others
        t = avoid_timesteps(t, run.sampler_t, run.schedule.num_steps, *parts)
    y_true = y = None
    if run.labels is not None:  # the reals' classes, each dropped to the null label as stage 1 did
        y_true = run.real_labels[pos]
        y = run.labels.dropped(y_true, range(len(pos)), run.seed, run.stage, step, run.rank, "mse")
    in_range = x0_pred_mask(run.cfg, t, run.schedule.num_steps)
    in_range = in_range if y is None else in_range & (y == y_true)
    mb, kept = np.array_split(np.arange(len(pos)), of)[i], int(in_range.sum())  # mb: all if of == 1
    x0, noise, t = (v[mb].to(device) for v in (x0, noise, t))
    if y is not None:
        y, y_true, in_range = (v[mb].to(device) for v in (y, y_true, in_range))
    x_t = run.schedule.add_noise(x0, noise, t)
    fields = {"x0": x0, "noise": noise, "t": t, "y": y, "y_true": y_true, "in_range": in_range}
    return SimpleNamespace(n_all=len(pos), kept=kept, x_t=x_t, **fields)


def reads_reals(run) -> bool:
    """Whether the generator step runs its noised reals: a term (MSE) or the sample source (x0_pred) reads
    them, or stage2.real_batch is always."""
    return run.cfg.stage2.real_batch == "always" or run.loss.needs_batch or run.source.reads_batch


def step_batch(run, step, i, of):
    """Micro-batch i of the step's reals as the step's forward takes them: mse_batch with its forward
    inputs (inputs, ts, ys) and size n where they are read; else no inputs, only n_all (this rank's share
    of the batch, which weighs its loss)."""
    if not reads_reals(run):
        n_all = len(shard_range(run.batch, run.rank, run.world))
        return SimpleNamespace(n_all=n_all, n=0, inputs=[], ts=[], ys=[], outputs={})
    b = mse_batch(run, step, i, of)
    b.inputs, b.ts, b.ys, b.n = [b.x_t], [b.t], [b.y], b.x0.shape[0]
    return b


def sampler_timesteps(cfg, schedule):
    """mse_skip_sampler_timesteps: the timesteps the K-step sampler visits, and with train_steps those
    of every listed step count too."""
    s2 = cfg.stage2
    if not s2.train_steps:
        return schedule.sampler_timesteps(s2.generation_steps)
    ks = sorted({s2.generation_steps, *s2.train_steps})
    return torch.unique(torch.cat([schedule.sampler_timesteps(k) for k in ks]))


def export_blob_of(run, metrics):
    """The fine-tune's export of its EMA weights (and raw weights) with the metrics, as its best file and
    the body of its resume state hold it."""
    s2, accelerator = run.cfg.stage2, run.accelerator
    # the sampler these weights were fine-tuned for (few-step weights are meant for exactly K steps)
    blob = export_blob(
        run.unet_config,
        engine.state_dict(accelerator, run.eval_model()),
        run.scaling,
        run.step,
        metrics,
        schedule=run.schedule.to_dict(),
        autoencoder=run.autoencoder,
        config=run.cfg.to_dict(),
        dest=run.best_path,
        raw_weights=engine.state_dict(accelerator, run.unet),
        sampling={"sampler": "ddim", "steps": s2.generation_steps, "eta": s2.eta},
        conditioning=run.conditioning,
    )
    blob.update(iteration=run.k, epoch=metrics.get("epoch"), stage="stage2")
    return blob
