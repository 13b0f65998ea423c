"""Stage 1: train the diffusion UNet on frozen-AE latents of the manifest (MSE on the model target).

Exports `checkpoint_{best,latest}.pt`: self-describing (UNet config, EMA weights, schedule, latent
scaling, AE path, step, metrics) and loadable with `models` alone. Best is by validation MSE of the
EMA weights on held-out latents with fixed noise. The stage-2 `diffusion.stage1_checkpoint` points
at `checkpoint_best.pt`.
"""

from __future__ import annotations

import copy

import numpy as np
import torch

from models.autoencoder import config_scaling, decode
from models.unet import count_parameters, spec_to_dict, unet_config, unet_from_config
from trainer.config.sections import Config
from trainer.core.errors import ConfigError, UserError
from trainer.core.seeds import derive_seed
from trainer.data.labels import dropped_labels
from trainer.data.latents import encode_rows, latent_shape_of, load_frozen_ae, measure_scaling
from trainer.data.manifest import read_manifest, split_indices
from trainer.diffusion.checkpoints import export_blob, load_diffusion_checkpoint
from trainer.diffusion.conditioning import model_output
from trainer.diffusion.modelspec import unet_spec_from_config
from trainer.diffusion.noise import per_sample_noise, per_sample_timesteps
from trainer.diffusion.sampling import ddim_sample, image_grid
from trainer.diffusion.schedule import NEW_MODEL_SPACING, Schedule
from trainer.files import atomic
from trainer.files.layout import RunLayout
from trainer.files.read import torch_load
from trainer.parallel import engine
from trainer.parallel.accelerator import prepare_module
from trainer.parallel.collectives import Totals, shard_range
from trainer.stage1.labels import check_labels_config, training_labels
from trainer.training.ema import EMA, sync_eval_copy
from trainer.training.loop import StepTrainer, batch_indices, local_weight, rank_slice
from trainer.training.optim import build_lr_schedule, optimizer_from


class DiffusionTrainer(StepTrainer):
    def __init__(self, cfg: Config, accelerator):
        self.cfg = cfg
        t = cfg.training
        self._check_inputs(accelerator)
        self.ae = load_frozen_ae(cfg.resolve_path(cfg.autoencoder.checkpoint), accelerator.device)
        size = cfg.dataset.resolution or self.ae.config.sample_size
        self.latent_shape = latent_shape_of(self.ae, size)
        self.spec = unet_spec_from_config(cfg, self.latent_shape)
        self.unet_config = unet_config(self.spec)  # the full diffusers config the exports store
        s = cfg.scheduler
        # a new model: its DDIM samplers (the grid, every later stage) start at t = T-1 unless told otherwise
        spacing = s.timestep_spacing or NEW_MODEL_SPACING
        self.schedule = Schedule(s.type, s.num_steps, s.prediction_type, timestep_spacing=spacing)
        self.layout = RunLayout.of(cfg)
        super().__init__(
            accelerator,
            stage="stage1",
            metric="val_mse",
            state_path=self.layout.stage1.state,
            history_path=self.layout.stage1.history,
            max_steps=t.max_steps,
            eval_interval=t.eval_interval,
            log_interval=t.log_interval,
            seed=t.seed,
            fingerprint=self._fingerprint(),
            max_nonfinite_steps=t.max_nonfinite_steps,
        )
        self._read_latents(size)
        self._build_unet(accelerator)

    def _check_inputs(self, accelerator) -> None:
        """The config checks before anything is loaded (the manifest, the AE, labels, accumulation)."""
        cfg, t = self.cfg, self.cfg.training
        if cfg.dataset.manifest is None:
            raise ConfigError(
                f"{cfg.source}: dataset.manifest: expected a manifest CSV or a folder of images, got null"
            )
        if cfg.autoencoder.checkpoint is None:
            raise ConfigError(f"{cfg.source}: autoencoder.checkpoint: expected an AE folder or .pt, got null")
        check_labels_config(cfg)
        engine.check_accumulation(
            accelerator, t.gradient_accumulation_steps, t.batch_size
        )  # before any compute

    def _fingerprint(self) -> dict:
        """The model-defining fields a resume state must share with the config."""
        cfg, t, s = self.cfg, self.cfg.training, self.cfg.scheduler
        fingerprint = {
            "unet": spec_to_dict(self.spec),
            # the sampler's spacing is not in it: training never samples, so a resume may change it
            "scheduler": {k: v for k, v in s.__dict__.items() if k != "timestep_spacing"},
            "seed": t.seed,
            "batch_size": t.batch_size,
            "learning_rate": t.learning_rate,
            "max_steps": t.max_steps,
            "autoencoder": str(cfg.resolve_path(cfg.autoencoder.checkpoint)),
            "manifest": str(cfg.resolve_path(cfg.dataset.manifest)),
        }
        if cfg.dataset.label_column:  # a class-conditional model
            fingerprint.update(label_column=cfg.dataset.label_column, label_dropout=t.label_dropout)
        return fingerprint

    def _read_latents(self, size: int) -> None:
        """The manifest's rows, their labels, the train/val split and the scaled latents of every row."""
        cfg, t = self.cfg, self.cfg.training
        rows = read_manifest(
            cfg.resolve_path(cfg.dataset.manifest),
            cfg.dataset.image_column,
            cfg.dataset.filters,
            cfg.dataset.outputs.latent,
            label_column=cfg.dataset.label_column,
        )
        if len(rows) < 2:
            raise UserError(
                f"{cfg.dataset.manifest}: {len(rows)} rows after filters; stage 1 needs at least 2"
            )
        self.conditioning, self.labels = training_labels(cfg, rows)
        self.train_idx, self.val_idx = split_indices(len(rows), t.train_split, t.split_seed)
        raw = self._dataset_latents(rows, size)
        if cfg.autoencoder.scaling == "measure":
            self.scaling = measure_scaling(raw[self.train_idx])
        else:
            self.scaling = config_scaling(self.ae)
        self.latents = self.scaling.to_model(raw)
        self.log(
            f"{len(rows)} rows, latents {tuple(self.latent_shape)}, scaled std "
            f"{float(self.latents[self.train_idx].std()):.3f}; "
            f"UNet {count_parameters(unet_from_config(self.unet_config)) / 1e6:.2f}M"
        )

    def _build_unet(self, accelerator) -> None:
        """The UNet (the same initial weights on every run and rank), its EMA copy, optimizer and LR
        schedule, prepared for the accelerator."""
        cfg, t = self.cfg, self.cfg.training
        torch.manual_seed(
            derive_seed(t.seed, "init", "unet")
        )  # the same initial weights on every run and rank
        self.unet = unet_from_config(self.unet_config)
        if t.gradient_checkpointing:  # recompute activations in backward: less memory, the same gradients
            self.unet.enable_gradient_checkpointing()
        self.ema_unet = copy.deepcopy(self.unet).requires_grad_(False)
        self.ema = EMA(self.unet.parameters(), decay=t.ema_decay) if t.ema_decay > 0 else None
        self.unet = prepare_module(self.unet, cfg.performance, accelerator)
        opt = optimizer_from(self.unet.parameters(), t, cfg.performance, accelerator)
        self.sched = build_lr_schedule(opt, t.scheduler.warmup_steps, t.max_steps, t.scheduler.type)
        self.ddp_unet, self.opt = engine.prepare(accelerator, self.unet, opt, t.batch_size, t.max_grad_norm)
        self.ema_unet.to(accelerator.device)

    def _dataset_latents(self, rows, size):
        """Encode every row once (sharded), cached under stage1/ for resumes. The cache is read weights only;
        one
        that is unreadable or refused (it could run code) is encoded again and replaced."""
        cache = self.layout.stage1_latent_cache
        key = atomic.plain(
            {
                "autoencoder": self.fingerprint["autoencoder"],
                "manifest": self.fingerprint["manifest"],
                "rows": len(rows),
                "size": size,
                "filters": self.cfg.dataset.filters,
            }
        )
        if cache.is_file():
            try:
                blob = torch_load(cache, "latent cache", mmap=False)
            except UserError as e:
                self.log(f"{e}; encoding the rows again")
                blob = None
            if isinstance(blob, dict) and blob.get("key") == key and torch.is_tensor(blob.get("latents")):
                return blob["latents"]
        z = encode_rows(
            self.accelerator,
            self.ae,
            rows,
            size=size,
            channels=self.ae.config.in_channels,
            latent_shape=self.latent_shape,
            batch_size=self.cfg.autoencoder.encode_batch_size,
            num_workers=self.cfg.training.num_workers,
        )
        if self.accelerator.is_main_process:
            atomic.save_torch(atomic.plain({"key": key, "latents": z}), cache)
        return z

    def noised(self, x0, step_or_tag, indices):
        """Noise and timesteps for global sample indices, from (seed, stage, step, index)."""
        noise = per_sample_noise(indices, x0.shape[1:], self.seed, self.stage, step_or_tag).to(x0.device)
        t = per_sample_timesteps(indices, self.schedule.num_steps, self.seed, self.stage, step_or_tag, "t")
        return noise, t.to(x0.device)

    def train_step(self, step):
        t = self.cfg.training
        batch = batch_indices(self.train_idx, t.batch_size, step, self.seed, self.stage)
        pos = rank_slice(list(range(len(batch))), self.rank, self.world)
        logged = []

        def micro(
            chunk,
        ):  # the loss of a micro-batch of this rank's positions (all of them without accumulation)
            x0 = self.latents[batch[chunk]].to(self.accelerator.device)
            noise, ts = self.noised(x0, step, chunk)
            x_t = self.schedule.add_noise(x0, noise, ts)
            y = self.batch_labels(batch[chunk], chunk, step)
            with self.accelerator.autocast():
                pred = model_output(self.ddp_unet, x_t, ts, y)
            mse = torch.mean((pred.float() - self.schedule.target(x0, noise, ts)) ** 2)
            logged.append(mse.item() * len(chunk) / len(pos))
            return mse * local_weight(len(chunk), len(batch), self.world)

        chunks = np.array_split(np.asarray(pos, dtype=np.int64), t.gradient_accumulation_steps)
        self.apply_update(
            [lambda c=c: micro(c) for c in chunks],
            self.ddp_unet,
            self.unet,
            self.opt,
            self.sched,
            t.max_grad_norm,
            self.ema,
        )
        return {"mse": sum(logged)}

    def batch_labels(self, rows, positions, step):
        """The class labels of these training rows (None for an unconditional model), each replaced by the
        null label with probability training.label_dropout (coin i from (seed, stage, step, position i))."""
        if self.labels is None:
            return None
        y = self.labels[rows].to(self.accelerator.device)
        c = self.conditioning
        return dropped_labels(y, positions, c.label_dropout, c.null_class, self.seed, self.stage, step)

    @torch.no_grad()
    def evaluate(self):
        sync_eval_copy(self.ema, self.ema_unet, self.accelerator, self.unet)
        mine = shard_range(len(self.val_idx), self.rank, self.world)
        sums = Totals(["squared_error", "n"], self.accelerator.device)
        for s in range(mine.start, mine.stop, 256):
            pos = list(range(s, min(s + 256, mine.stop)))
            x0 = self.latents[self.val_idx[pos]].to(self.accelerator.device)
            noise, ts = self.noised(x0, "val", pos)  # fixed noise: comparable across evaluations
            y = None if self.labels is None else self.labels[self.val_idx[pos]].to(self.accelerator.device)
            pred = model_output(self.ema_unet, self.schedule.add_noise(x0, noise, ts), ts, y).float()
            err = ((pred - self.schedule.target(x0, noise, ts)) ** 2).mean(dim=(1, 2, 3))
            sums.add("squared_error", err.sum().double())
            sums.add("n", len(pos))
        s = sums.reduced()
        return {"val_mse": s["squared_error"] / max(s["n"], 1), "lr": self.sched.get_last_lr()[0]}

    def model_state(self):
        return {
            "unet": engine.state_dict(self.accelerator, self.unet),
            "optimizer": self.optimizer_state(self.opt),
            "lr_scheduler": self.sched.state_dict(),
            "ema": self.ema.state_dict() if self.ema else None,
        }

    def load_model_state(self, state):
        engine.load_state_dict(self.accelerator, self.unet, state["unet"])
        self.load_optimizer_state(self.opt, state["optimizer"])
        self.sched.load_state_dict(state["lr_scheduler"])
        if self.ema is not None:
            self.ema.load_state_dict(state["ema"])

    def export(self, tag, metrics):
        dest = self.layout.stage1_checkpoint(tag)
        blob = export_blob(
            self.unet_config,
            engine.state_dict(self.accelerator, self.ema_unet),
            self.scaling,
            self.step,
            metrics,
            schedule=self.schedule.to_dict(),
            autoencoder=self.fingerprint["autoencoder"],
            config=self.cfg.to_dict(),
            dest=dest,
            raw_weights=engine.state_dict(self.accelerator, self.unet),
            sampling={"sampler": "ddim", "steps": self.cfg.training.sample_steps, "eta": 0.0},
            conditioning=self.conditioning,
        )
        if self.accelerator.is_main_process:
            atomic.save_torch(blob, dest)

    def finish(self):
        """A decoded sample grid of the best checkpoint, from fixed seeds (main process)."""
        grid_path = self.layout.stage1_grid
        if self.accelerator.is_main_process and not grid_path.is_file():
            ck = load_diffusion_checkpoint(self.layout.stage1_checkpoint("best"))
            unet = ck.unet.to(self.accelerator.device)
            # a conditional model's grid: a column per class (at guidance scale 1)
            c = self.conditioning
            nrow = 8 if c is None else c.num_classes
            n = 64 if c is None else c.num_classes * max(1, 64 // c.num_classes)
            noise = per_sample_noise(range(n), self.latent_shape, self.seed, "grid").to(
                self.accelerator.device
            )
            y = None if c is None else torch.arange(n) % c.num_classes
            z = ddim_sample(unet, self.schedule.ddim(), noise, self.cfg.training.sample_steps, class_labels=y)
            images = decode(self.ae, self.scaling.from_model(z))
            atomic.save_png(image_grid(images, nrow=nrow), grid_path)
            self.log(f"sample grid written to {grid_path}")
        if self.accelerator.is_main_process:
            from trainer.diffusion.export import export_pipeline, is_current

            ck = load_diffusion_checkpoint(self.layout.stage1_checkpoint("best"))
            if not is_current(self.layout.stage1_pipeline, ck):
                export_pipeline(ck, self.layout.stage1_pipeline, autoencoder=self.fingerprint["autoencoder"])
                self.log(f"pipeline folder written to {self.layout.stage1_pipeline}")
        self.accelerator.wait_for_everyone()
