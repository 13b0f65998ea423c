"""Stage 0: train the small autoencoder (reconstruction MSE + KL) from the manifest's images.

Exports: `autoencoder_best.pt` / `autoencoder_latest.pt` (self-describing) during training, and at
the end a diffusers `save_pretrained` folder `autoencoder/` of the best weights, with the latent
scale and shift measured on the training images written into its config.
"""

from __future__ import annotations

import shutil

import numpy as np
import torch

from models.autoencoder import AE_FORMAT, ae_export, build_autoencoder, load_autoencoder
from trainer.config.sections import Config
from trainer.core.errors import ConfigError
from trainer.core.seeds import derive_seed
from trainer.data.latents import encode_rows, latent_shape_of, measure_scaling
from trainer.data.manifest import load_image, read_manifest, split_indices
from trainer.files import atomic
from trainer.files.layout import RunLayout
from trainer.parallel import engine
from trainer.parallel.collectives import Totals, barrier, shard_range
from trainer.training.loop import StepTrainer, batch_indices, local_weight, rank_slice
from trainer.training.optim import build_lr_schedule, optimizer_from


class AutoencoderTrainer(StepTrainer):
    def __init__(self, cfg: Config, accelerator):
        t = cfg.autoencoder.training
        m = cfg.autoencoder.model
        self.cfg = cfg
        if cfg.dataset.manifest is None:
            raise ConfigError(
                f"{cfg.source}: dataset.manifest: expected a manifest CSV or a folder of images, got null"
            )
        self.layout = RunLayout.of(cfg)
        folder = self.layout.stage0
        fingerprint = {
            "model": dict(m.__dict__),
            "training": dict(t.__dict__),
            "seed": cfg.training.seed,
            "manifest": str(cfg.resolve_path(cfg.dataset.manifest)),
        }
        super().__init__(
            accelerator,
            stage="stage0",
            metric="val_mse",
            state_path=folder.state,
            history_path=folder.history,
            max_steps=t.max_steps,
            eval_interval=t.eval_interval,
            log_interval=t.log_interval,
            seed=cfg.training.seed,
            fingerprint=fingerprint,
            max_nonfinite_steps=cfg.training.max_nonfinite_steps,
        )
        self.rows = read_manifest(
            cfg.resolve_path(cfg.dataset.manifest), cfg.dataset.image_column, cfg.dataset.filters
        )
        self.size = cfg.dataset.resolution or m.sample_size
        self.train_idx, self.val_idx = split_indices(
            len(self.rows), cfg.training.train_split, cfg.training.split_seed
        )
        torch.manual_seed(derive_seed(cfg.training.seed, "init", "autoencoder"))
        self.model = build_autoencoder(
            m.in_channels,
            m.latent_channels,
            m.block_out_channels,
            m.layers_per_block,
            m.norm_num_groups,
            self.size,
        )
        opt = optimizer_from(self.model.parameters(), t)  # AdamW; no device switches (as ever for stage 0)
        self.sched = build_lr_schedule(opt, t.warmup_steps, t.max_steps)
        self.ddp_model, self.opt = engine.prepare(accelerator, _WithKL(self.model), opt, t.batch_size, 0.0)

    def _images(self, rows: np.ndarray) -> torch.Tensor:
        paths = self.rows["image_path"].tolist()
        return torch.stack(
            [load_image(paths[i], self.size, self.cfg.autoencoder.model.in_channels) for i in rows]
        ).to(self.accelerator.device)

    def train_step(self, step):
        t = self.cfg.autoencoder.training
        batch = batch_indices(self.train_idx, t.batch_size, step, self.seed, self.stage)
        mine = rank_slice(batch, self.rank, self.world)
        x = self._images(mine)
        with self.accelerator.autocast():
            recon, kl = self.ddp_model(x, self.step_generator(step, self.rank))
        mse = torch.mean((recon.float() - x) ** 2)
        kl = kl.float().mean() / x[0].numel()
        loss = (mse + t.kl_weight * kl) * local_weight(len(mine), len(batch), self.world)
        self.apply_update(
            loss, self.ddp_model, self.model, self.opt, self.sched, 0.0
        )  # no clipping in stage 0
        return {"mse": mse.item(), "kl": kl.item()}

    @torch.no_grad()
    def evaluate(self):
        with engine.full_parameters(self.accelerator, self.model):
            return self._evaluate()

    def _evaluate(self):
        self.model.eval()
        mine = shard_range(len(self.val_idx), self.rank, self.world)
        sums = Totals(["squared_error", "n"], self.accelerator.device)
        ids = self.val_idx[mine.start : mine.stop]
        for s in range(0, len(ids), 128):
            x = self._images(ids[s : s + 128])
            recon = self.model.decode(self.model.encode(x).latent_dist.mean).sample
            sums.add("squared_error", ((recon.float() - x) ** 2).mean(dim=(1, 2, 3)).sum())
            sums.add("n", len(x))
        self.model.train()
        s = sums.reduced()
        return {"val_mse": s["squared_error"] / max(s["n"], 1)}

    def model_state(self):
        return {
            "model": engine.state_dict(self.accelerator, self.model),
            "optimizer": self.optimizer_state(self.opt),
            "lr_scheduler": self.sched.state_dict(),
        }

    def load_model_state(self, state):
        engine.load_state_dict(self.accelerator, self.model, state["model"])
        self.load_optimizer_state(self.opt, state["optimizer"])
        self.sched.load_state_dict(state["lr_scheduler"])

    def export(self, tag, metrics):
        blob = {
            "format": AE_FORMAT,
            "config": dict(self.model.config),
            "state_dict": engine.state_dict(self.accelerator, self.model),
            "step": self.step,
            "metrics": metrics,
        }
        if self.accelerator.is_main_process:
            atomic.save_torch(blob, self.layout.autoencoder_export(tag))

    def finish(self):
        """Measure the latent scale on the training images with the best weights; write the folder."""
        final = self.layout.autoencoder_folder
        if (final / "config.json").is_file():
            return
        barrier()
        ae = load_autoencoder(self.layout.autoencoder_export("best")).to(self.accelerator.device)
        rows = self.rows.iloc[self.train_idx]
        z = encode_rows(
            self.accelerator,
            ae,
            rows,
            size=self.size,
            channels=self.cfg.autoencoder.model.in_channels,
            latent_shape=latent_shape_of(ae, self.size),
            batch_size=self.cfg.autoencoder.encode_batch_size,
        )
        scaling = measure_scaling(z)
        if self.accelerator.is_main_process:
            ae.register_to_config(scaling_factor=scaling.scale, shift_factor=scaling.shift)
            tmp = final.with_name(".autoencoder.tmp")
            shutil.rmtree(tmp, ignore_errors=True)
            ae.to("cpu").save_pretrained(str(tmp))
            tmp.rename(final)  # the folder appears whole or not at all
            blob = ae_export(ae)
            blob.update(step=self.best["step"])
            atomic.save_torch(blob, self.layout.autoencoder_export("best"))
        self.log(
            f"autoencoder written to {final} (latent scale {scaling.scale:.4g}, shift {scaling.shift:.4g})"
        )
        barrier()


class _WithKL(torch.nn.Module):
    """Encode, sample, decode and KL in one forward, so DDP sees a single graph per step."""

    def __init__(self, ae):
        super().__init__()
        self.ae = ae

    def forward(self, x, generator):
        posterior = self.ae.encode(x).latent_dist
        recon = self.ae.decode(posterior.sample(generator=generator)).sample
        return recon, posterior.kl()
