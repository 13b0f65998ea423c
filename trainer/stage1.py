"""Stage 1: train the diffusion UNet on frozen-AE latents of the manifest (MSE on the model target).

Exports `checkpoint_{best,latest}.pt`: self-describing (UNet spec, EMA weights, schedule, latent
scaling, AE path, step, metrics) and loadable with `models` alone. Best is by validation MSE of the
EMA weights on held-out latents with fixed noise. The stage-2 `diffusion.stage1_checkpoint` points
at `checkpoint_best.pt`.
"""
from __future__ import annotations

import copy
import sys

import torch

from models.autoencoder import config_scaling, decode, load_autoencoder, AutoencoderLoadError
from models.unet import build_unet, count_parameters, spec_to_dict

from . import engine, io
from .checkpoints import CKPT_FORMAT  # noqa: F401  (re-exported)
from .ema import EMA
from .cli_common import stage_main
from .config import Config
from .data import read_manifest, split_indices
from .distributed import all_reduce_sum, shard_range
from .errors import ConfigError, UserError
from .latents import encode_rows, latent_shape_of, measure_scaling
from .loop import StepTrainer, batch_indices, cosine_with_warmup, local_weight, rank_slice
from .modelspec import unet_spec_from_config
from .runtime import derive_seed, fast_optimizer, generator, prepare_module
from .sampling import ddim_sample, image_grid, initial_noise


def model_target(noise_sched, latents, noise, t):
    if noise_sched.config.prediction_type == "v_prediction":
        return noise_sched.get_velocity(latents, noise, t)
    return noise


def load_frozen_ae(cfg: Config, device):
    if cfg.autoencoder.checkpoint is None:
        raise ConfigError(f"{cfg.source}: autoencoder.checkpoint: expected an AE folder or .pt, got null")
    try:
        return load_autoencoder(cfg.resolve_path(cfg.autoencoder.checkpoint)).to(device)
    except AutoencoderLoadError as e:
        raise UserError(f"autoencoder.checkpoint: {e}") from None


class DiffusionTrainer(StepTrainer):
    stage = "stage1"
    metric = "val_mse"

    def __init__(self, cfg: Config, accelerator):
        self.cfg = cfg
        t = cfg.training
        if cfg.dataset.manifest is None:
            raise ConfigError(f"{cfg.source}: dataset.manifest: expected a manifest CSV path, got null")
        self.ae = load_frozen_ae(cfg, accelerator.device)
        size = cfg.dataset.resolution or self.ae.config.sample_size
        self.latent_shape = latent_shape_of(self.ae, size)
        self.spec = unet_spec_from_config(cfg, self.latent_shape)
        from models.schedules import ddim_scheduler, training_scheduler

        s = cfg.scheduler
        self.noise_sched = training_scheduler(s.type, s.num_steps, s.prediction_type)
        self.ddim = ddim_scheduler(s.type, s.num_steps, s.prediction_type)
        fingerprint = {"unet": spec_to_dict(self.spec), "scheduler": dict(s.__dict__),
                       "seed": t.seed, "batch_size": t.batch_size, "learning_rate": t.learning_rate,
                       "max_steps": t.max_steps, "autoencoder": str(cfg.resolve_path(cfg.autoencoder.checkpoint)),
                       "manifest": str(cfg.resolve_path(cfg.dataset.manifest))}
        super().__init__(accelerator, cfg.out_dir / "stage1", max_steps=t.max_steps, eval_interval=t.eval_interval,
                         log_interval=t.log_interval, seed=t.seed, fingerprint=fingerprint,
                         max_nonfinite_steps=t.max_nonfinite_steps)
        rows = read_manifest(cfg.resolve_path(cfg.dataset.manifest), cfg.dataset.image_column,
                             cfg.dataset.filters, cfg.dataset.outputs.latent)
        if len(rows) < 2:
            raise UserError(f"{cfg.dataset.manifest}: {len(rows)} rows after filters; stage 1 needs at least 2")
        self.train_idx, self.val_idx = split_indices(len(rows), t.train_split, t.split_seed)
        raw = self._dataset_latents(rows, size)
        if cfg.autoencoder.scaling == "measure":
            self.scaling = measure_scaling(raw[self.train_idx])
        else:
            self.scaling = config_scaling(self.ae)
        self.latents = self.scaling.to_model(raw)
        self.log(f"{len(rows)} rows, latents {tuple(self.latent_shape)}, scaled std "
                 f"{float(self.latents[self.train_idx].std()):.3f}; UNet {count_parameters_of(self.spec)/1e6:.2f}M")

        torch.manual_seed(derive_seed(t.seed, "init", "unet"))  # the same initial weights on every run and rank
        self.unet = build_unet(self.spec)
        self.ema_unet = copy.deepcopy(self.unet).requires_grad_(False)
        self.ema = EMA(self.unet.parameters(), decay=t.ema_decay) if t.ema_decay > 0 else None
        opt_cls = torch.optim.AdamW if t.optimizer == "AdamW" else torch.optim.Adam
        self.unet = prepare_module(self.unet, cfg.performance, accelerator)
        opt = opt_cls(self.unet.parameters(), lr=t.learning_rate, weight_decay=t.weight_decay, betas=tuple(t.betas),
                      **fast_optimizer(cfg.performance, accelerator))
        # Stepped by hand once per optimizer step: the schedule is in global steps whatever the world size.
        self.sched = torch.optim.lr_scheduler.LambdaLR(
            opt, lambda st: cosine_with_warmup(st, t.scheduler.warmup_steps, t.max_steps, t.scheduler.type))
        self.ddp_unet, self.opt = engine.prepare(accelerator, self.unet, opt, t.batch_size, t.max_grad_norm)
        self.ema_unet.to(accelerator.device)

    def _dataset_latents(self, rows, size):
        """Encode every row once (sharded), cached under stage1/ for resumes."""
        cache = self.out_dir / "dataset_latents.pt"
        key = {"autoencoder": self.fingerprint["autoencoder"], "manifest": self.fingerprint["manifest"],
               "rows": len(rows), "size": size, "filters": self.cfg.dataset.filters}
        if cache.is_file():
            blob = torch.load(cache, map_location="cpu", weights_only=False)
            if blob.get("key") == key:
                return blob["latents"]
        z = encode_rows(self.acc, self.ae, rows, size=size, channels=self.ae.config.in_channels,
                        latent_shape=self.latent_shape, batch_size=self.cfg.autoencoder.encode_batch_size,
                        num_workers=self.cfg.training.num_workers)
        if self.acc.is_main_process:
            io.save_torch({"key": key, "latents": z}, cache)
        return z

    def noised(self, x0, step_or_tag, indices):
        """Noise and timesteps for global sample indices, from (seed, stage, step, index)."""
        noise = torch.stack([torch.randn(x0.shape[1:], generator=generator(self.seed, self.stage, step_or_tag, int(i)))
                             for i in indices]).to(x0.device)
        t = torch.tensor([int(torch.randint(0, self.noise_sched.config.num_train_timesteps, (1,),
                                            generator=generator(self.seed, self.stage, step_or_tag, "t", int(i))))
                          for i in indices], device=x0.device)
        return noise, t

    def train_step(self, step):
        t = self.cfg.training
        batch = batch_indices(self.train_idx, t.batch_size, step, self.seed, self.stage)
        pos = rank_slice(list(range(len(batch))), self.rank, self.world)
        mine = batch[pos]
        x0 = self.latents[mine].to(self.acc.device)
        noise, ts = self.noised(x0, step, pos)
        x_t = self.noise_sched.add_noise(x0, noise, ts)
        with self.acc.autocast():
            pred = self.ddp_unet(x_t, ts).sample
        mse = torch.mean((pred.float() - model_target(self.noise_sched, x0, noise, ts)) ** 2)
        self.apply_update(mse * local_weight(len(mine), len(batch), self.world), self.ddp_unet, self.unet, self.opt,
                          self.sched, t.max_grad_norm, self.ema)
        return {"mse": mse.item()}

    def _sync_ema(self):
        if self.ema is not None:
            self.ema.copy_to(self.ema_unet.parameters())
        else:
            self.ema_unet.load_state_dict(engine.state_dict(self.acc, self.unet))

    @torch.no_grad()
    def evaluate(self):
        self._sync_ema()
        mine = shard_range(len(self.val_idx), self.rank, self.world)
        total = torch.zeros(2, dtype=torch.float64, device=self.acc.device)
        for s in range(mine.start, mine.stop, 256):
            pos = list(range(s, min(s + 256, mine.stop)))
            x0 = self.latents[self.val_idx[pos]].to(self.acc.device)
            noise, ts = self.noised(x0, "val", pos)  # fixed noise: comparable across evaluations
            pred = self.ema_unet(self.noise_sched.add_noise(x0, noise, ts), ts).sample.float()
            err = ((pred - model_target(self.noise_sched, x0, noise, ts)) ** 2).mean(dim=(1, 2, 3))
            total += torch.stack([err.sum().double(), torch.tensor(float(len(pos)), dtype=torch.float64,
                                                                   device=err.device)])
        total = all_reduce_sum(total)
        return {"val_mse": float(total[0] / total[1].clamp(min=1)), "lr": self.sched.get_last_lr()[0]}

    def model_state(self):
        return {"unet": engine.state_dict(self.acc, self.unet), "optimizer": self.optimizer_state(self.opt),
                "lr_scheduler": self.sched.state_dict(), "ema": self.ema.state_dict() if self.ema else None}

    def load_model_state(self, state):
        engine.load_state_dict(self.acc, self.unet, state["unet"])
        self.load_optimizer_state(self.opt, state["optimizer"])
        self.sched.load_state_dict(state["lr_scheduler"])
        if self.ema is not None:
            self.ema.load_state_dict(state["ema"])

    def export(self, tag, metrics):
        blob = export_blob(self.cfg, self.spec, engine.state_dict(self.acc, self.ema_unet), self.scaling, self.step,
                           metrics, raw_weights=engine.state_dict(self.acc, self.unet))
        if self.acc.is_main_process:
            io.save_torch(blob, self.out_dir / f"checkpoint_{tag}.pt")

    def finish(self):
        """A decoded sample grid of the best checkpoint, from fixed seeds (main process)."""
        grid_path = self.out_dir / "samples.png"
        if self.acc.is_main_process and not grid_path.is_file():
            from .checkpoints import load_diffusion_checkpoint

            ck = load_diffusion_checkpoint(self.out_dir / "checkpoint_best.pt")
            unet = ck.unet.to(self.acc.device)
            noise = initial_noise(range(64), self.latent_shape, self.seed, "grid").to(self.acc.device)
            z = ddim_sample(unet, self.ddim, noise, self.cfg.training.sample_steps)
            images = decode(self.ae, self.scaling.from_model(z))
            io.save_png(image_grid(images, nrow=8), grid_path)
            self.log(f"sample grid written to {grid_path}")
        self.acc.wait_for_everyone()


def count_parameters_of(spec) -> int:
    return count_parameters(build_unet(spec))


def export_blob(cfg, spec, weights, scaling, step, metrics, raw_weights=None) -> dict:
    """A self-describing diffusion export; `weights` (EMA) and `raw_weights` are CPU state dicts."""
    s = cfg.scheduler
    return {
        "format": CKPT_FORMAT,
        "unet_spec": spec_to_dict(spec),
        "state_dict": weights,
        "raw_state_dict": raw_weights,
        "scheduler": {"type": s.type, "num_steps": s.num_steps, "prediction_type": s.prediction_type},
        "latent_scaling": scaling.to_dict(),
        "autoencoder": str(cfg.resolve_path(cfg.autoencoder.checkpoint)),
        "step": step,
        "metrics": {k: v for k, v in metrics.items() if isinstance(v, (int, float))},
        "config": cfg.to_dict(),
    }


def main(argv=None) -> int:
    return stage_main(DiffusionTrainer, "stage1", "Train the diffusion UNet on AE latents (stage 1).", argv)


if __name__ == "__main__":
    sys.exit(main())
