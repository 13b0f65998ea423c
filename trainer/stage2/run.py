"""Stage 2: adversarial fine-tuning of a stage-1 diffusion model against a latent discriminator.

    advdiff stage2 CONFIG [--num_samples N] [--num_iterations I] ... [--start_iteration k]
    accelerate launch -m trainer.stage2 CONFIG [flags]          # 1..N processes

Each iteration k: (a) fakes generated and (b) reals encoded, sharded by index; (c) the main process
writes both sets; (d) a new D is trained; (e) the UNet is fine-tuned with the composite loss; then the
iteration's grid and quality row. A rerun continues where the last run stopped; `--start_iteration k`
requires iteration k-1's checkpoint. This module only orchestrates: each phase lives in its own module
and receives plain values (prepare: the checks and what the iterations share; outputs: grids, report
and pipeline folder).
"""

from __future__ import annotations

import torch

from trainer.config.sections import Config
from trainer.core.errors import UserError
from trainer.files import atomic, plots, timing
from trainer.files.layout import picture_of
from trainer.parallel import engine, preempt
from trainer.parallel.accelerator import prepare_module
from trainer.quality.evaluation import Evaluator
from trainer.stage2 import registry
from trainer.stage2.critics import critic_class
from trainer.stage2.discriminator_trainer import check_r1_supported, load_discriminator
from trainer.stage2.distribution_matching import check_distribution_matching_supported
from trainer.stage2.finetune_columns import check_grad_ratio_supported
from trainer.stage2.generation import iteration_shard, stratified_split
from trainer.stage2.outputs import export_result, refresh_report, write_grid
from trainer.stage2.prepare import (
    Stage2Setup,
    complete,
    iteration_discriminator,
    new_unet,
    result,
    setup,
    weights_of,
)
from trainer.stage2.run_record import record_run_fields, run_fields
from trainer.stage2.samples import sample_source


def offline_d(cfg, path):
    """The offline D saved at `path`, or None where the run's critic trains none."""
    return load_discriminator(path) if critic_class(cfg).offline_phase else None


def summary_d(s: Stage2Setup, k: int):
    """The D that scores the summary row of iteration k's result (None: the row's d_acc stays empty)."""
    return critic_class(s.cfg).summary_discriminator(s, k)


def iteration_init(s: Stage2Setup, k: int) -> dict:
    """The weights iteration k starts from (and what its helpers carry over from iteration k-1)."""
    cfg, log = s.cfg, s.log
    if k == 0:
        log(
            f"iteration 0: starting from the stage-1 checkpoint {s.stage1.path} (EMA weights, step "
            f"{s.stage1.step})"
        )
        return {"raw": s.stage1.weights, "ema": s.stage1.weights}
    source = result(s, k - 1)
    init = weights_of(source)
    log(f"iteration {k}: starting from {source} ({cfg.stage2.continue_from} of iteration {k - 1})")
    init.update(registry.carried_init(cfg, s.layout, k, log))
    return init


def run_iteration(s: Stage2Setup, k: int, stop_after: int | None) -> bool:
    """Run (or finish) iteration k. Returns False if it stopped early as asked."""
    cfg, acc, layout = s.cfg, s.acc, s.layout
    init = iteration_init(s, k)
    gen_unet = prepare_module(new_unet(s, init["ema"]).to(acc.device).eval(), cfg.performance, acc)
    sampler = torch.compile(gen_unet) if cfg.performance.compile_generation else gen_unet
    shard = iteration_shard(
        acc, cfg, layout, k, sampler, s.schedule.ddim(), s.latent_shape, s.rows, s.codec, s.log, s.labels
    )
    del sampler
    split, seed = cfg.discriminator.training.train_split, cfg.training.seed
    real_train = stratified_split(shard.n, split, seed, k, "real")
    fake_train = stratified_split(shard.n, split, seed, k, "fake")
    discriminator_phase(s, k, shard, gen_unet, real_train, fake_train)
    evaluator = s.evaluator()
    if k == 0 and 0 not in evaluator.done():
        # the stage-1 baseline row, scored by the D fit to its samples
        with timing.phase(acc, layout.timings, "quality summary", 0):
            evaluator.record(evaluator.measure(0, gen_unet, offline_d(cfg, layout.discriminator_best(k))))
    del gen_unet
    done = finetune_phase(s, k, shard, real_train, init, evaluator, stop_after)
    if done:
        finish_iteration(s, k, evaluator)
    return done


def discriminator_phase(s: Stage2Setup, k: int, shard, gen_unet, real_train, fake_train) -> None:
    """Iteration k's offline D, where the run's critic trains one (its fakes: the sample source's)."""
    cfg, acc, layout = s.cfg, s.acc, s.layout
    if not critic_class(cfg).offline_phase:
        s.log(
            f"iteration {k}: no offline discriminator phase (discriminator.config.type "
            f"{cfg.discriminator.config.type}: the critic trains during the fine-tune)"
        )
        return
    fake, fake_t, fake_labels, real_t = sample_source(cfg).fakes_for_discriminator(acc, s, shard, gen_unet, k)
    warm_start = k > 0 and cfg.discriminator.training.warm_start
    d_trainer = s.discriminator_trainer(
        k,
        shard.real,
        fake,
        real_train,
        fake_train,
        real_t=real_t,
        fake_t=fake_t,
        warm_start_from=iteration_discriminator(layout, k - 1) if warm_start else None,
        real_labels=shard.real_labels,
        fake_labels=fake_labels,
    )
    with timing.phase(acc, layout.timings, "discriminator", k):
        d_trainer.fit()
    acc.free_memory()
    del d_trainer
    if acc.is_main_process:
        history = layout.discriminator_history(k)
        plots.plot_d_history(history, picture_of(history), k)


def finetune_phase(s: Stage2Setup, k: int, shard, real_train, init, evaluator, stop_after) -> bool:
    """Iteration k's fine-tune; returns whether it finished (False: stopped after `stop_after` steps)."""
    cfg, acc, layout = s.cfg, s.acc, s.layout
    d = offline_d(cfg, layout.discriminator_best(k))
    y = shard.real_labels
    g_trainer = s.finetune_trainer(k, shard.real, real_train, d, init, evaluator, real_labels=y)
    g_trainer.stop_after = stop_after
    # distribution_matching.warm_start_steps: this rank's fakes, N and the N fakes' labels
    fake_labels = None if s.labels is None else s.labels.fakes(shard.n, cfg.training.seed, k)
    g_trainer.warm_fakes = (shard.fake, shard.n, fake_labels)
    with timing.phase(acc, layout.timings, "diffusion", k):
        g_trainer.fit()
    done = g_trainer.step >= g_trainer.max_steps
    acc.free_memory()
    if acc.is_main_process:
        plots.plot_metrics(g_trainer.history_path, picture_of(g_trainer.history_path), k)
    return done


def finish_iteration(s: Stage2Setup, k: int, evaluator: Evaluator) -> None:
    """The grid and the summary row of a finished iteration (idempotent, for resumes)."""
    layout = s.layout
    if s.acc.is_main_process:  # a run killed between writing a CSV and drawing it: draw it now
        plots.redraw_stale(layout.finetune_history(k), plots.plot_metrics, k)
    write_grid(s, k)
    if k == 0 and 0 not in evaluator.done():  # a run interrupted before the baseline row was written
        evaluator.record(
            evaluator.measure(
                0, new_unet(s, s.stage1.weights), offline_d(s.cfg, layout.discriminator_best(0))
            )
        )
    if k + 1 not in evaluator.done():
        unet = new_unet(s, weights_of(result(s, k))["ema"])
        with timing.phase(s.acc, layout.timings, "quality summary", k + 1):
            evaluator.record(evaluator.measure(k + 1, unet, summary_d(s, k)))
    if s.acc.is_main_process:
        plots.redraw_stale(evaluator.path, plots.plot_summary)
    refresh_report(s)


def run(cfg: Config, accelerator, start_iteration: int | None = None, stop_after: int | None = None) -> None:
    s = setup(cfg, accelerator)
    support_checks(accelerator, cfg)
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
    if accelerator.is_main_process:
        atomic.remove_stale_temps(layout.root)  # temp files of writes a kill interrupted
        record_run_fields(cfg, run_fields(cfg, s.facts.stage1))
    log_resume_point(s, first)
    write_grid(
        s, None
    )  # the stage-1 model at stage 2's sampling steps: what the iterations' grids improve on
    refresh_report(s)
    for k in range(first, s2.num_iterations):
        if preempt.should_stop(accelerator.device):
            preempt.stop(accelerator, f"before iteration {k}")
        if complete(layout, k):
            s.log(f"iteration {k}: already complete ({layout.diffusion_checkpoint(k, 'latest')}); skipping")
            finish_iteration(s, k, s.evaluator())
            continue
        if not run_iteration(s, k, stop_after):
            s.log(f"stopped inside iteration {k} as asked; rerun the same command to continue")
            return
    export_result(s)
    s.log(f"stage 2 complete: {s2.num_iterations} iteration(s) under {layout.root}")


def support_checks(accelerator, cfg) -> None:
    """What this launch (its world, DeepSpeed or not) cannot run, one line each, before any compute: the
    one place they run (the phases and helpers rely on them)."""
    check_r1_supported(accelerator, cfg.discriminator.training)
    check_grad_ratio_supported(accelerator, cfg.stage2, cfg.training.gradient_accumulation_steps)
    check_distribution_matching_supported(accelerator, cfg)
    engine.check_accumulation(accelerator, cfg.training.gradient_accumulation_steps, cfg.training.batch_size)


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
