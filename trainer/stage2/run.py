"""Stage 2: adversarial fine-tuning of a stage-1 diffusion model against a latent discriminator.

    advdiff stage2 CONFIG [--num_samples N] [--num_iterations I] ... [--start_iteration k]
    accelerate launch -m trainer.stage2 CONFIG [flags]          # 1..N processes

Each iteration k: (a) fakes generated and (b) reals encoded, sharded by index; (c) the main process
writes both sets; (d) a new D is trained; (e) the UNet is fine-tuned with the composite loss; then the
iteration's grid and quality row. A rerun continues where the last run stopped; `--start_iteration k`
requires iteration k-1's checkpoint. This module only orchestrates: each phase lives in its own module
and receives plain values.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch

from models.autoencoder import LatentScaling, scaling_from_config
from trainer.config.sections import Config
from trainer.core.errors import UserError
from trainer.core.log import Logger, warn
from trainer.data.latents import LatentCodec
from trainer.diffusion.checkpoints import DiffusionCheckpoint, load_diffusion_checkpoint
from trainer.diffusion.noise import per_sample_noise
from trainer.diffusion.sampling import ddim_sample, image_grid
from trainer.diffusion.schedule import Schedule
from trainer.parallel import engine, preempt
from trainer.parallel.accelerator import log_images, prepare_module, tracker_step
from trainer.files import atomic, plots, timing
from trainer.files.layout import RunLayout, picture_of
from trainer.stage2.checks import ae_path, start_checks
from trainer.stage2.discriminator_trainer import DiscriminatorTrainer, check_r1_supported, load_discriminator
from trainer.quality.evaluation import Evaluator
from trainer.stage2.finetune_trainer import FinetuneTrainer, check_grad_ratio_supported
from trainer.stage2.generation import iteration_shard, stratified_split, x0_pred_fakes
from trainer.stage2.run_record import record_run_fields, run_fields


@dataclass
class Stage2Setup:
    """What every iteration shares, built once after the checks passed: plain values, no callbacks."""

    cfg: Config
    acc: object
    layout: RunLayout
    log: Logger
    stage1: DiffusionCheckpoint  # the model stage 2 starts from (EMA weights)
    schedule: Schedule  # the stage-1 model's noise schedule
    latent_shape: tuple
    rows: object  # the filtered manifest (DataFrame)
    codec: LatentCodec  # rows -> latents, latents -> pixels (frozen AE, loaded on first use)
    facts: object  # what the checks learnt (stage2.checks.Facts)

    def discriminator_trainer(
        self, k: int, real, fake, real_train, fake_train, **kwargs
    ) -> DiscriminatorTrainer:
        return DiscriminatorTrainer(
            self.acc,
            self.cfg,
            k,
            self.layout,
            real,
            fake,
            real_train,
            fake_train,
            schedule=self.schedule,
            **kwargs,
        )

    def finetune_trainer(
        self, k: int, real, real_train, d, init: dict, evaluator: Evaluator | None = None
    ) -> FinetuneTrainer:
        quality = (
            evaluator.latent_fd
            if evaluator is not None and self.cfg.stage2.best_metric == "val_latent_fd"
            else None
        )
        return FinetuneTrainer(
            self.acc,
            self.cfg,
            k,
            self.layout,
            self.stage1,
            self.schedule,
            self.codec.ae_path,
            real,
            real_train,
            d,
            init,
            quality=quality,
        )

    def evaluator(self) -> Evaluator:
        decode = self.codec.decode if self.facts.ae is not None else None
        return Evaluator(
            self.acc,
            self.cfg,
            self.layout.summary,
            self.rows,
            self.codec.encode,
            decode,
            self.schedule,
            self.latent_shape,
            self.log,
        )


def setup(cfg: Config, acc) -> Stage2Setup:
    """Run every check that can fail before compute (files, columns, channels, sizes, N, saved latents, a
    changed config; input files sharded, a failure on any rank stops all ranks), then read the stage-1
    model once."""
    facts = start_checks(cfg, acc)
    stage1 = load_diffusion_checkpoint(
        facts.stage1.path, fallback_scheduler=facts.stage1.scheduler, scaling=stage1_scaling(facts)
    )
    latent_shape = tuple(facts.latent_shape)
    codec = LatentCodec(
        acc,
        ae_path(cfg, facts.stage1),
        stage1.scaling,
        latent_shape,
        resolution=cfg.dataset.resolution,
        batch_size=cfg.autoencoder.encode_batch_size,
        num_workers=cfg.training.num_workers,
    )
    return Stage2Setup(
        cfg=cfg,
        acc=acc,
        layout=RunLayout.of(cfg),
        log=Logger(acc, "stage2"),
        stage1=stage1,
        schedule=Schedule.from_dict(stage1.scheduler),
        latent_shape=latent_shape,
        rows=facts.rows,
        codec=codec,
        facts=facts,
    )


def stage1_scaling(facts) -> LatentScaling:
    """The latent scale and shift: the starting model's own, else (a bare UNet folder) the AE config's."""
    if facts.stage1.scaling is not None:
        return facts.stage1.scaling
    return scaling_from_config(facts.ae or {})


def complete(layout: RunLayout, k: int) -> bool:
    """Whether iteration k's fine-tune finished (its latest checkpoint says so). Read weights only (memory-
    mapped: its tensors are not read); one the weights-only loader refuses (it could run code) stops the run."""
    from trainer.files.read import UnsafeFileError, torch_load

    path = layout.diffusion_checkpoint(k, "latest")
    if not path.is_file():
        return False
    try:
        return bool(torch_load(path, "checkpoint").get("complete"))
    except UnsafeFileError as e:
        raise UserError(f"{e}; delete it to restart iteration {k}'s diffusion phase") from None
    except Exception:
        return False


def result(s: Stage2Setup, k: int):
    """Iteration k's result, the checkpoint iteration k+1 continues from (stage2.continue_from): what its
    grid and summary row show."""
    return s.layout.diffusion_checkpoint(k, s.cfg.stage2.continue_from)


def iteration_discriminator(layout: RunLayout, k: int):
    """The D iteration k's fine-tune ended with: the online D where one was trained, else the offline best."""
    online = layout.discriminator_online(k)
    return online if online.is_file() else layout.discriminator_best(k)


def _weights(path) -> dict:
    ck = load_diffusion_checkpoint(path)
    return {"raw": ck.raw_weights if ck.raw_weights is not None else ck.weights, "ema": ck.weights}


def _unet(s: Stage2Setup, weights: dict):
    return s.stage1.new_unet(weights)


def run_iteration(s: Stage2Setup, k: int, stop_after: int | None) -> bool:
    """Run (or finish) iteration k. Returns False if it stopped early as asked."""
    cfg, acc, log, layout = s.cfg, s.acc, s.log, s.layout
    s2, seed = cfg.stage2, cfg.training.seed
    if k == 0:
        init = {"raw": s.stage1.weights, "ema": s.stage1.weights}
        log(
            f"iteration 0: starting from the stage-1 checkpoint {s.stage1.path} (EMA weights, step {s.stage1.step})"
        )
    else:
        source = result(s, k - 1)
        init = _weights(source)
        log(f"iteration {k}: starting from {source} ({s2.continue_from} of iteration {k - 1})")
    gen_unet = prepare_module(_unet(s, init["ema"]).to(acc.device).eval(), cfg.performance, acc)
    sampler = torch.compile(gen_unet) if cfg.performance.compile_generation else gen_unet
    shard = iteration_shard(
        acc, cfg, layout, k, sampler, s.schedule.ddim(), s.latent_shape, s.rows, s.codec, log
    )
    del sampler
    real_train = stratified_split(shard.n, cfg.discriminator.training.train_split, seed, k, "real")
    fake_train = stratified_split(shard.n, cfg.discriminator.training.train_split, seed, k, "fake")

    real_t = fake_t = None
    fake_for_d = shard.fake
    if s2.generator_loss_mode == "x0_pred":
        fake_for_d, real_t = x0_pred_fakes(
            acc, cfg, s.schedule, gen_unet, shard.real, shard.own, k, s.latent_shape
        )
        fake_t = real_t
    warm = iteration_discriminator(layout, k - 1) if k > 0 and cfg.discriminator.training.warm_start else None
    d_trainer = s.discriminator_trainer(
        k, shard.real, fake_for_d, real_train, fake_train, real_t=real_t, fake_t=fake_t, warm_start_from=warm
    )
    with timing.phase(acc, layout.timings, "discriminator", k):
        d_trainer.fit()
    acc.free_memory()
    del d_trainer
    if acc.is_main_process:
        history = layout.discriminator_history(k)
        plots.plot_d_history(history, picture_of(history), k)
    evaluator = s.evaluator()
    if k == 0 and 0 not in evaluator.done():
        # the stage-1 baseline row, scored by the D fit to its samples
        with timing.phase(acc, layout.timings, "quality summary", 0):
            evaluator.record(evaluator.measure(0, gen_unet, load_discriminator(layout.discriminator_best(k))))
    del gen_unet

    g_trainer = s.finetune_trainer(
        k, shard.real, real_train, load_discriminator(layout.discriminator_best(k)), init, evaluator
    )
    g_trainer.stop_after = stop_after
    with timing.phase(acc, layout.timings, "diffusion", k):
        g_trainer.fit()
    done = g_trainer.step >= g_trainer.max_steps
    acc.free_memory()
    if acc.is_main_process:
        plots.plot_metrics(g_trainer.history_path, picture_of(g_trainer.history_path), k)
    if done:
        finish_iteration(s, k, evaluator)
    return done


def finish_iteration(s: Stage2Setup, k: int, evaluator: Evaluator) -> None:
    """The grid and the summary row of a finished iteration (idempotent, for resumes)."""
    layout = s.layout
    if s.acc.is_main_process:  # a run killed between writing a CSV and drawing it: draw it now
        plots.redraw_stale(layout.finetune_history(k), plots.plot_metrics, k)
    write_grid(s, k)
    if k == 0 and 0 not in evaluator.done():  # a run interrupted before the baseline row was written
        evaluator.record(
            evaluator.measure(0, _unet(s, s.stage1.weights), load_discriminator(layout.discriminator_best(0)))
        )
    if k + 1 not in evaluator.done():
        unet = _unet(s, _weights(result(s, k))["ema"])
        with timing.phase(s.acc, layout.timings, "quality summary", k + 1):
            evaluator.record(
                evaluator.measure(k + 1, unet, load_discriminator(iteration_discriminator(layout, k)))
            )
    if s.acc.is_main_process:
        plots.redraw_stale(evaluator.path, plots.plot_summary)
    refresh_report(s)


def refresh_report(s: Stage2Setup) -> None:
    """Write (or refresh) the run's report.html from what the folder holds now (main process). A failure
    to draw the page is one warning: it never stops the run."""
    if s.acc.is_main_process:
        from trainer.quality.report import write_report

        try:
            write_report(s.layout.root, config=s.cfg.to_dict(), name=s.layout.name)
        except Exception as e:  # the page is a view of the run, never a reason to lose it
            warn(
                f"report.html not written ({type(e).__name__}: {str(e).splitlines()[0][:120] if str(e) else ''})"
            )


def write_grid(s: Stage2Setup, k: int | None) -> None:
    """Decoded samples of iteration k's final weights (k None: the stage-1 model), from the same fixed seeds
    and with the same DDIM steps every time, so the grids compare picture by picture."""
    n = s.cfg.stage2.grid_samples
    path = s.layout.grid(k) if k is not None else s.layout.start_grid
    if n and s.acc.is_main_process and not path.is_file():
        weights = _weights(result(s, k))["ema"] if k is not None else s.stage1.weights
        unet = _unet(s, weights).to(s.acc.device).eval()
        noise = per_sample_noise(range(n), s.latent_shape, s.cfg.training.seed, "grid").to(s.acc.device)
        z = ddim_sample(unet, s.schedule.ddim(), noise, s.cfg.stage2.generation_steps)
        grid = image_grid(s.codec.decode(z), nrow=8)
        atomic.save_png(grid, path)
        if k is not None:
            log_images(s.acc, "samples", grid, tracker_step(s.cfg, "samples", k))
        s.log(f"{'iteration ' + str(k) if k is not None else 'stage 1'}: sample grid written to {path}")
    s.acc.wait_for_everyone()


def write_comparison(s: Stage2Setup, full_steps: int):
    """One picture of what stage 2 bought, from the grids' fixed seeds: the stage-1 model at stage 2's
    generation_steps (K), the last iteration's result at K, and the stage-1 model at `full_steps`, side by
    side (white gaps). Main process; returns the path, or None without grid samples."""
    import numpy as np

    n, k = s.cfg.stage2.grid_samples, s.cfg.stage2.generation_steps
    if not n or not s.acc.is_main_process:
        return None
    noise = per_sample_noise(range(n), s.latent_shape, s.cfg.training.seed, "grid").to(s.acc.device)
    stage1 = s.stage1.weights
    final = _weights(result(s, s.cfg.stage2.num_iterations - 1))["ema"]
    panels = []
    for weights, steps in ((stage1, k), (final, k), (stage1, full_steps)):
        unet = _unet(s, weights).to(s.acc.device).eval()
        panels.append(image_grid(s.codec.decode(ddim_sample(unet, s.schedule.ddim(), noise, steps)), nrow=8))
    gap = np.full((panels[0].shape[0], 12, *panels[0].shape[2:]), 255, dtype=np.uint8)
    picture = np.concatenate([panels[0], gap, panels[1], gap, panels[2]], axis=1)
    path = atomic.save_png(picture, s.layout.comparison)
    s.log(
        f"comparison written to {path}: stage 1 at {k} steps | stage 2 at {k} steps | stage 1 at {full_steps} "
        f"steps"
    )
    return path


def run(cfg: Config, acc, start_iteration: int | None = None, stop_after: int | None = None) -> None:
    s = setup(cfg, acc)
    check_r1_supported(acc, cfg.discriminator.training)
    check_grad_ratio_supported(acc, cfg.stage2, cfg.training.gradient_accumulation_steps)
    engine.check_accumulation(acc, cfg.training.gradient_accumulation_steps, cfg.training.batch_size)
    s2, layout = cfg.stage2, s.layout
    if start_iteration is not None:
        if start_iteration >= s2.num_iterations:
            raise UserError(
                f"--start_iteration {start_iteration}: expected less than --num_iterations "
                f"({s2.num_iterations})"
            )
        if start_iteration > 0 and not complete(layout, start_iteration - 1):
            path = layout.diffusion_checkpoint(start_iteration - 1, "latest")
            state = "is missing" if not path.is_file() else "is not a finished iteration"
            raise UserError(
                f"--start_iteration {start_iteration}: {path} {state}; finish iteration "
                f"{start_iteration - 1} first (or drop --start_iteration to continue where the "
                f"last run stopped)"
            )
        first = start_iteration
    else:
        first = 0
    # every check passed: only now is anything written
    if acc.is_main_process:
        atomic.remove_stale_temps(layout.root)  # temp files of writes a kill interrupted
        record_run_fields(cfg, run_fields(cfg, s.facts.stage1))
    log_resume_point(s, first)
    write_grid(
        s, None
    )  # the stage-1 model at stage 2's sampling steps: what the iterations' grids improve on
    refresh_report(s)
    for k in range(first, s2.num_iterations):
        if preempt.should_stop(acc.device):
            preempt.stop(acc, f"before iteration {k}")
        if complete(layout, k):
            s.log(f"iteration {k}: already complete ({layout.diffusion_checkpoint(k, 'latest')}); skipping")
            finish_iteration(s, k, s.evaluator())
            continue
        if not run_iteration(s, k, stop_after):
            s.log(f"stopped inside iteration {k} as asked; rerun the same command to continue")
            return
    export_result(s)
    s.log(f"stage 2 complete: {s2.num_iterations} iteration(s) under {layout.root}")


def export_result(s: Stage2Setup) -> None:
    """The run's result (the last iteration's continue_from checkpoint) as a diffusers pipeline folder, written
    by the main process once per result (a rerun of a finished run finds it current)."""
    if s.acc.is_main_process:
        from trainer.diffusion.export import export_pipeline, is_current

        source = result(s, s.cfg.stage2.num_iterations - 1)
        ckpt = load_diffusion_checkpoint(source)
        if not is_current(s.layout.pipeline, ckpt):
            ae = s.codec.ae_path if s.codec.ae_path is not None and Path(s.codec.ae_path).exists() else None
            export_pipeline(ckpt, s.layout.pipeline, autoencoder=ae)
            s.log(
                f"pipeline folder written to {s.layout.pipeline} ({source.name}; "
                f"DiffusionPipeline.from_pretrained(..., trust_remote_code=True))"
            )
    s.acc.wait_for_everyone()


def log_resume_point(s: Stage2Setup, first: int) -> None:
    """One line saying where this run picks up, when the folder already holds work."""
    layout, n_iter = s.layout, s.cfg.stage2.num_iterations
    done = [k for k in range(first, n_iter) if complete(layout, k)]
    k = next((k for k in range(first, n_iter) if k not in done), None)
    if k is None:
        s.log(f"RESUMING {layout.root}: all {n_iter} iteration(s) finished earlier")
        return
    parts = [
        f"{path.name} saved" for path in (layout.fake_latents(k), layout.real_latents(k)) if path.is_file()
    ]
    for label, path in (
        ("discriminator state", layout.discriminator_state(k)),
        ("diffusion state", layout.diffusion_checkpoint(k, "latest")),
    ):
        if path.is_file():
            parts.append(f"{label} {path.name}")
    if done or parts:
        finished = ", ".join(map(str, done)) or "none"
        s.log(
            f"RESUMING {layout.root}: complete iteration(s): {finished}; iteration {k}: "
            + (", ".join(parts) if parts else "nothing saved yet")
            + " (phases below say the step)"
        )
