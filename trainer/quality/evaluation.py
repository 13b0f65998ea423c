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
  guidance_scale                 a class-conditional model: the classifier-free guidance scale its samples
                                 used (stage2.guidance_scale; null: 1). Sample i is generated for the class
                                 of held-out real i, so the samples have the reals' class counts exactly
  class_fd, label_fidelity       a class-conditional model with classifier:PATH: the mean over classes of
                                 the classifier-feature FD of a class's samples to its held-out reals
                                 (classes with fewer than 2 held-out reals are skipped, and logged once;
                                 trainer.quality.conditional), and the classifier's accuracy on the samples
                                 against the classes they were generated for: only where the model's
                                 classes are "0".."C-1" (the classifier's integer labels; otherwise empty,
                                 and logged once)
Columns of a feature space that is not configured, and the class columns of an unconditional model, are
empty. The held-out reals' statistics of every
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
from trainer.quality.conditional import MIN_PER_CLASS, class_fd, integer_class_names, label_fidelity
from trainer.quality.feature_spaces import ClassifierFeatures, load_space
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
    "class_fd",
    "label_fidelity",
    "inception_fd",
    "inception_precision",
    "inception_recall",
    "d_acc",
    "d_prob_fake",
    "guidance_scale",
    "samples",
    "seconds",
]
BOOTSTRAPPED = ("latent", "cls")  # spaces with an FD interval (low-dimensional: cheap to resample)


class Evaluator:
    def __init__(
        self,
        accelerator,
        cfg,
        path,
        rows,
        encode,
        decode,
        schedule,
        latent_shape: tuple,
        log,
        read_only=False,
        conditioning=None,
    ):
        """path: the summary CSV; rows: the filtered manifest; encode(rows) -> model-space latents (a
        collective); decode(latents) -> images, or None to skip the pixel and feature-space metrics;
        schedule: the model's noise schedule (fresh DDIM samplers); read_only: measure only, never write
        beside the summary (a command that reads a run); conditioning: a class-conditional model's
        (trainer.diffusion.conditioning.Conditioning), whose rows carry each row's class index in an int
        column `label_index`."""
        self.cfg, self.accelerator, self.path, self.rows = cfg, accelerator, path, rows
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
        self.own = shard_range(self.m, self.accelerator.process_index, self.accelerator.num_processes)
        self.rows_pick = pick
        self.conditioning = conditioning
        self.labels = None  # the class of held-out real i, which sample i is generated for (all M)
        self.guidance_scale = 1.0
        self._told = set()  # the one-time log lines already written
        if conditioning is not None:
            if "label_index" not in rows.columns:
                raise ValueError("a conditional Evaluator needs rows with a label_index column")
            self.labels = np.asarray(rows["label_index"], dtype=np.int64)[pick]
            scale = cfg.stage2.guidance_scale
            self.guidance_scale = 1.0 if scale is None else float(scale)  # 0 is a scale, not "unset"
        self._real = None
        self.guidance = None  # a diffusion.guidance.Guidance: samples are drawn with discriminator guidance
        self._space = False  # the stage2.metric_features extractor, loaded on first use
        self._real_features = None  # {space: this rank's feature rows of the held-out reals}
        self._real_moments = {}  # {space: their moments, reduced over ranks}

    @property
    def acc(self):
        """The old name of `accelerator`, read-only (callers still use it)."""
        return self.accelerator

    def _reals(self):
        if self._real is None:
            rows = self.rows.iloc[self.rows_pick[self.own.start : self.own.stop]]
            self._real = self.encode(rows).to(self.accelerator.device)
        return self._real

    def space(self):
        """The stage2.metric_features extractor (None for raw)."""
        if self._space is False:
            self._space = load_space(self.cfg, self.accelerator.device)
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
        accelerator = self.accelerator
        unet = unet.to(accelerator.device).eval()
        fake = self._fakes(unet)
        real = self._reals()
        row = {"iteration": iteration, "samples": self.m}
        reals, fakes = self.real_features(), self._spaces_of(fake)
        for space in reals:
            row.update(self._scores(space, reals[space], fakes[space]))
        if self.conditioning is not None:
            row.update(self._class_scores(reals, fakes))
        self.write_references()
        if d is not None:
            d = d.to(accelerator.device).eval()
            y = self._own_labels()  # a class-conditional run's: D scores (sample, label) pairs
            # t = 0 if noise-conditioned; a D that noises its inputs itself (takes_index) draws the noise
            # of each sample from its global index, the same at any world size
            index = {"index": list(self.own)} if getattr(d, "takes_index", False) else {}
            lr, lf = (d(z, **index) if y is None else d(z, None, y, **index) for z in (real, fake))
            lr, lf = lr.float(), lf.float()
            sums = Totals(["real_correct", "fake_correct", "prob_fake"], accelerator.device)
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
        cfg, accelerator = self.cfg, self.accelerator
        noise = per_sample_noise(list(self.own), self.latent_shape, cfg.training.seed, "metric").to(
            accelerator.device
        )
        with accelerator.autocast():
            return ddim_sample(
                unet,
                self.schedule.ddim(),
                noise,
                cfg.stage2.generation_steps,
                batch_size=cfg.stage2.generation_batch_size,
                guidance=self.guidance,
                class_labels=self._own_labels(),
                guidance_scale=self.guidance_scale,
                null_class=None if self.conditioning is None else self.conditioning.null_class,
            ).float()

    def _own_labels(self) -> torch.Tensor | None:
        """The classes of this rank's block of the M samples (None: an unconditional model)."""
        if self.labels is None:
            return None
        return torch.from_numpy(self.labels[self.own.start : self.own.stop]).to(self.accelerator.device)

    def _class_scores(self, reals: dict, fakes: dict) -> dict:
        """guidance_scale, and with the classifier feature space class_fd and label_fidelity (module doc):
        this rank's rows, reduced over ranks (a collective)."""
        out = {"guidance_scale": self.guidance_scale}
        space = self.space() if "cls" in fakes else None
        if not isinstance(space, ClassifierFeatures):
            return out
        cond, labels = self.conditioning, self._own_labels()
        out["class_fd"], fds = class_fd(reals["cls"], labels, fakes["cls"], labels, cond.num_classes)
        if len(fds) < cond.num_classes:
            self._tell(
                f"class_fd: {cond.num_classes - len(fds)} of {cond.num_classes} classes have fewer than "
                f"{MIN_PER_CLASS} held-out reals among the {self.m} and are left out of the mean"
            )
        if integer_class_names(cond.class_names, space.num_classes):
            out["label_fidelity"] = label_fidelity(space.classify(fakes["cls"]), labels)
        else:
            self._tell(
                f"label_fidelity: left empty: the model's {cond.num_classes} class names are not 0.."
                f"{cond.num_classes - 1} within the classifier's integer labels 0..{space.num_classes - 1}"
            )
        return out

    def _tell(self, line: str) -> None:
        if line not in self._told:
            self._told.add(line)
            self.log(line)

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
        if not self.accelerator.is_main_process or self.read_only:
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
        if self.accelerator.is_main_process:
            atomic.write_csv(rows, self.path, SUMMARY_FIELDS)
            plots.plot_summary(self.path, picture_of(self.path))
        self.accelerator.log(
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
