"""What a stage-2 run shows of itself, written by the main process: the sample grids, the demo's
comparison picture, report.html and the result as a diffusers pipeline folder. Each refuses a read-only
setup (stage2.prepare)."""

from __future__ import annotations

import json
from pathlib import Path

import torch

from trainer.core.log import warn
from trainer.diffusion.checkpoints import load_diffusion_checkpoint
from trainer.diffusion.noise import per_sample_noise
from trainer.diffusion.sampling import ddim_sample, image_grid
from trainer.files import atomic
from trainer.files.layout import comparison_panels
from trainer.parallel.accelerator import log_images, tracker_step
from trainer.stage2.prepare import Stage2Setup, new_unet, result, weights_of


def refresh_report(s: Stage2Setup) -> None:
    """Write (or refresh) the run's report.html from what the folder holds now (main process). A failure
    to draw the page is one warning: it never stops the run."""
    s.check_writable("report.html")
    if s.acc.is_main_process:
        from trainer.quality.report import write_report

        try:
            write_report(s.layout.root, config=s.cfg.to_dict(), name=s.layout.name)
        except Exception as e:  # the page is a view of the run, never a reason to lose it
            first = str(e).splitlines()[0][:120] if str(e) else ""
            warn(f"report.html not written ({type(e).__name__}: {first})")


def write_grid(s: Stage2Setup, k: int | None) -> None:
    """Decoded samples of iteration k's final weights (k None: the stage-1 model), from the same fixed seeds
    and with the same DDIM steps every time, so the grids compare picture by picture."""
    s.check_writable("sample grid")
    n = s.cfg.stage2.grid_samples
    path = s.layout.grid(k) if k is not None else s.layout.start_grid
    if n and s.acc.is_main_process and not path.is_file():
        weights = weights_of(result(s, k))["ema"] if k is not None else s.stage1.weights
        unet = new_unet(s, weights).to(s.acc.device).eval()
        noise = per_sample_noise(range(n), s.latent_shape, s.cfg.training.seed, "grid").to(s.acc.device)
        labelled, nrow = grid_labels(s, n)
        z = ddim_sample(unet, s.schedule.ddim(), noise, s.cfg.stage2.generation_steps, **labelled)
        grid = image_grid(s.codec.decode(z), nrow=nrow)
        atomic.save_png(grid, path)
        if k is not None:
            log_images(s.acc, "samples", grid, tracker_step(s.cfg, "samples", k))
        s.log(f"{'iteration ' + str(k) if k is not None else 'stage 1'}: sample grid written to {path}")
    s.acc.wait_for_everyone()


def grid_labels(s: Stage2Setup, n: int) -> tuple[dict, int]:
    """(ddim_sample's label keywords, the grid's row length) of n grid samples: a class-conditional run's
    sample i has class i mod C, at the run's guidance scale, and each of the grid's C columns is one class
    (for C up to 16)."""
    if s.labels is None:
        return {}, 8
    c = s.labels.conditioning.num_classes
    return s.labels.sampling(torch.arange(n) % c), c if c <= 16 else 8


def result_weights(s: Stage2Setup) -> dict:
    """The EMA weights of the run's result: the last iteration's stage2.continue_from checkpoint."""
    return weights_of(result(s, s.cfg.stage2.num_iterations - 1))["ema"]


def write_comparison(s: Stage2Setup, full_steps: int, one_step: dict | None = None):
    """One picture of what stage 2 bought, from the grids' fixed seeds: the stage-1 model at stage 2's
    generation_steps (K), the last iteration's result at each step count it trained at (K, or each of
    stage2.train_steps), and the stage-1 model at `full_steps`, side by side (white gaps; comparison_panels).
    one_step: the weights of a companion run's result trained at K = 1 (the demo's), shown first beside
    the stage-1 model at 1 step. The captions go beside it as JSON, for the report. Main process; returns
    the path, or None without grid samples."""
    s.check_writable("comparison picture")
    import numpy as np

    n = s.cfg.stage2.grid_samples
    if not n or not s.acc.is_main_process:
        return None
    noise = per_sample_noise(range(n), s.latent_shape, s.cfg.training.seed, "grid").to(s.acc.device)
    weights = {"stage 1": s.stage1.weights, "stage 2": result_weights(s)}
    names = comparison_panels(vars(s.cfg.stage2), full_steps)
    if one_step is not None:
        weights["stage 2 (1-step run)"] = one_step
        names = [("stage 1", 1), ("stage 2 (1-step run)", 1), *names]
    panels = []
    labelled, nrow = grid_labels(s, n)
    for model, steps in names:
        unet = new_unet(s, weights[model]).to(s.acc.device).eval()
        z = ddim_sample(unet, s.schedule.ddim(), noise, steps, **labelled)
        panels.append(image_grid(s.codec.decode(z), nrow=nrow))
    gap = np.full((panels[0].shape[0], 12, *panels[0].shape[2:]), 255, dtype=np.uint8)
    picture = np.concatenate([x for panel in panels for x in (panel, gap)][:-1], axis=1)
    captions = [f"{m} at {k} step{'s' if k != 1 else ''}" for m, k in names]
    atomic.write_text(json.dumps(captions), s.layout.comparison_captions)
    path = atomic.save_png(picture, s.layout.comparison)
    s.log(f"comparison written to {path}: " + " | ".join(captions))
    return path


def export_result(s: Stage2Setup) -> None:
    """The run's result (the last iteration's continue_from checkpoint) as a diffusers pipeline folder,
    written by the main process once per result (a rerun of a finished run finds it current)."""
    s.check_writable("pipeline folder")
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
