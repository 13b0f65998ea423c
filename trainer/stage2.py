"""Stage 2: adversarial fine-tuning of a stage-1 diffusion model against a latent discriminator.

    advdiff stage2 CONFIG [--num_samples N] [--num_iterations I] ... [--start_iteration k]
    accelerate launch -m trainer.stage2 CONFIG [flags]          # 1..N processes

Each iteration k: (a) fakes generated and (b) reals encoded, sharded by index; (c) the main process
writes both sets; (d) a new D is trained; (e) the UNet is fine-tuned with the composite loss. A rerun
continues where the last run stopped; `--start_iteration k` requires iteration k-1's checkpoint.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

from models.autoencoder import decode
from models.schedules import ddim_scheduler, training_scheduler
from models.unet import spec_to_dict

from . import io, plots, preempt, timing
from .checkpoints import load_diffusion_checkpoint
from .evaluate import Evaluator
from .cli_common import stage_parser
from .config import Config
from .errors import UserError
from .finetune import FinetuneTrainer, predictions
from .gan import DiscriminatorTrainer, load_discriminator
from .latents import encode_local, latent_shape_of
from .runtime import Logger, generator, prepare_module
from .sampling import ddim_sample, image_grid, initial_noise
from .shards import iteration_shard, stratified_split

from .flags import FLAGS  # noqa: E402,F401  (the stage-2 flags, shared with `advdiff validate`)


class Stage2Context:
    """What every phase of every iteration shares: config, accelerator, stage-1 model facts, data."""

    def __init__(self, cfg: Config, acc):
        self.cfg, self.acc = cfg, acc
        self.log = Logger(acc, "stage2")
        from .validate import start_checks

        # every check that can fail before compute (files, columns, channels, sizes, N, saved latents,
        # a changed config); input files are checked sharded, and a failure on any rank stops all ranks
        self.facts = facts = start_checks(cfg, acc)
        self.out_dir = cfg.out_dir
        self.stage1 = load_diffusion_checkpoint(facts.stage1.path)
        self.spec, self.scaling = self.stage1.spec, self.stage1.scaling
        self.spec_dict = spec_to_dict(self.spec)
        sch = self.stage1.scheduler
        self.scheduler_dict = dict(sch)
        self.noise_sched = training_scheduler(sch["type"], sch["num_steps"], sch["prediction_type"])
        self.num_train_timesteps = sch["num_steps"]
        self.ddim = self.new_ddim()
        self.latent_shape = facts.latent_shape
        self.rows = facts.rows
        self._ae = None
        self.has_ae = facts.ae is not None

    def new_ddim(self):
        sch = self.stage1.scheduler
        return ddim_scheduler(sch["type"], sch["num_steps"], sch["prediction_type"])

    @property
    def ae(self):
        """The frozen AE, loaded on first use (pre-embedded latents may make it unnecessary)."""
        if self._ae is None:
            from .stage1 import load_frozen_ae

            cfg = self.cfg
            if cfg.autoencoder.checkpoint is None:
                cfg.autoencoder.checkpoint = self.stage1.autoencoder
            self._ae = load_frozen_ae(cfg, self.acc.device)
            if self._ae.config.latent_channels != self.spec.in_channels:
                raise UserError(f"autoencoder.checkpoint: latent channels {self._ae.config.latent_channels} "
                                f"differ from the stage-1 UNet's {self.spec.in_channels}")
        return self._ae

    def encode_local(self, rows, out: torch.Tensor | None = None) -> torch.Tensor:
        """Model-space latents of these rows (files where given, else the frozen AE in fp32), written into
        `out` when given. A file that fails on one rank stops every rank with its message (no rank is
        left waiting)."""
        from .validate import agree

        return agree(self.acc, self._encode_local, rows, out)

    def _encode_local(self, rows, out: torch.Tensor | None) -> torch.Tensor:
        needs_ae = any(not isinstance(p, str) for p in rows["latent_path"])
        ae = self.ae if needs_ae else None
        size = self.cfg.dataset.resolution or (ae.config.sample_size if ae is not None else None)
        if ae is not None:
            shape = latent_shape_of(ae, size)
            if shape != self.latent_shape:
                raise UserError(f"dataset.resolution: images give latents {shape}, the stage-1 UNet expects "
                                f"{self.latent_shape}")
        from .progress import bar

        progress = bar(self.acc, len(rows), "encoding", "image")
        raw = encode_local(ae, rows["image_path"].tolist(), rows["latent_path"].tolist(), size=size,
                           channels=ae.config.in_channels if ae is not None else 0, latent_shape=self.latent_shape,
                           batch_size=self.cfg.autoencoder.encode_batch_size, device=self.acc.device,
                           num_workers=self.cfg.training.num_workers, progress=progress.update, out=out)
        progress.close()
        return self.scaling.to_model_(raw)

    # -- paths -------------------------------------------------------------------------------------
    def ckpt(self, k: int, tag: str) -> Path:
        return self.out_dir / "checkpoints" / f"{self.cfg.experiment.name}_iter_{k}_checkpoint_{tag}.pt"

    def folder(self, k: int) -> Path:
        return self.out_dir / f"discriminator_iter_{k}"

    def complete(self, k: int) -> bool:
        path = self.ckpt(k, "latest")
        if not path.is_file():
            return False
        try:
            return bool(torch.load(path, map_location="cpu", weights_only=False).get("complete"))
        except Exception:
            return False


def _weights(path: Path):
    blob = load_diffusion_checkpoint(path).blob
    raw = blob.get("raw_state_dict") or blob["state_dict"]
    return {"raw": raw, "ema": blob["state_dict"]}


def x0_pred_fakes(ctx: Stage2Context, unet, real: torch.Tensor, own: range, k: int):
    """D's fakes in x0_pred mode: one-step x0 predictions of this rank's noised reals, with their t."""
    seed = ctx.cfg.training.seed
    t_max = int(ctx.cfg.stage2.x0_pred_max_timestep * ctx.num_train_timesteps)
    t = torch.tensor([int(torch.randint(0, t_max, (1,), generator=generator(seed, "x0t", k, i))) for i in own],
                     dtype=torch.long)
    fakes = []
    with torch.inference_mode():
        for s in range(0, len(own), 256):
            idx = list(own)[s:s + 256]
            x0 = real[s:s + 256].to(ctx.acc.device)
            noise = initial_noise(idx, ctx.latent_shape, seed, "x0n", k).to(x0.device)
            tt = t[s:s + 256].to(x0.device)
            x_t = ctx.noise_sched.add_noise(x0, noise, tt)
            with ctx.acc.autocast():
                out = unet(x_t, tt).sample.float()
            fakes.append(predictions(ctx.noise_sched, out, x_t, tt)[1].cpu())
    return (torch.cat(fakes) if fakes else real[:0].clone()), t


def run_iteration(ctx: Stage2Context, k: int, stop_after: int | None) -> bool:
    """Run (or finish) iteration k. Returns False if it stopped early as asked."""
    cfg, acc, log = ctx.cfg, ctx.acc, ctx.log
    s2 = cfg.stage2
    if k == 0:
        source = ctx.stage1.path
        init = {"raw": ctx.stage1.blob["state_dict"], "ema": ctx.stage1.blob["state_dict"]}
        log(f"iteration 0: starting from the stage-1 checkpoint {source} (EMA weights, step {ctx.stage1.step})")
    else:
        source = ctx.ckpt(k - 1, s2.continue_from)
        init = _weights(source)
        log(f"iteration {k}: starting from {source} ({s2.continue_from} of iteration {k - 1})")
    from models.unet import build_unet

    gen_unet = build_unet(ctx.spec)
    gen_unet.load_state_dict(init["ema"])
    gen_unet = prepare_module(gen_unet.to(acc.device).eval(), cfg.performance, acc)
    folder = ctx.folder(k)
    sampler = torch.compile(gen_unet) if cfg.performance.compile_generation else gen_unet
    shard = iteration_shard(ctx, k, sampler, folder, log)
    del sampler
    real_train = stratified_split(shard.n, cfg.discriminator.training.train_split, cfg.training.seed, k, "real")
    fake_train = stratified_split(shard.n, cfg.discriminator.training.train_split, cfg.training.seed, k, "fake")

    d_best = folder / "discriminator_best.pt"
    d_kwargs = {}
    fake_for_d = shard.fake
    if s2.generator_loss_mode == "x0_pred":
        fake_for_d, t = x0_pred_fakes(ctx, gen_unet, shard.real, shard.own, k)
        d_kwargs = {"real_t": t, "fake_t": t}
    warm = ctx.folder(k - 1) / "discriminator_best.pt" if k > 0 and cfg.discriminator.training.warm_start else None
    d_trainer = DiscriminatorTrainer(ctx, k, folder, shard.real, fake_for_d, real_train, fake_train,
                                     warm_start_from=warm, **d_kwargs)
    with timing.phase(acc, ctx.out_dir, "discriminator", k):
        d_trainer.fit()
    acc.free_memory()
    del d_trainer
    if acc.is_main_process:
        plots.plot_d_history(folder / "discriminator_history.csv", folder / "discriminator_history.png", k)
    evaluator = Evaluator(ctx)
    if k == 0 and 0 not in evaluator.done():
        # the stage-1 baseline row, scored by the D fit to its samples
        with timing.phase(acc, ctx.out_dir, "quality summary", 0):
            evaluator.record(evaluator.measure(0, gen_unet, load_discriminator(d_best)))
    del gen_unet

    d = load_discriminator(d_best)
    g_trainer = FinetuneTrainer(ctx, k, shard.real, real_train, d, init)
    g_trainer.stop_after = stop_after
    with timing.phase(acc, ctx.out_dir, "diffusion", k):
        g_trainer.fit()
    done = g_trainer.step >= g_trainer.max_steps
    acc.free_memory()
    if acc.is_main_process:
        plots.plot_metrics(g_trainer.history_path, g_trainer.history_path.with_suffix(".png"), k)
    if done:
        finish_iteration(ctx, k, evaluator)
    return done


def finish_iteration(ctx: Stage2Context, k: int, evaluator) -> None:
    """The grid and the summary row of a finished iteration (idempotent, for resumes)."""
    if ctx.acc.is_main_process:  # a run killed between writing a CSV and drawing it: draw it now
        plots.redraw_stale(ctx.out_dir / f"{ctx.cfg.experiment.name}_metrics_iter_{k}.csv", plots.plot_metrics, k)
    write_grid(ctx, k)
    from models.unet import build_unet

    if k == 0 and 0 not in evaluator.done():  # a run interrupted before the baseline row was written
        unet = build_unet(ctx.spec)
        unet.load_state_dict(ctx.stage1.blob["state_dict"])
        evaluator.record(evaluator.measure(0, unet, load_discriminator(ctx.folder(0) / "discriminator_best.pt")))
    if k + 1 not in evaluator.done():
        unet = build_unet(ctx.spec)
        unet.load_state_dict(_weights(ctx.ckpt(k, "latest"))["ema"])
        with timing.phase(ctx.acc, ctx.out_dir, "quality summary", k + 1):
            evaluator.record(evaluator.measure(k + 1, unet, load_discriminator(ctx.folder(k) / "discriminator_best.pt")))
    if ctx.acc.is_main_process:
        plots.redraw_stale(evaluator.path, plots.plot_summary)


def write_grid(ctx: Stage2Context, k: int) -> None:
    """Decoded samples of iteration k's final weights, from the same fixed seeds every iteration."""
    n = ctx.cfg.stage2.grid_samples
    path = ctx.out_dir / "samples" / f"{ctx.cfg.experiment.name}_iter_{k}.png"
    if n and ctx.acc.is_main_process and not path.is_file():
        from models.unet import build_unet

        unet = build_unet(ctx.spec)
        unet.load_state_dict(_weights(ctx.ckpt(k, "latest"))["ema"])
        unet = unet.to(ctx.acc.device).eval()
        noise = initial_noise(range(n), ctx.latent_shape, ctx.cfg.training.seed, "grid").to(ctx.acc.device)
        z = ddim_sample(unet, ctx.new_ddim(), noise, ctx.cfg.stage2.generation_steps)
        grid = image_grid(decode(ctx.ae, ctx.scaling.from_model(z)), nrow=8)
        io.save_png(grid, path)
        log_image(ctx.acc, "samples", grid, k)
        ctx.log(f"iteration {k}: sample grid written to {path}")
    ctx.acc.wait_for_everyone()


def log_image(acc, name, grid, step) -> None:
    """A uint8 grid (H, W) or (H, W, 3) to the trackers that take images (TensorBoard)."""
    for tracker in acc.trackers:
        if hasattr(tracker, "log_images"):
            img = grid if grid.ndim == 3 else grid[:, :, None]
            tracker.log_images({name: img[None]}, step=step, dataformats="NHWC")


def run(cfg: Config, acc, start_iteration: int | None = None, stop_after: int | None = None) -> None:
    ctx = Stage2Context(cfg, acc)
    s2 = cfg.stage2
    if start_iteration is not None:
        if start_iteration >= s2.num_iterations:
            raise UserError(f"--start_iteration {start_iteration}: expected less than --num_iterations "
                            f"({s2.num_iterations})")
        if start_iteration > 0 and not ctx.complete(start_iteration - 1):
            path = ctx.ckpt(start_iteration - 1, "latest")
            state = "is missing" if not path.is_file() else "is not a finished iteration"
            raise UserError(f"--start_iteration {start_iteration}: {path} {state}; finish iteration "
                            f"{start_iteration - 1} first (or drop --start_iteration to continue where the "
                            f"last run stopped)")
        first = start_iteration
    else:
        first = 0
    # every check passed: only now is anything written
    if acc.is_main_process:
        io.remove_stale_temps(cfg.out_dir)  # temp files of writes a kill interrupted
        from .validate import record_run_fields, run_fields

        record_run_fields(cfg, run_fields(cfg, ctx.facts.stage1))
    log_resume_point(ctx, first)
    for k in range(first, s2.num_iterations):
        if preempt.should_stop(acc.device):
            preempt.stop(acc, f"before iteration {k}")
        if ctx.complete(k):
            ctx.log(f"iteration {k}: already complete ({ctx.ckpt(k, 'latest')}); skipping")
            finish_iteration(ctx, k, Evaluator(ctx))
            continue
        if not run_iteration(ctx, k, stop_after):
            ctx.log(f"stopped inside iteration {k} as asked; rerun the same command to continue")
            return
    ctx.log(f"stage 2 complete: {s2.num_iterations} iteration(s) under {ctx.out_dir}")


def log_resume_point(ctx: Stage2Context, first: int) -> None:
    """One line saying where this run picks up, when the folder already holds work."""
    done = [k for k in range(first, ctx.cfg.stage2.num_iterations) if ctx.complete(k)]
    k = next((k for k in range(first, ctx.cfg.stage2.num_iterations) if k not in done), None)
    if k is None:
        ctx.log(f"RESUMING {ctx.out_dir}: all {ctx.cfg.stage2.num_iterations} iteration(s) finished earlier")
        return
    folder, parts = ctx.folder(k), []
    for name in ("fake_latents.pt", "real_latents.pt"):
        if (folder / name).is_file():
            parts.append(f"{name} saved")
    for label, path in (("discriminator state", folder / "discriminator_state.pt"),
                        ("diffusion state", ctx.ckpt(k, "latest"))):
        if path.is_file():
            parts.append(f"{label} {path.name}")
    if done or parts:
        finished = ", ".join(map(str, done)) or "none"
        ctx.log(f"RESUMING {ctx.out_dir}: complete iteration(s): {finished}; iteration {k}: "
                + (", ".join(parts) if parts else "nothing saved yet") + " (phases below say the step)")


def apply_arm(cfg: Config, weight: float | None, control: bool) -> None:
    """--adversarial_weight and --control. The control arm keeps everything else (data, seeds, steps,
    D training for its metrics) and only drops the adversarial term, in its own folder."""
    if weight is not None and (weight < 0 or weight != weight):
        raise UserError(f"--adversarial_weight: expected a number >= 0, got {weight}")
    if control:
        weight = 0.0
        cfg.experiment.save_path = str(cfg.out_dir) + "_control"
    if weight is not None:
        terms = [t for t in cfg.training.loss.losses if t.type == "DiscriminatorLoss"]
        if not terms:
            raise UserError("--adversarial_weight: training.loss has no DiscriminatorLoss term to weight")
        for t in terms:
            t.weight = weight


def build_parser() -> argparse.ArgumentParser:
    p = stage_parser("stage2", "Adversarial fine-tuning against a latent discriminator (stage 2).")
    for flag, (_, typ, help_) in FLAGS.items():
        p.add_argument(f"--{flag}", type=typ, default=None, help=f"{help_}")
    p.add_argument("--adversarial_weight", type=float, default=None,
                   help="weight of every DiscriminatorLoss term (overrides training.loss)")
    p.add_argument("--control", action="store_true",
                   help="the MSE-only control arm: adversarial weight 0, same data and steps, into "
                        "<save_path>_control")
    p.add_argument("--start_iteration", type=int, default=None,
                   help="start at this iteration; needs iteration k-1's checkpoint (default: continue where "
                        "the last run stopped, from iteration 0)")
    return p


def main(argv=None) -> int:
    from .cli_common import run_main

    parser = build_parser()

    def flags(args):
        return {path: getattr(args, flag) for flag, (path, _, _) in FLAGS.items() if getattr(args, flag) is not None}

    def body(cfg, args):
        if args.start_iteration is not None and args.start_iteration < 0:
            raise UserError(f"--start_iteration: expected an integer >= 0, got {args.start_iteration}")
        apply_arm(cfg, args.adversarial_weight, args.control)
        from .cli_common import accelerator_for

        acc = accelerator_for(cfg, args)
        try:
            run(cfg, acc, args.start_iteration, args.stop_after_steps)
        finally:
            acc.end_training()

    return run_main(parser, argv, body, extra_overrides=flags)


if __name__ == "__main__":
    sys.exit(main())
