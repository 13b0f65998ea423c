"""Everything that can be checked before compute, for `advdiff validate` and for every stage-2 start.

    advdiff validate CONFIG [--stage 2|all] [stage-2 flags]   # a user's stage-2 config
    advdiff validate --demo [--out DIR]                       # the embedded default, as `advdiff demo` runs it

Each problem is one line naming the field or file and what was expected. `validate` prints every
problem it finds (exit 2); a training run stops at the first one, before any compute and before
anything is written.

What is checked (stage 2): the output folder is a folder and writable; the stage-1 checkpoint and
the AE exist and load; the manifest exists, parses and has the configured columns; the filters leave
rows, and enough of them for --num_samples; the AE's latent channels and size match the UNet's and
the discriminator's; the discriminator's depth fits the latent size; DDIM steps fit the schedule;
every image or latent file the run will read exists and decodes (sharded across processes at a
training start); latents already saved in the output folder have the right shape; and a folder that
already holds a stage-2 run was started with the same result-defining config fields.

With `--stage all` (and `--demo`), files that an earlier stage of the same pipeline writes (the AE
of stage 0, the checkpoint of stage 1) may be missing: their facts come from the config instead.
"""
from __future__ import annotations

import argparse
import json
import math
import os
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

from .errors import UserError

RUN_FILE = "stage2_run.json"
RUN_FORMAT = "advdiff.stage2-run"

# Config fields that may change between the runs of one stage-2 folder: they change neither the data,
# the models nor the maths (batching of inference, logging, where things go, how many iterations).
RESUME_FREE = ("experiment.", "stage2.num_iterations", "stage2.generation_batch_size", "stage2.grid_samples",
               "autoencoder.encode_batch_size", "autoencoder.training.", "autoencoder.model.",
               "training.num_workers", "training.deterministic", "training.log_interval",
               "training.mixed_precision", "training.use_amp", "training.max_steps", "training.eval_interval",
               "training.sample_steps", "training.train_split", "training.split_seed", "unet.", "scheduler.", "performance.",
               "training.max_nonfinite_steps")  # a tolerance: raising it to resume a stopped run must work


@dataclass
class Facts:
    """What the checks learnt, reused by the run so nothing is loaded twice."""
    stage1: object = None          # Stage1Facts
    ae: dict | None = None         # the AE's config, when the run needs an AE
    rows: object = None            # filtered manifest rows (DataFrame)
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
def check_out_dir(out: Path) -> None:
    """The output folder is a folder (or can be made) and writable; nothing is created."""
    if out.exists() and not out.is_dir():
        raise UserError(f"experiment.save_path: {out} exists and is not a folder")
    probe = out
    while not probe.exists():
        if probe.parent == probe:
            break
        probe = probe.parent
    if probe.exists() and not probe.is_dir():
        raise UserError(f"experiment.save_path: {out} cannot be created: {probe} is a file")
    if not os.access(probe, os.W_OK | os.X_OK):
        raise UserError(f"experiment.save_path: {probe} is not writable")


@dataclass
class Stage1Facts:
    """What stage 2 needs to know of a stage-1 checkpoint, read without building the model."""
    path: Path
    spec: dict
    scheduler: dict
    autoencoder: str | None


def load_stage1(cfg) -> Stage1Facts:
    from .errors import ConfigError
    from .checkpoints import CKPT_FORMAT

    if cfg.diffusion.stage1_checkpoint is None:
        raise ConfigError(f"{cfg.source or '<config>'}: diffusion.stage1_checkpoint: expected a stage-1 "
                          f"checkpoint path, got null")
    path = cfg.resolve_path(cfg.diffusion.stage1_checkpoint)
    if not path.is_file():
        raise UserError(f"{path}: checkpoint not found")
    blob = torch_load(path, "checkpoint")
    if not isinstance(blob, dict) or blob.get("format") != CKPT_FORMAT:
        raise UserError(f"{path}: not an advdiff diffusion checkpoint (format {CKPT_FORMAT})")
    missing = [k for k in ("unet_spec", "scheduler", "state_dict", "latent_scaling") if k not in blob]
    if missing:
        raise UserError(f"{path}: incomplete checkpoint (no {', '.join(missing)})")
    return Stage1Facts(path=path, spec=blob["unet_spec"], scheduler=blob["scheduler"],
                       autoencoder=blob.get("autoencoder"))


def torch_load(path: Path, what: str):
    """torch.load, memory-mapped (nothing read that is not needed); a truncated or foreign file is one line."""
    import zipfile

    import torch

    if not zipfile.is_zipfile(path):
        raise UserError(f"{path}: unreadable {what} (truncated, or not written by torch.save)")
    try:
        return torch.load(path, map_location="cpu", weights_only=True, mmap=True)
    except Exception as e:
        raise UserError(f"{path}: unreadable {what} ({type(e).__name__})") from None


def ae_path(cfg, stage1) -> Path | None:
    path = cfg.autoencoder.checkpoint or (stage1.autoencoder if stage1 is not None else None)
    return cfg.resolve_path(path) if path else None


def load_ae_config(path: Path) -> dict:
    """The AE's config, read from its folder (config.json + weights) or its .pt, without diffusers."""
    from models.autoencoder import AE_FORMAT

    where = "autoencoder.checkpoint"
    if path.is_dir():
        cfg_file = path / "config.json"
        if not cfg_file.is_file():
            raise UserError(f"{where}: {path}: not a diffusers AutoencoderKL folder (no config.json)")
        try:
            config = json.loads(cfg_file.read_text())
        except (ValueError, UnicodeDecodeError) as e:
            raise UserError(f"{where}: {cfg_file}: not valid JSON ({type(e).__name__})") from None
        weights = [path / n for n in ("diffusion_pytorch_model.safetensors", "diffusion_pytorch_model.bin")]
        weights = [w for w in weights if w.is_file()]
        if not weights:
            raise UserError(f"{where}: {path}: no weights (diffusion_pytorch_model.safetensors or .bin)")
        try:
            if weights[0].suffix == ".safetensors":
                from safetensors import safe_open

                with safe_open(str(weights[0]), framework="pt") as f:
                    list(f.keys())
            else:
                torch_load(weights[0], "AE weights")
        except UserError as e:
            raise UserError(f"{where}: {e}") from None
        except Exception as e:
            raise UserError(f"{where}: {weights[0]}: unreadable weights ({type(e).__name__})") from None
    elif path.is_file():
        try:
            blob = torch_load(path, "checkpoint")
        except UserError as e:
            raise UserError(f"{where}: {e}") from None
        if not isinstance(blob, dict) or blob.get("format") != AE_FORMAT:
            raise UserError(f"{where}: {path}: not an advdiff autoencoder checkpoint (format {AE_FORMAT})")
        config = blob.get("config")
    else:
        raise UserError(f"{where}: {path}: autoencoder not found")
    needed = ("latent_channels", "block_out_channels", "sample_size", "in_channels")
    if not isinstance(config, dict) or any(k not in config for k in needed):
        raise UserError(f"{where}: {path}: its config lacks {', '.join(needed)}")
    return config


def ae_latent_shape(cfg, ae_config: dict) -> tuple:
    f = 2 ** (len(ae_config["block_out_channels"]) - 1)
    size = cfg.dataset.resolution or ae_config["sample_size"]
    if size % f:
        raise UserError(f"dataset.resolution: {size} is not divisible by the AE's downsampling factor {f}")
    return (ae_config["latent_channels"], size // f, size // f)


def check_ae_fits(cfg, ae_config: dict, latent_shape: tuple) -> None:
    if ae_config["latent_channels"] != latent_shape[0]:
        raise UserError(f"autoencoder.checkpoint: latent channels {ae_config['latent_channels']} differ from the "
                        f"stage-1 UNet's {latent_shape[0]}")
    shape = ae_latent_shape(cfg, ae_config)
    if shape != tuple(latent_shape):
        size = cfg.dataset.resolution or ae_config["sample_size"]
        raise UserError(f"dataset.resolution: images of side {size} give latents {shape}, the stage-1 UNet "
                        f"expects {tuple(latent_shape)}")


def check_discriminator(cfg, latent_shape: tuple) -> None:
    from .schema import error_at

    where = cfg.source or "<config>"
    d = cfg.discriminator.config
    channels, side = latent_shape[0], latent_shape[1]
    if d.latent_channels != channels:
        raise error_at(where, "discriminator.config.latent_channels",
                       f"{channels} (the stage-1 UNet's latent channels)", d.latent_channels)
    if side < 2 ** d.num_layers:
        raise error_at(where, "discriminator.config.num_layers",
                       f"at most {int(math.log2(side))} for {side}x{side} latents", d.num_layers)


def check_schedule(cfg, stage1) -> None:
    from .schema import error_at

    n = stage1.scheduler["num_steps"] if stage1 is not None else cfg.scheduler.num_steps
    if cfg.stage2.generation_steps > n:
        raise error_at(cfg.source or "<config>", "stage2.generation_steps",
                       f"at most {n} (the stage-1 schedule's steps)", cfg.stage2.generation_steps)


def read_rows(cfg):
    from .data import read_manifest
    from .errors import ConfigError

    if cfg.dataset.manifest is None:
        raise ConfigError(f"{cfg.source or '<config>'}: dataset.manifest: expected a manifest CSV path, got null")
    rows = read_manifest(cfg.resolve_path(cfg.dataset.manifest), cfg.dataset.image_column, cfg.dataset.filters,
                         cfg.dataset.outputs.latent)
    if len(rows) == 0:
        raise UserError(f"{cfg.dataset.manifest}: no rows left after dataset.filters")
    return rows


def rows_used(cfg, n_rows: int):
    """Manifest row positions the run will read, over all its iterations (raises if N does not fit)."""
    import numpy as np

    from .shards import choose_real_rows

    s2 = cfg.stage2
    used = [choose_real_rows(n_rows, s2.num_samples, cfg.training.seed, k, s2.sample_with_replacement)
            for k in range(s2.num_iterations)]
    return np.unique(np.concatenate(used))


def check_inputs(rows, positions, latent_shape, channels: int) -> None:
    """Every image or latent file at these manifest positions exists and decodes."""
    from .latents import load_latent_file

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
    import torch

    n = cfg.stage2.num_samples
    for k in range(cfg.stage2.num_iterations):
        for name in ("fake_latents.pt", "real_latents.pt"):
            path = cfg.out_dir / f"discriminator_iter_{k}" / name
            if not path.is_file():
                continue
            try:
                t = torch_load(path, "latents")
            except UserError as e:
                raise UserError(f"{e}; delete it to regenerate") from None
            got = tuple(t.shape) if isinstance(t, torch.Tensor) else type(t).__name__
            if got != (n, *latent_shape):
                raise UserError(f"{path}: latents of shape {got}, expected {(n, *latent_shape)}; delete it to "
                                f"regenerate")


# -- the run's result-defining fields ----------------------------------------------------------------
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
    return json.loads(json.dumps(fields, default=str))


def check_run_fields(cfg, stage1) -> dict:
    """Refuse a folder whose stage-2 run was started with different result-defining fields."""
    path = cfg.out_dir / RUN_FILE
    now = run_fields(cfg, stage1)
    if not path.is_file():
        return now
    try:
        before = json.loads(path.read_text())["fields"]
    except Exception as e:
        raise UserError(f"{path}: unreadable ({type(e).__name__}); it records the config this folder's run "
                        f"started with") from None
    changed = [f"{k}: {_short(before.get(k))} -> {_short(now.get(k))}"
               for k in sorted(set(before) | set(now)) if before.get(k) != now.get(k)]
    if changed:
        raise UserError(f"{cfg.out_dir}: this folder's stage-2 run was started with a different config "
                        f"({'; '.join(changed)}); use a new experiment.save_path, or restore those fields")
    return now


def _short(v) -> str:
    s = json.dumps(v)
    return s if len(s) <= 40 else s[:37] + "..."


def record_run_fields(cfg, fields: dict) -> None:
    from . import io

    path = cfg.out_dir / RUN_FILE
    if not path.is_file():
        io.write_text(json.dumps({"format": RUN_FORMAT, "fields": fields}, indent=1, sort_keys=True) + "\n", path)


# -- the stage-2 checks ------------------------------------------------------------------------------
def needs_ae(cfg, rows) -> bool:
    return cfg.stage2.grid_samples > 0 or rows is None or any(not isinstance(p, str) for p in rows["latent_path"])


def check_stage2(cfg, *, collect: bool = False, shard=None, pipeline: bool = False) -> Facts:
    """All stage-2 checks. collect=True keeps going and lists every problem in Facts.problems;
    otherwise the first one raises. shard=(rank, world) checks only this rank's share of the
    input files. pipeline=True accepts a missing AE / stage-1 checkpoint that stages 0/1 will write."""
    c = _Checker(collect)
    facts = Facts()
    c.run(check_out_dir, cfg.out_dir)
    stage1_file = cfg.resolve_path(cfg.diffusion.stage1_checkpoint) if cfg.diffusion.stage1_checkpoint else None
    if pipeline and stage1_file is not None and not stage1_file.exists():
        facts.latent_shape = c.run(pipeline_latent_shape, cfg)
        if facts.latent_shape is not None:
            c.run(pipeline_unet, cfg, facts.latent_shape)
        c.run(check_schedule, cfg, None)
    else:
        facts.stage1 = c.run(load_stage1, cfg)
        if facts.stage1 is not None:
            spec = facts.stage1.spec
            facts.latent_shape = (spec["in_channels"], spec["sample_size"], spec["sample_size"])
            c.run(check_schedule, cfg, facts.stage1)
    if facts.latent_shape is not None:
        c.run(check_discriminator, cfg, facts.latent_shape)
    facts.rows = None if pipeline and not _manifest_exists(cfg) else c.run(read_rows, cfg)
    positions = None
    if facts.rows is not None:
        positions = c.run(rows_used, cfg, len(facts.rows))
    elif pipeline:
        c.run(check_pipeline_rows, cfg)
    path = ae_path(cfg, facts.stage1)
    if needs_ae(cfg, facts.rows):
        if path is None:
            c.run(_raise, "autoencoder.checkpoint: expected an AE folder or .pt (the stage-1 checkpoint names "
                          "none), got null")
        elif not (pipeline and not path.exists()):
            facts.ae = c.run(load_ae_config, path)
            if facts.ae is not None and facts.latent_shape is not None:
                c.run(check_ae_fits, cfg, facts.ae, facts.latent_shape)
    if positions is not None and facts.latent_shape is not None:
        if shard is not None:
            rank, world = shard
            positions = positions[rank::world]
        channels = facts.ae["in_channels"] if facts.ae is not None else 0
        c.run(check_inputs, facts.rows, positions, facts.latent_shape, channels)
    c.run(check_run_fields, cfg, facts.stage1)
    if facts.latent_shape is not None:
        c.run(check_saved_latents, cfg, facts.latent_shape)
    facts.problems = c.problems
    return facts


def _raise(message: str):
    raise UserError(message)


def _manifest_exists(cfg) -> bool:
    return cfg.dataset.manifest is not None and cfg.resolve_path(cfg.dataset.manifest).is_file()


def pipeline_latent_shape(cfg) -> tuple:
    """The latent shape stages 0/1 will produce: from an existing AE, else the config's AE model."""
    path = cfg.resolve_path(cfg.autoencoder.checkpoint) if cfg.autoencoder.checkpoint else None
    if path is not None and path.exists():
        return ae_latent_shape(cfg, load_ae_config(path))
    m = cfg.autoencoder.model
    f = 2 ** (len(m.block_out_channels) - 1)
    size = cfg.dataset.resolution or m.sample_size
    if size % f:
        raise UserError(f"dataset.resolution: {size} is not divisible by the AE's downsampling factor {f}")
    return (m.latent_channels, size // f, size // f)


def pipeline_unet(cfg, latent_shape) -> None:
    from .modelspec import unet_spec_from_config

    unet_spec_from_config(cfg, latent_shape)


def check_pipeline_rows(cfg) -> None:
    """The demo writes its manifest itself: the digits must be importable and enough of them."""
    try:
        from sklearn.datasets import load_digits
    except ImportError:
        raise UserError("scikit-learn: not installed; the embedded default needs it: "
                        "pip install -e \".[demo]\"") from None
    from .shards import choose_real_rows

    s2 = cfg.stage2
    choose_real_rows(len(load_digits().images), s2.num_samples, cfg.training.seed, 0, s2.sample_with_replacement)


# -- at a training start, on every rank --------------------------------------------------------------
def agree(acc, fn, *args, **kwargs):
    """Run fn on every rank; if it raises a UserError on any rank, raise the first rank's message on
    all of them (a problem seen by one rank must not leave the others waiting in a collective)."""
    message, result = None, None
    try:
        result = fn(*args, **kwargs)
    except UserError as e:
        message = str(e)
    if acc.num_processes > 1:
        import torch.distributed as dist

        messages = [None] * acc.num_processes
        dist.all_gather_object(messages, message)
        message = next((m for m in messages if m is not None), None)
    if message is not None:
        raise UserError(message)
    return result


def start_checks(cfg, acc) -> Facts:
    """The stage-2 checks at a run's start: the same as `advdiff validate`, input files sharded. Writes
    nothing (the run records its fields with record_run_fields once every check has passed)."""
    return agree(acc, check_stage2, cfg, shard=(acc.process_index, acc.num_processes))


# -- the command -------------------------------------------------------------------------------------
def build_parser() -> argparse.ArgumentParser:
    from .flags import FLAGS

    p = argparse.ArgumentParser(prog="advdiff validate",
                                description="Check a stage-2 config, its files and flags before any compute.")
    p.add_argument("config", nargs="?", help="experiment YAML (omit with --demo)")
    p.add_argument("--seed", type=int, default=None, help="overrides training.seed")
    p.add_argument("--mixed_precision", "--mixed-precision", default=None, choices=("no", "fp16", "bf16"))
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="PATH=VALUE",
                   help="override any config field (repeatable)")
    p.add_argument("--dry-run", "--dry_run", action="store_true", help="print the resolved config and exit")
    p.add_argument("--stage", default="2", choices=("2", "all"),
                   help="2: every stage-2 input must exist (default); all: stages 0 and 1 of the same "
                        "pipeline may still have to write the AE and the stage-1 checkpoint")
    p.add_argument("--demo", action="store_true", help="validate the embedded default as `advdiff demo` runs it")
    p.add_argument("--out", default="runs/digits", help="with --demo: the demo's output folder")
    for flag, (_, typ, help_) in FLAGS.items():
        p.add_argument(f"--{flag}", type=typ, default=None, help=help_)
    return p


def main(argv=None) -> int:
    from .cli_common import load_from_args
    from .flags import FLAGS

    args = build_parser().parse_args(argv)
    t0 = time.time()
    try:
        if args.demo:
            from .config import load_config, parse_override
            from .demo import TEMPLATE

            out = Path(args.out)
            if out.exists() and not out.is_dir():
                raise UserError(f"--out {out}: exists and is not a folder")
            overrides = dict(parse_override(o) for o in args.overrides)
            overrides.update({path: getattr(args, flag) for flag, (path, _, _) in FLAGS.items()
                              if getattr(args, flag) is not None})
            existing = out / "config.yaml"
            cfg = load_config(existing if existing.is_file() else TEMPLATE, overrides)
            cfg.source = str(existing.resolve())  # relative paths resolve inside the demo's folder
            pipeline, name = True, f"the embedded default (under {out})"
        else:
            if args.config is None:
                raise UserError("validate: expected a CONFIG path, or --demo")
            extra = {path: getattr(args, flag) for flag, (path, _, _) in FLAGS.items()
                     if getattr(args, flag) is not None}
            cfg = load_from_args(args, extra)
            if args.dry_run:
                return 0
            pipeline, name = args.stage == "all", args.config
        facts = check_stage2(cfg, collect=True, pipeline=pipeline)
    except UserError as e:
        print(f"advdiff: error: {e}", file=sys.stderr)
        return e.exit_code
    for line in facts.problems:
        print(f"advdiff: error: {line}", file=sys.stderr)
    if facts.problems:
        print(f"advdiff validate: {len(facts.problems)} problem(s) in {name}", file=sys.stderr)
        return 2
    rows = "" if facts.rows is None else f", {len(facts.rows)} manifest rows"
    print(f"advdiff validate: {name} is ready for stage 2 (latents {facts.latent_shape}{rows}; "
          f"checked in {time.time() - t0:.1f} s)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
