"""Per-iteration quality: does stage 2 bring samples closer to the data?

Row i of `{exp}_summary.csv` describes the model after i stage-2 iterations (row 0: the stage-1 model;
row i: iteration i-1's `stage2.continue_from` checkpoint, the one iteration i starts from). It is
measured on M samples generated from fixed seeds (the same noise every row) against held-out real
latents: the rows stage 1 validated on, never trained on. Columns:
  latent_fd, precision, recall   FD and k-NN precision/recall of (pooled) latents
  pixel_fd, pixel_precision, pixel_recall   the same on decoded images (fakes and reals both go
                                 through the frozen AE decoder, so AE error cancels out)
  d_acc, d_prob_fake             the D this model was trained against (row 0: iteration 0's D, fit to
                                 stage-1 samples): accuracy on held-out reals vs these samples, and
                                 its mean probability that the samples are real
"""
from __future__ import annotations

import time

import numpy as np
import torch

from trainer.core import faults
from trainer.core.seeds import derive_seed
from trainer.data.manifest import split_indices
from trainer.diffusion.noise import per_sample_noise
from trainer.diffusion.sampling import ddim_sample
from trainer.dist.collectives import Totals, shard_range
from trainer.files import atomic, plots
from trainer.files.layout import picture_of
from trainer.files.read import read_csv_rows
from trainer.stage2.metrics import Moments, fd_from_moments, features, precision_recall

SUMMARY_FIELDS = ["iteration", "latent_fd", "precision", "recall", "pixel_fd", "pixel_precision", "pixel_recall",
                  "d_acc", "d_prob_fake", "samples", "seconds"]


class Evaluator:
    def __init__(self, acc, cfg, path, rows, encode, decode, schedule, latent_shape: tuple, log):
        """path: the summary CSV; rows: the filtered manifest; encode(rows) -> model-space latents (a
        collective); decode(latents) -> images, or None to skip the pixel metrics; schedule: the
        model's noise schedule (fresh DDIM samplers)."""
        self.cfg, self.acc, self.path, self.rows = cfg, acc, path, rows
        self.encode, self.decode, self.schedule, self.latent_shape, self.log = encode, decode, schedule, latent_shape, log
        _, held_out = split_indices(len(rows), self.cfg.training.train_split, self.cfg.training.split_seed)
        m = min(self.cfg.stage2.metric_samples, len(held_out))
        pick = np.sort(np.random.default_rng(derive_seed(self.cfg.training.seed, "metric-reals")).choice(
            held_out, size=m, replace=False)) if m < len(held_out) else held_out
        self.m = len(pick)
        self.own = shard_range(self.m, self.acc.process_index, self.acc.num_processes)
        self.rows_pick = pick
        self._real = None

    def _reals(self):
        if self._real is None:
            rows = self.rows.iloc[self.rows_pick[self.own.start:self.own.stop]]
            self._real = self.encode(rows).to(self.acc.device)
        return self._real

    def done(self) -> set[int]:
        return {int(r["iteration"]) for r in read_csv_rows(self.path)}

    @torch.no_grad()
    def measure(self, iteration: int, unet, d) -> dict:
        """Collective: every rank generates and scores its own block of the M samples."""
        t0 = time.time()
        faults.phase(f"summary{iteration}")
        acc = self.acc
        unet = unet.to(acc.device).eval()
        fake = self._fakes(unet)
        real = self._reals()
        row = {"iteration": iteration, "samples": self.m}
        row.update(self._scores(real, fake, ""))
        if self.decode is not None:  # fakes and reals both through the decoder: AE error cancels out
            row.update(self._scores(self.decode(real).float(), self.decode(fake).float(), "pixel_"))
        if d is not None:
            d = d.to(acc.device).eval()
            lr, lf = d(real).float(), d(fake).float()  # t = 0 where D is noise-conditioned
            sums = Totals(["real_correct", "fake_correct", "prob_fake"], acc.device)
            sums.add("real_correct", (lr > 0).sum().double())
            sums.add("fake_correct", (lf < 0).sum().double())
            sums.add("prob_fake", torch.sigmoid(lf).sum().double())
            s = sums.reduced()
            row["d_acc"] = (s["real_correct"] + s["fake_correct"]) / (2 * self.m)
            row["d_prob_fake"] = s["prob_fake"] / self.m
        row["seconds"] = round(time.time() - t0, 2)
        return row

    def _fakes(self, unet) -> torch.Tensor:
        """This rank's block of the M samples, from the same fixed seeds at every call."""
        cfg, acc = self.cfg, self.acc
        noise = per_sample_noise(list(self.own), self.latent_shape, cfg.training.seed, "metric").to(acc.device)
        with acc.autocast():
            return ddim_sample(unet, self.schedule.ddim(), noise, cfg.stage2.generation_steps,
                               batch_size=cfg.stage2.generation_batch_size).float()

    @torch.no_grad()
    def latent_fd(self, unet) -> float:
        """Latent FD of `unet`'s M fixed-seed samples against the held-out reals: the summary's latent_fd,
        without the rest of the row (a collective)."""
        return _fd(features(self._reals()), features(self._fakes(unet)))

    def _scores(self, real, fake, prefix):
        fr, ff = features(real), features(fake)
        fd = _fd(fr, ff)
        p, r = precision_recall(fr, ff, self.m, self.m, k=self.cfg.stage2.metric_k)
        return {f"{prefix}fd" if prefix else "latent_fd": fd, f"{prefix}precision": p, f"{prefix}recall": r}

    def record(self, row: dict) -> None:
        rows = [r for r in read_csv_rows(self.path) if int(r["iteration"]) != row["iteration"]] + [row]
        rows.sort(key=lambda r: r["iteration"])
        faults.scope(f"summary{int(row['iteration'])}", self.path.with_suffix(".png"))
        if self.acc.is_main_process:
            atomic.write_csv(rows, self.path, SUMMARY_FIELDS)
            plots.plot_summary(self.path, picture_of(self.path))
        self.acc.log({f"summary/{k}": v for k, v in row.items() if k != "iteration"}, step=int(row["iteration"]))
        self.log("summary row " + " ".join(f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}"
                                               for k, v in row.items()))


def _fd(fr: torch.Tensor, ff: torch.Tensor) -> float:
    """Fréchet distance of two sets of per-rank feature rows (moments reduced over ranks: a collective)."""
    dim = fr.shape[1]
    return fd_from_moments(Moments(dim, fr.device).add(fr).reduced(), Moments(dim, ff.device).add(ff).reduced())
