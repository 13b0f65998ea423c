"""The record of a stage-2 folder's result-defining config fields (`stage2_run.json`): written when the
folder's run starts, compared at every later start, so a resume never mixes two configs' results."""

from __future__ import annotations

import json

from trainer.config.sections import Config
from trainer.core.errors import UserError
from trainer.diffusion.schedule import NEW_MODEL_SPACING, effective_spacing
from trainer.files import atomic
from trainer.files.layout import RunLayout

RUN_FORMAT = "advdiff.stage2-run"
SPACING = "scheduler.timestep_spacing"  # recorded as the spacing in effect, never null

# Config fields that may change between the runs of one stage-2 folder: they change neither the data,
# the models nor the maths (batching of inference, logging, where things go, how many iterations).
RESUME_FREE = (
    "experiment.",
    "stage2.num_iterations",
    "stage2.generation_batch_size",
    "stage2.grid_samples",
    "autoencoder.encode_batch_size",
    "autoencoder.training.",
    "autoencoder.model.",
    "training.num_workers",
    "training.deterministic",
    "training.log_interval",
    "training.mixed_precision",
    "training.use_amp",
    "training.max_steps",
    "training.eval_interval",
    "training.sample_steps",
    "training.train_split",
    "training.split_seed",
    "unet.",
    "scheduler.",  # the stage-1 model's; the timestep spacing the run samples with is recorded as SPACING
    "performance.",
    "training.max_nonfinite_steps",
)  # a tolerance: raising it to resume a stopped run must work


def _flatten(d, prefix=""):
    for k, v in d.items():
        path = f"{prefix}{k}"
        if isinstance(v, dict) and v and k != "filters":
            yield from _flatten(v, path + ".")
        else:
            yield path, v


def run_fields(cfg, stage1) -> dict:
    """Dotted config path -> value for every field that defines a stage-2 run's results."""
    fields = {p: v for p, v in _flatten(cfg.to_dict()) if not p.startswith(RESUME_FREE)}
    for key in ("diffusion.stage1_checkpoint", "autoencoder.checkpoint", "dataset.manifest"):
        if fields.get(key):
            fields[key] = str(cfg.resolve_path(fields[key]).resolve())
    if stage1 is not None and not cfg.autoencoder.checkpoint and stage1.autoencoder:
        fields["autoencoder.checkpoint"] = str(cfg.resolve_path(stage1.autoencoder).resolve())
    fields[SPACING] = run_spacing(cfg, stage1)
    return json.loads(json.dumps(fields, default=str))


def run_spacing(cfg, stage1) -> str:
    """The DDIM timestep spacing the run samples with: scheduler.timestep_spacing, else the starting model's
    own (stage1 None: stage 1 of the same pipeline has yet to write it, and a new model stores trailing)."""
    if stage1 is None:
        return cfg.scheduler.timestep_spacing or NEW_MODEL_SPACING
    return effective_spacing(stage1.scheduler, cfg.scheduler.timestep_spacing)


def check_run_fields(cfg, stage1) -> dict:
    """Refuse a folder whose stage-2 run was started with different result-defining fields."""
    path = RunLayout.of(cfg).run_record
    now = run_fields(cfg, stage1)
    if not path.is_file():
        return now
    try:
        before = json.loads(path.read_text())["fields"]
    except Exception as e:
        raise UserError(
            f"{path}: unreadable ({type(e).__name__}); it records the config this folder's run started with"
        ) from None
    # a field added to advdiff after this folder's run started is unchanged while it keeps its default;
    # a run recorded before the spacing was recorded sampled with its starting model's own
    defaults = json.loads(json.dumps(dict(_flatten(Config().to_dict())), default=str))
    defaults[SPACING] = effective_spacing(stage1.scheduler, None) if stage1 is not None else NEW_MODEL_SPACING
    changed = [
        f"{k}: {_short(before.get(k))} -> {_short(now.get(k))}"
        for k in sorted(set(before) | set(now))
        if before.get(k, defaults.get(k)) != now.get(k)
    ]
    if changed:
        raise UserError(
            f"{cfg.out_dir}: this folder's stage-2 run was started with a different config "
            f"({'; '.join(changed)}); use a new experiment.save_path, or restore those fields"
        )
    return now


def _short(v) -> str:
    s = json.dumps(v)
    return s if len(s) <= 40 else s[:37] + "..."


def record_run_fields(cfg, fields: dict) -> None:
    """Write the record once, when a folder's stage-2 run starts (main process; every check passed)."""
    path = RunLayout.of(cfg).run_record
    if not path.is_file():
        atomic.write_text(
            json.dumps({"format": RUN_FORMAT, "fields": fields}, indent=1, sort_keys=True) + "\n", path
        )
