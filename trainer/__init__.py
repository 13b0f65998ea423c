"""advdiff's trainer: everything that touches the Accelerator. Packages, lowest layer first (a package
imports only from packages above it in this list; `models/` holds the plain networks):

    core/       errors, derived seeds, status lines and progress bars, fault points
    config/     typed config sections, YAML loading and overrides, the embedded default
    files/      atomic writes, RunLayout (every output path), tolerant reads, timings, plots
    parallel/   Accelerator, DeepSpeed differences, collectives and rank agreement, preemption, SLURM
    data/       manifest and images, the embedded digits, real latents (files or the frozen AE)
    diffusion/  schedule maths, one DDIM step and the sampler, noise/timestep draws, UNet spec, checkpoints
    training/   StepTrainer (evaluation, exports, exact resume, non-finite guard), optimizers, EMA, losses
    quality/    sample quality: fixed-seed evaluation, FD / precision / recall, feature spaces, run report
    stage0/ stage1/ stage2/   the three stages (`python -m trainer.stageN`); stage 2 as phases
    cli/        the `advdiff` command
"""
