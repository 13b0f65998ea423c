"""Per-iteration quality: does stage 2 bring samples closer to the data?

Row i of `{exp}_summary.csv` describes the model after i stage-2 iterations (row 0: the stage-1 model;
row i: iteration i-1's `stage2.continue_from` checkpoint, the one iteration i starts from). It is
measured on M samples generated from fixed seeds (the same noise every row) against held-out real
latents: the rows stage 1 validated on, never trained on. Columns:
  latent_fd, precision, recall   FD and k-NN precision/recall of (pooled) latents
  latent_fd_lo, latent_fd_hi     95% bootstrap interval of latent_fd over the generated set
                                 (stage2.metric_bootstrap resamples, fixed seed; the reals stay fixed)
  pixel_fd, pixel_precision, pixel_recall   the same on decoded images (fakes and reals both go
                                 through the frozen AE decoder, so AE error cancels out)
  cls_fd, cls_precision, cls_recall, cls_fd_lo, cls_fd_hi   with stage2.metric_features classifier:PATH:
                                 the same on the classifier's penultimate features of those decoded images
  inception_fd, inception_precision, inception_recall   with inception:PATH: on Inception-v3 pool
                                 features (a local TorchScript file; no bootstrap at 2048 dimensions)
  d_acc, d_prob_fake             the D this model was trained against (row 0: iteration 0's D, fit to
                                 stage-1 samples): accuracy on held-out reals vs these samples, and
                                 its mean probability that the samples are real
Columns of a feature space that is not configured are empty. The held-out reals' statistics of every
space (mean `mu`, covariance `sigma`, float64) are written once beside the summary as
reference_{latent,pixel,cls,inception}.npz, for comparing with other tools' FD.
"""

from __future__ import annotations

import io
import time

import numpy as np
import torch

from trainer.core import faults
from trainer.core.seeds import derive_seed
from trainer.data.manifest import split_indices
from trainer.diffusion.noise import per_sample_noise
from trainer.diffusion.sampling import ddim_sample
from trainer.files import atomic, plots
from trainer.files.layout import picture_of, reference_stats_of
from trainer.files.read import read_csv_rows
from trainer.parallel.accelerator import tracker_step
from trainer.parallel.collectives import Totals, gather_shards, shard_range
from trainer.quality.feature_spaces import load_space
from trainer.quality.metrics import Moments, bootstrap_fd, fd_from_moments, features, precision_recall

SUMMARY_FIELDS = [
    "iteration",
    "latent_fd",
    "latent_fd_lo",
    "latent_fd_hi",
    "precision",
    "recall",
    "pixel_fd",
    "pixel_precision",
    "pixel_recall",
    "cls_fd",
    "cls_fd_lo",
    "cls_fd_hi",
    "cls_precision",
    "cls_recall",
    "inception_fd",
    "inception_precision",
    "inception_recall",
    "d_acc",
    "d_prob_fake",
    "samples",
    "seconds",
]
BOOTSTRAPPED = ("latent", "cls")  # spaces with an FD interval (low-dimensional: cheap to resample)


class Evaluator:
    def __init__(
        self, acc, cfg, path, rows, encode, decode, schedule, latent_shape: tuple, log, read_only=False
    ):
        """path: the summary CSV; rows: the filtered manifest; encode(rows) -> model-space latents (a
        collective); decode(latents) -> images, or None to skip the pixel and feature-space metrics;
        schedule: the model's noise schedule (fresh DDIM samplers); read_only: measure only, never write
        beside the summary (a command that reads a run)."""
        self.cfg, self.acc, self.path, self.rows = cfg, acc, path, rows
        self.read_only = read_only
        self.encode, self.decode, self.schedule, self.latent_shape, self.log = (
            encode,
            decode,
            schedule,
            latent_shape,
            log,
        )
        _, held_out = split_indices(len(rows), self.cfg.training.train_split, self.cfg.training.split_seed)
        m = min(self.cfg.stage2.metric_samples, len(held_out))
        pick = (
            np.sort(
                np.random.default_rng(derive_seed(self.cfg.training.seed, "metric-reals")).choice(
                    held_out, size=m, replace=False
                )
            )
            if m < len(held_out)
            else held_out
        )
        self.m = len(pick)
        self.own = shard_range(self.m, self.acc.process_index, self.acc.num_processes)
        self.rows_pick = pick
        self._real = None
        self.guidance = None  # a diffusion.guidance.Guidance: samples are drawn with discriminator guidance
        self._space = False  # the stage2.metric_features extractor, loaded on first use
        self._real_features = None  # {space: this rank's feature rows of the held-out reals}
        self._real_moments = {}  # {space: their moments, reduced over ranks}

    def _reals(self):
        if self._real is None:
            rows = self.rows.iloc[self.rows_pick[self.own.start : self.own.stop]]
            self._real = self.encode(rows).to(self.acc.device)
        return self._real

    def space(self):
        """The stage2.metric_features extractor (None for raw)."""
        if self._space is False:
            self._space = load_space(self.cfg, self.acc.device)
        return self._space

    def _spaces_of(self, latents: torch.Tensor) -> dict[str, torch.Tensor]:
        """Feature rows of these latents in every space: latent, and (with a decoder) pixel and the
        configured one, all from one decode."""
        out = {"latent": features(latents)}
        if self.decode is not None:
            images = self.decode(latents).float()
            out["pixel"] = features(images)
            if self.space() is not None:
                out[self.space().name] = self.space()(images)
        return out

    def real_features(self) -> dict[str, torch.Tensor]:
        """This rank's feature rows of the held-out reals, per space (computed once per Evaluator)."""
        if self._real_features is None:
            self._real_features = self._spaces_of(self._reals())
        return self._real_features

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
        reals, fakes = self.real_features(), self._spaces_of(fake)
        for space in reals:
            row.update(self._scores(space, reals[space], fakes[space]))
        self.write_references()
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
        noise = per_sample_noise(list(self.own), self.latent_shape, cfg.training.seed, "metric").to(
            acc.device
        )
        with acc.autocast():
            return ddim_sample(
                unet,
                self.schedule.ddim(),
                noise,
                cfg.stage2.generation_steps,
                batch_size=cfg.stage2.generation_batch_size,
                guidance=self.guidance,
            ).float()

    @torch.no_grad()
    def latent_fd(self, unet) -> float:
        """Latent FD of `unet`'s M fixed-seed samples against the held-out reals: the summary's latent_fd,
        without the rest of the row (a collective)."""
        return _fd(features(self._reals()), features(self._fakes(unet)))

    def reference(self, space: str) -> Moments:
        """The held-out reals' moments in `space`, reduced over ranks (a collective on first use)."""
        if space not in self._real_moments:
            rows = self.real_features()[space]
            self._real_moments[space] = Moments(rows.shape[1], rows.device).add(rows).reduced()
        return self._real_moments[space]

    def _scores(self, space: str, fr: torch.Tensor, ff: torch.Tensor) -> dict:
        """FD (+ bootstrap interval), precision and recall of this rank's real and fake feature rows."""
        real = self.reference(space)
        fd = fd_from_moments(real, Moments(ff.shape[1], ff.device).add(ff).reduced())
        p, r = precision_recall(fr, ff, self.m, self.m, k=self.cfg.stage2.metric_k)
        names = {"latent": ("latent_fd", "precision", "recall")}.get(
            space, (f"{space}_fd", f"{space}_precision", f"{space}_recall")
        )
        out = dict(zip(names, (fd, p, r), strict=True))
        if space in BOOTSTRAPPED and self.cfg.stage2.metric_bootstrap:
            fake_all = gather_shards(ff, self.m, to_all=False)  # the main process resamples
            if fake_all is not None:
                seed = derive_seed(self.cfg.training.seed, "metric-bootstrap")
                out[f"{space}_fd_lo"], out[f"{space}_fd_hi"] = bootstrap_fd(
                    real, fake_all, self.cfg.stage2.metric_bootstrap, seed, point=fd
                )
        return out

    def write_references(self) -> None:
        """reference_{space}.npz beside the summary (main process): mu and sigma (float64) of the held-out
        reals' features; rewritten only when they changed (so once per run). Never when read-only."""
        if not self.acc.is_main_process or self.read_only:
            return
        for space, moments in self._real_moments.items():
            mu, sigma = (t.cpu().numpy() for t in moments.mean_cov())
            path = reference_stats_of(self.path, space)
            try:
                with np.load(path) as old:
                    if np.array_equal(old["mu"], mu) and np.array_equal(old["sigma"], sigma):
                        continue
            except Exception:  # missing, torn or foreign: written below
                pass
            buf = io.BytesIO()
            np.savez(buf, mu=mu, sigma=sigma, n=np.int64(moments.n.item()))
            data = buf.getvalue()
            atomic.atomic_write(path, lambda f, data=data: f.write(data))

    def record(self, row: dict) -> None:
        if self.read_only:
            raise RuntimeError(f"{self.path}: a read-only evaluator records no summary row")
        rows = [r for r in read_csv_rows(self.path) if int(r["iteration"]) != row["iteration"]] + [row]
        rows.sort(key=lambda r: r["iteration"])
        faults.scope(f"summary{int(row['iteration'])}", self.path.with_suffix(".png"))
        if self.acc.is_main_process:
            atomic.write_csv(rows, self.path, SUMMARY_FIELDS)
            plots.plot_summary(self.path, picture_of(self.path))
        self.acc.log(
            {f"summary/{k}": v for k, v in row.items() if k != "iteration" and isinstance(v, (int, float))},
            step=tracker_step(self.cfg, "summary", int(row["iteration"])),
        )
        self.log(
            "summary row "
            + " ".join(f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}" for k, v in row.items())
        )


def _fd(fr: torch.Tensor, ff: torch.Tensor) -> float:
    """Fréchet distance of two sets of per-rank feature rows (moments reduced over ranks: a collective)."""
    dim = fr.shape[1]
    return fd_from_moments(
        Moments(dim, fr.device).add(fr).reduced(), Moments(dim, ff.device).add(ff).reduced()
    )
