"""Everything that can be checked before compute, for `advdiff validate` and for every stage-2 start.

    advdiff validate CONFIG [--stage 2|all] [stage-2 flags]  # a user's stage-2 config
    advdiff validate --demo [--out DIR]                      # the embedded default, as the demo runs it

Each problem is one line naming the field or file and what was expected. `validate` prints every
problem it finds (exit 2); a training run stops at the first one, before any compute and before
anything is written.

What is checked (stage 2): the output folder is a folder and writable; the stage-1 checkpoint and
the AE exist and load; the manifest (a CSV or a folder of images) exists, parses and has the
configured columns; class labels agree with a class-conditional model (stage2/label_checks.py); the filters
leave rows, and enough of them for --num_samples; the AE's latent
channels and size match the UNet's and the discriminator's; the discriminator's depth fits the latent
size; DDIM steps fit the schedule; the stage2.metric_features file loads and reads the AE's channels;
every image or latent file the run will read exists and decodes (sharded across processes at a
training start); latents already saved in the output folder have the right shape; and a folder that
already holds a stage-2 run was started with the same result-defining config fields. A command that
only reads a run (`advdiff evaluate`: read_only) skips the checks of the folder itself (writable, saved
latents, recorded fields): it may measure with other fields and writes nothing there.

With `--stage all` (and `--demo`), files that an earlier stage of the same pipeline writes (the AE
of stage 0, the checkpoint of stage 1) may be missing: their facts come from the config instead.
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from trainer.config.schema import error_at
from trainer.core.errors import ConfigError, UserError
from trainer.data.latents import latent_shape, load_ae_config, load_latent_file, load_latent_set
from trainer.data.manifest import read_manifest
from trainer.diffusion.checkpoints import Source, read_source
from trainer.diffusion.modelspec import unet_spec_from_config
from trainer.diffusion.schedule import Schedule
from trainer.files.layout import RunLayout
from trainer.parallel.collectives import agree
from trainer.quality.feature_spaces import check_metric_features
from trainer.stage2.generation import choose_real_rows
from trainer.stage2.label_checks import check_labels
from trainer.stage2.run_record import check_run_fields


@dataclass
class Facts:
    """What the checks learnt, reused by the run so nothing is loaded twice."""

    stage1: object = None  # Stage1Facts
    ae: dict | None = None  # the AE's config, when the run needs an AE
    rows: object = None  # filtered manifest rows (DataFrame)
    latent_shape: tuple | None = None
    problems: list[str] = field(default_factory=list)


class _Checker:
    """Runs checks in order, keeping every problem; a check whose inputs failed is skipped."""

    def __init__(self, collect: bool):
        self.collect, self.problems = collect, []

    def run(self, fn, *args, **kwargs):
        try:
            return fn(*args, **kwargs)
        except UserError as e:
            if not self.collect:
                raise
            self.problems.append(str(e))
            return None


# -- single checks ---------------------------------------------------------------------------------
def check_out_dir(out: Path, writable: bool = True) -> None:
    """The output folder is a folder (or can be made) and, unless only read, writable; nothing is created."""
    if out.exists() and not out.is_dir():
        raise UserError(f"experiment.save_path: {out} exists and is not a folder")
    if not writable:
        return
    probe = out
    while not probe.exists():
        if probe.parent == probe:
            break
        probe = probe.parent
    if probe.exists() and not probe.is_dir():
        raise UserError(f"experiment.save_path: {out} cannot be created: {probe} is a file")
    if not os.access(probe, os.W_OK | os.X_OK):
        raise UserError(f"experiment.save_path: {probe} is not writable")


def load_stage1(cfg) -> Source:
    """What stage 2 needs to know of its starting model (an advdiff export, a diffusers UNet2DModel folder or
    a diffusers pipeline folder), read without building it. A UNet folder without a scheduler beside it takes
    the config's `scheduler:` section."""
    if cfg.diffusion.stage1_checkpoint is None:
        raise ConfigError(
            f"{cfg.source or '<config>'}: diffusion.stage1_checkpoint: expected a stage-1 "
            f"checkpoint, a diffusers UNet2DModel folder or a pipeline folder, got null"
        )
    s = cfg.scheduler
    fallback = Schedule(s.type, s.num_steps, s.prediction_type).to_dict()
    return read_source(cfg.resolve_path(cfg.diffusion.stage1_checkpoint), fallback_scheduler=fallback)


def ae_path(cfg, stage1) -> Path | None:
    path = cfg.autoencoder.checkpoint or (stage1.autoencoder if stage1 is not None else None)
    return cfg.resolve_path(path) if path else None


def ae_latent_shape(cfg, ae_config: dict) -> tuple:
    return latent_shape(
        ae_config["latent_channels"],
        ae_config["block_out_channels"],
        cfg.dataset.resolution or ae_config["sample_size"],
    )


def check_ae_fits(cfg, ae_config: dict, latent_shape: tuple) -> None:
    if ae_config["latent_channels"] != latent_shape[0]:
        raise UserError(
            f"autoencoder.checkpoint: latent channels {ae_config['latent_channels']} differ from the "
            f"stage-1 UNet's {latent_shape[0]}"
        )
    shape = ae_latent_shape(cfg, ae_config)
    if shape != tuple(latent_shape):
        size = cfg.dataset.resolution or ae_config["sample_size"]
        raise UserError(
            f"dataset.resolution: images of side {size} give latents {shape}, the stage-1 UNet "
            f"expects {tuple(latent_shape)}"
        )


def check_discriminator(cfg, latent_shape: tuple) -> None:
    where = cfg.source or "<config>"
    d = cfg.discriminator.config
    if d.type != "latent":  # the feature discriminator is built on the fake score's UNet
        return
    channels, side = latent_shape[0], latent_shape[1]
    if d.latent_channels != channels:
        raise error_at(
            where,
            "discriminator.config.latent_channels",
            f"{channels} (the stage-1 UNet's latent channels)",
            d.latent_channels,
        )
    if side < 2**d.num_layers:
        raise error_at(
            where,
            "discriminator.config.num_layers",
            f"at most {int(math.log2(side))} for {side}x{side} latents",
            d.num_layers,
        )


def check_schedule(cfg, stage1) -> None:
    n = stage1.scheduler["num_train_timesteps"] if stage1 is not None else cfg.scheduler.num_steps
    if cfg.stage2.generation_steps > n:
        raise error_at(
            cfg.source or "<config>",
            "stage2.generation_steps",
            f"at most {n} (the stage-1 schedule's steps)",
            cfg.stage2.generation_steps,
        )
    ks = cfg.stage2.train_steps or []
    if ks and max(ks) > n:
        raise error_at(
            cfg.source or "<config>",
            "stage2.train_steps",
            f"step counts of at most {n} (the stage-1 schedule's steps)",
            ks,
        )


def read_rows(cfg):
    if cfg.dataset.manifest is None:
        raise ConfigError(
            f"{cfg.source or '<config>'}: dataset.manifest: expected a manifest CSV or a folder of images, "
            f"got null"
        )
    rows = read_manifest(
        cfg.resolve_path(cfg.dataset.manifest),
        cfg.dataset.image_column,
        cfg.dataset.filters,
        cfg.dataset.outputs.latent,
        label_column=cfg.dataset.label_column,
    )
    if len(rows) == 0:
        raise UserError(f"{cfg.dataset.manifest}: no rows left after dataset.filters")
    return rows


def rows_used(cfg, n_rows: int):
    """Manifest row positions the run will read, over all its iterations (raises if N does not fit)."""

    s2 = cfg.stage2
    used = [
        choose_real_rows(n_rows, s2.num_samples, cfg.training.seed, k, s2.sample_with_replacement)
        for k in range(s2.num_iterations)
    ]
    return np.unique(np.concatenate(used))


def check_inputs(rows, positions, latent_shape, channels: int) -> None:
    """Every image or latent file at these manifest positions exists and decodes."""
    for i in positions:
        lat, img = rows["latent_path"].iloc[i], rows["image_path"].iloc[i]
        if isinstance(lat, str):
            load_latent_file(lat, latent_shape)
        else:
            check_image(img, channels)


def check_image(path: str, channels: int) -> None:
    """The image decodes (grey and colour are both converted to the AE's channels when loaded)."""
    from PIL import Image, UnidentifiedImageError

    try:
        with Image.open(path) as img:
            img.load()  # decodes: a truncated or corrupt file fails here, not hours later
    except FileNotFoundError:
        raise UserError(f"{path}: image not found") from None
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError) as e:
        raise UserError(f"{path}: cannot read image ({type(e).__name__})") from None


def check_saved_latents(cfg, latent_shape) -> None:
    """Latents a previous run left in the output folder have the shape this run expects."""
    layout = RunLayout.of(cfg)
    for k in range(cfg.stage2.num_iterations):
        for path in (layout.fake_latents(k), layout.real_latents(k)):
            if path.is_file():
                load_latent_set(path, cfg.stage2.num_samples, latent_shape)


# -- the stage-2 checks ------------------------------------------------------------------------------
def needs_ae(cfg, rows) -> bool:
    return (
        cfg.stage2.grid_samples > 0
        or cfg.stage2.metric_features != "raw"
        or rows is None
        or any(not isinstance(p, str) for p in rows["latent_path"])
    )


def check_stage2(
    cfg, *, collect: bool = False, shard=None, pipeline: bool = False, read_only: bool = False
) -> Facts:
    """All stage-2 checks. collect=True keeps going and lists every problem in Facts.problems;
    otherwise the first one raises. shard=(rank, world) checks only this rank's share of the
    input files. pipeline=True accepts a missing AE / stage-1 checkpoint that stages 0/1 will write.
    read_only=True is a command that only reads the run (`advdiff evaluate`): the checks that guard the
    run's own folder for a run (writable, the recorded config fields, the saved latents) are skipped."""
    c = _Checker(collect)
    facts = Facts()
    c.run(check_out_dir, cfg.out_dir, writable=not read_only)
    stage1_file = (
        cfg.resolve_path(cfg.diffusion.stage1_checkpoint) if cfg.diffusion.stage1_checkpoint else None
    )
    if pipeline and stage1_file is not None and not stage1_file.exists():
        facts.latent_shape = c.run(pipeline_latent_shape, cfg)
        if facts.latent_shape is not None:
            c.run(pipeline_unet, cfg, facts.latent_shape)
        c.run(check_schedule, cfg, None)
    else:
        facts.stage1 = c.run(load_stage1, cfg)
        if facts.stage1 is not None:
            facts.latent_shape = facts.stage1.latent_shape
            c.run(check_schedule, cfg, facts.stage1)
    if facts.latent_shape is not None:
        c.run(check_discriminator, cfg, facts.latent_shape)
    facts.rows = None if pipeline and not _manifest_exists(cfg) else c.run(read_rows, cfg)
    if facts.stage1 is not None or (pipeline and stage1_file is not None and not stage1_file.exists()):
        c.run(check_labels, cfg, facts.stage1, facts.rows)  # the rows get their classes (label_index)
    positions = None
    if facts.rows is not None:
        positions = c.run(rows_used, cfg, len(facts.rows))
    elif pipeline:
        c.run(check_pipeline_rows, cfg)
    path = ae_path(cfg, facts.stage1)
    if needs_ae(cfg, facts.rows):
        if path is None:
            c.run(
                _raise,
                "autoencoder.checkpoint: expected an AE folder or .pt (the stage-1 checkpoint names "
                "none), got null",
            )
        elif not (pipeline and not path.exists()):
            facts.ae = c.run(load_ae_config, path)
            if facts.ae is not None and facts.latent_shape is not None:
                c.run(check_ae_fits, cfg, facts.ae, facts.latent_shape)
    c.run(check_metric_features, cfg, facts.ae, pipeline)
    if positions is not None and facts.latent_shape is not None:
        if shard is not None:
            rank, world = shard
            positions = positions[rank::world]
        channels = facts.ae["in_channels"] if facts.ae is not None else 0
        c.run(check_inputs, facts.rows, positions, facts.latent_shape, channels)
    if not read_only:
        c.run(check_run_fields, cfg, facts.stage1)
        if facts.latent_shape is not None:
            c.run(check_saved_latents, cfg, facts.latent_shape)
    facts.problems = c.problems
    return facts


def _raise(message: str):
    raise UserError(message)


def _manifest_exists(cfg) -> bool:
    return (
        cfg.dataset.manifest is not None and cfg.resolve_path(cfg.dataset.manifest).exists()
    )  # CSV or folder


def pipeline_latent_shape(cfg) -> tuple:
    """The latent shape stages 0/1 will produce: from an existing AE, else the config's AE model."""
    path = cfg.resolve_path(cfg.autoencoder.checkpoint) if cfg.autoencoder.checkpoint else None
    if path is not None and path.exists():
        return ae_latent_shape(cfg, load_ae_config(path))

    m = cfg.autoencoder.model
    return latent_shape(m.latent_channels, m.block_out_channels, cfg.dataset.resolution or m.sample_size)


def pipeline_unet(cfg, shape) -> None:
    unet_spec_from_config(cfg, shape)


def check_pipeline_rows(cfg) -> None:
    """The demo writes its manifest itself: the digits must be importable and enough of them."""
    try:
        from sklearn.datasets import load_digits
    except ImportError:
        raise UserError(
            'scikit-learn: not installed; the embedded default needs it: pip install -e ".[demo]"'
        ) from None

    s2 = cfg.stage2
    choose_real_rows(
        len(load_digits().images), s2.num_samples, cfg.training.seed, 0, s2.sample_with_replacement
    )


# -- at a training start, on every rank ----------------------------------------------------------------
def start_checks(cfg, accelerator, read_only: bool = False) -> Facts:
    """The stage-2 checks at a run's start: the same as `advdiff validate`, input files sharded. Writes
    nothing (the run records its fields with record_run_fields once every check has passed).
    read_only: for a command that only reads the run (check_stage2)."""
    return agree(
        accelerator,
        check_stage2,
        cfg,
        shard=(accelerator.process_index, accelerator.num_processes),
        read_only=read_only,
    )
