"""The Accelerator and process-aware logging. The only place a trainer gets its Accelerator, and the
experiment trackers behind `--report_to` (which trackers, the config they record, one global step for a
whole run, and images in the form each tracker takes)."""

from __future__ import annotations

import json
import os
import re
from pathlib import Path

import torch

from trainer.core.errors import UserError
from trainer.core.log import warn
from trainer.parallel import engine
from trainer.parallel.collectives import agree


def set_deterministic(on: bool) -> None:
    """training.deterministic: kernels that repeat bit for bit on GPU (see docs/REPRODUCIBILITY.md)."""
    if not on:
        return
    os.environ.setdefault(
        "CUBLAS_WORKSPACE_CONFIG", ":4096:8"
    )  # read when cuBLAS starts: before any CUDA work
    torch.use_deterministic_algorithms(True)
    torch.backends.cudnn.benchmark = False
    torch.backends.cudnn.deterministic = True


def apply_performance(perf) -> None:
    """Process-wide switches of the `performance:` section (TF32)."""
    if torch.cuda.is_available():
        torch.backends.cuda.matmul.allow_tf32 = bool(perf.tf32)
        torch.backends.cudnn.allow_tf32 = bool(perf.tf32)


def fast_optimizer(perf, accelerator) -> dict:
    """Extra AdamW/Adam arguments: fused kernels on CUDA when asked (DeepSpeed brings its own)."""
    if perf.fused_optimizer and accelerator.device.type == "cuda" and not engine.is_deepspeed(accelerator):
        return {"fused": True}
    return {}


def prepare_module(model, perf, accelerator):
    """A model about to be trained or sampled: on the device first when its optimizer is fused (the
    fused kernels check the parameters' device when built), channels-last when asked."""
    if fast_optimizer(perf, accelerator):
        model = model.to(accelerator.device)
    if perf.channels_last and accelerator.device.type == "cuda":
        model = model.to(memory_format=torch.channels_last)
    return model


def build_accelerator(
    device: str = "auto",
    mixed_precision: str = "no",
    report_to: str | None = None,
    project_dir=None,
    run_name: str = "advdiff",
    config: dict | None = None,
):
    """An Accelerator on `device` ("auto", "cpu" or "cuda") with the given mixed precision, and
    accelerate's trackers when `report_to` is set (`resolve_report_to`: checked before anything is built;
    local logs under project_dir), started with `config` (`flat_config` of the resolved config)."""
    from accelerate import Accelerator
    from accelerate.utils import InitProcessGroupKwargs

    if device not in ("auto", "cpu", "cuda"):
        raise UserError(f'--device: expected auto, cpu or cuda, got "{device}"')
    if device == "cuda" and not torch.cuda.is_available():
        raise UserError("--device cuda: no CUDA device is visible; use --device cpu (or auto)")
    trackers = resolve_report_to(report_to)
    no_cuda = device == "cpu" or not torch.cuda.is_available()
    deepspeed = os.environ.get("ACCELERATE_USE_DEEPSPEED", "false").lower() == "true"
    # cpu=True makes accelerate silently drop DeepSpeed, so a DeepSpeed run on CPU (DS_ACCELERATOR=cpu)
    # must not ask for it; DeepSpeed then runs on its own CPU accelerator.
    cpu = (no_cuda or os.environ.get("ACCELERATE_USE_CPU") == "1") and not deepspeed
    kwargs = []
    if no_cuda and int(os.environ.get("WORLD_SIZE", "1")) > 1:
        # gloo is the only CPU backend; without naming it, DeepSpeed on CPU sees one process per rank.
        kwargs.append(InitProcessGroupKwargs(backend="gloo"))
    if deepspeed and no_cuda and os.environ.get("DS_ACCELERATOR") != "cpu":
        raise UserError("DeepSpeed without CUDA needs DS_ACCELERATOR=cpu in the environment")
    tracking = {"log_with": trackers, "project_dir": str(project_dir)} if trackers else {}
    if deepspeed:
        # Two plugins, both from the launcher's DeepSpeed config: the first is active and serves every
        # phase's one trained model; the second backs the Accelerator of a second model trained in the
        # same phase (the online discriminator, engine.prepare_second). One Accelerator holds one engine.
        from accelerate.utils import DeepSpeedPlugin

        tracking["deepspeed_plugins"] = {
            engine.MAIN_PLUGIN: DeepSpeedPlugin(),
            engine.SECOND_PLUGIN: DeepSpeedPlugin(),
        }
    accelerator = Accelerator(cpu=cpu, mixed_precision=mixed_precision, kwargs_handlers=kwargs, **tracking)
    if trackers:
        agree(accelerator, _start_trackers, accelerator, trackers, run_name, config, project_dir)
    if accelerator.is_main_process and accelerator.device.type == "cpu" and mixed_precision == "fp16":
        warn("mixed_precision fp16 has no effect on CPU: PyTorch runs these models in fp32 there")
    return accelerator


# -- experiment trackers (--report_to) ----------------------------------------------------------------
# Trackers whose pip package is not named like the tracker, and those advdiff's [tracking] extra brings.
_PIP_NAME = {"comet_ml": "comet-ml"}
_IN_EXTRA = ("tensorboard", "wandb")


def tracker_names() -> list[str]:
    """Every tracker accelerate supports (its LoggerType values but "all")."""
    from accelerate.utils import LoggerType

    return [t.value for t in LoggerType if t.value != "all"]


def installed_trackers() -> list[str]:
    """The supported trackers whose package is importable here (what accelerate's "all" starts)."""
    from accelerate.tracking import get_available_trackers

    return [getattr(t, "value", str(t)) for t in get_available_trackers()]


def resolve_report_to(value: str | None) -> list[str]:
    """--report_to: a comma list of tracker names, or `all` (accelerate's meaning: every supported tracker
    that is installed). Returns the trackers to start; an unknown name, a tracker that is not installed
    (named with what to pip install) or `all` with none installed is a UserError, before anything runs."""
    names = [n.strip() for n in (value or "").split(",") if n.strip()]
    if not names:
        if value is not None and value.strip():
            raise UserError(f'--report_to "{value}": expected a comma list of trackers')
        return []
    known = tracker_names()
    for n in names:
        if n != "all" and n not in known:
            raise UserError(
                f'--report_to: unknown tracker "{n}"; expected a comma list of {", ".join(known)}, or all'
            )
    installed = installed_trackers()
    if "all" in names:
        if not installed:
            raise UserError(
                "--report_to all: no tracker is installed (pip install 'advdiff[tracking]' "
                "brings tensorboard and wandb)"
            )
        return installed
    for n in names:
        if n not in installed:
            pip = _PIP_NAME.get(n, n)
            how = (
                f"pip install 'advdiff[tracking]' (or pip install {pip})"
                if n in _IN_EXTRA
                else f"pip install {pip}"
            )
            raise UserError(f"--report_to {n}: {n} is not installed; {how}")
    return list(dict.fromkeys(names))


def _start_trackers(
    accelerator, trackers: list[str], run_name: str, config: dict | None, project_dir
) -> None:
    """init_trackers on the main process (accelerate starts trackers there only); a tracker that fails to
    start (wandb online without a login, say) is one line on every rank (`agree`)."""
    if not accelerator.is_main_process:
        return
    init_kwargs = {}
    if "wandb" in trackers and project_dir is not None and not os.environ.get("WANDB_DIR"):
        Path(project_dir).mkdir(parents=True, exist_ok=True)  # wandb's files beside TensorBoard's
        init_kwargs["wandb"] = {"dir": str(project_dir)}
    try:
        accelerator.init_trackers(run_name, config=config, init_kwargs=init_kwargs)
    except Exception as e:  # each tracker's own failure: keep its message, drop the traceback
        first = (str(e).strip().splitlines() or [""])[0]
        raise UserError(
            f"--report_to {','.join(trackers)}: a tracker failed to start: {type(e).__name__}: {first}"
        ) from None


def flat_config(cfg) -> dict:
    """The resolved config as `section.field` (and `section.sub.field`) keys with int, float, str, bool or
    None values, lists and mappings as JSON text: what init_trackers' config takes for every tracker
    (TensorBoard's hparams accept nothing else; it skips the None values)."""
    out: dict = {}

    def walk(d: dict, prefix: str) -> None:
        for k, v in d.items():
            key = f"{prefix}{k}"
            if isinstance(v, dict) and v:
                walk(v, key + ".")
            elif v is None or isinstance(v, (bool, int, float, str)):
                out[key] = v
            else:
                out[key] = json.dumps(v, default=str, sort_keys=True)

    walk(cfg.to_dict(), "")
    return out


def stage2_phase_steps(cfg) -> tuple[int, int]:
    """(D, G): the steps of one stage-2 iteration's discriminator and fine-tune phases, from the config
    alone, as those trainers count them (epochs x steps per epoch over the train split of
    stage2.num_samples, capped by discriminator.training.max_steps / stage2.diffusion_max_steps)."""
    s2, td = cfg.stage2, cfg.discriminator.training
    n = s2.num_samples
    n_train = min(n - 1, max(1, int(round(n * td.train_split)))) if n > 1 else n
    d = td.epochs * max(1, n_train // max(1, td.batch_size // 2))
    if td.max_steps is not None:
        d = min(d, td.max_steps)
    g = s2.diffusion_epochs * max(1, n_train // cfg.training.batch_size)
    if s2.diffusion_max_steps is not None:
        g = min(g, s2.diffusion_max_steps)
    return d, g


_STAGE2_PHASE = re.compile(r"stage2_([dg])(\d+)")


def tracker_step(cfg, stage: str, step: int = 0) -> int:
    """The step every tracker logs `step` of `stage` at: one strictly increasing count across a whole run
    folder (stage 0, stage 1, then every stage-2 iteration's phases), computed from config fields alone,
    so a run resumed after a kill logs each row at the step an uninterrupted run would (wandb drops a row
    whose step is below one it already holds).

    With S0 = autoencoder.training.max_steps, S1 = training.max_steps, (D, G) = stage2_phase_steps(cfg),
    P = D + G + 3 and o_k = S0 + S1 + k * P:

        stage            step                                   logged at
        "stage0"         s = 1..S0                              s
        "stage1"         s = 1..S1                              S0 + s
        "stage2_d{k}"    s = 1..D (iteration k's D phase)       o_k + s
        "summary"        0 (the stage-1 row, measured after     o_0 + D + 1
                         iteration 0's D phase)
        "stage2_g{k}"    s = 1..G (iteration k's fine-tune)     o_k + D + 1 + s
        "samples"        k (iteration k's sample grid)          o_k + D + G + 2
        "summary"        i >= 1 (row i, after iteration i-1)    o_{i-1} + D + G + 3 = o_i

    (iterations after the first leave their copy of the stage-1 row's step unused).

    Any other stage (or no config) keeps its own step."""
    if cfg is None:
        return step
    s0, s1 = cfg.autoencoder.training.max_steps, cfg.training.max_steps
    if stage == "stage0":
        return step
    if stage == "stage1":
        return s0 + step
    phase = _STAGE2_PHASE.fullmatch(stage)
    if phase is None and stage not in ("summary", "samples"):
        return step
    d, g = stage2_phase_steps(cfg)
    period, origin = d + g + 3, s0 + s1
    if phase is not None:
        k = int(phase.group(2))
        return origin + k * period + step + (0 if phase.group(1) == "d" else d + 1)
    if stage == "samples":
        return origin + step * period + d + g + 2
    return origin + d + 1 if step == 0 else origin + step * period


def log_images(accelerator, name: str, picture, step: int) -> None:
    """A uint8 picture, (H, W) grey or (H, W, 3), to every tracker that takes images, in the form its
    accelerate tracker expects: TensorBoard a batch of one with dataformats="NHWC" (the only one that
    takes dataformats; wandb would hand it on to wandb.log, which refuses it), wandb and swanlab a list
    of arrays, aim and clearml the array; the others (mlflow, comet_ml, dvclive, trackio) log no images."""
    for tracker in accelerator.trackers:
        kind = getattr(tracker, "name", None)
        if kind == "tensorboard":
            batch = (picture if picture.ndim == 3 else picture[:, :, None])[None]
            tracker.log_images({name: batch}, step=step, dataformats="NHWC")
        elif kind in ("wandb", "swanlab"):
            tracker.log_images({name: [picture]}, step=step)
        elif kind in ("aim", "clearml"):
            tracker.log_images({name: picture}, step=step)
