"""The diffusion models stage 1 and stage 2 start from and export: advdiff's self-describing `.pt`, a
diffusers `UNet2DModel` folder, or a diffusers pipeline folder (`model_index.json`, `unet/`, `scheduler/`,
optionally `vae/`) - reading them, and writing the `.pt` exports.

An export stores the UNet as its full diffusers config (`unet_config`; exports written before that carry a
preset-shaped `unet_spec`, which still loads), the noise schedule as its full scheduler config, the latent
scale and shift, and the frozen autoencoder as a path relative to the export's own folder (so a run folder
can move). The folder forms are read by `read_source` without building anything (the checks before compute)
and by `load_diffusion_checkpoint`.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from pathlib import Path

import torch

from models.autoencoder import LatentScaling, scaling_from_config
from models.unet import full_unet_config, spec_from_dict, unet_config, unet_from_config, unet_sample_shape
from trainer.core.errors import UserError
from trainer.diffusion.conditioning import Conditioning
from trainer.diffusion.schedule import Schedule
from trainer.files.read import torch_load

CKPT_FORMAT = "advdiff.diffusion"  # stage-1 and stage-2 diffusion exports
WEIGHT_FILES = ("diffusion_pytorch_model.safetensors", "diffusion_pytorch_model.bin")


@dataclass
class Source:
    """What a diffusion model source holds, read without building the UNet or loading weights."""

    path: Path
    kind: str  # "advdiff" (.pt export), "unet" (UNet2DModel folder), "pipeline" (pipeline root)
    unet_config: dict  # full diffusers UNet2DModel config
    scheduler: dict | None  # full scheduler config; None: a UNet folder with no scheduler beside it
    scaling: LatentScaling | None  # None: take it from the autoencoder's config
    autoencoder: str | None  # an absolute path, or None
    step: int = 0
    metrics: dict = field(default_factory=dict)
    sampling: dict | None = None
    blob: dict | None = None  # the .pt's contents (advdiff exports only)
    conditioning: Conditioning | None = None  # a class-conditional model's classes; None: unconditional

    @property
    def latent_shape(self) -> tuple[int, int, int]:
        return unet_sample_shape(self.unet_config)


@dataclass
class DiffusionCheckpoint:
    path: Path
    kind: str
    unet_config: dict
    unet: torch.nn.Module  # built and loaded with `weights`, in eval mode
    weights: dict  # the weights the model samples with (EMA where there is one)
    raw_weights: dict | None  # the raw (non-EMA) weights, where stored
    scheduler: dict
    scaling: LatentScaling
    autoencoder: str | None
    step: int
    metrics: dict
    sampling: dict | None
    blob: dict
    conditioning: Conditioning | None = None  # a class-conditional model's classes; None: unconditional

    @property
    def latent_shape(self) -> tuple[int, int, int]:
        return unet_sample_shape(self.unet_config)

    def new_unet(self, weights: dict | None = None) -> torch.nn.Module:
        """A new UNet of this checkpoint's architecture, with `weights` (default: its own) loaded."""
        unet = unet_from_config(self.unet_config)
        unet.load_state_dict(self.weights if weights is None else weights)
        return unet


def _bad(path, what: str) -> UserError:
    return UserError(f"{path}: {what}")


def _read_json(path: Path) -> dict:
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError, UnicodeDecodeError) as e:
        raise _bad(path, f"not valid JSON ({type(e).__name__})") from None
    if not isinstance(data, dict):
        raise _bad(path, "expected a JSON object")
    return data


def _unet_config(path: Path, config: dict) -> dict:
    try:
        return full_unet_config(config)
    except ValueError as e:
        raise _bad(path, f"{e}") from None


def _has_weights(folder: Path) -> bool:
    return any((folder / n).is_file() for n in WEIGHT_FILES)


def read_source(path, fallback_scheduler: dict | None = None) -> Source:
    """Read what a model source holds (one line naming the file on any problem). `fallback_scheduler` (a
    scheduler config) serves a UNet folder that has no `scheduler/` beside it."""
    path = Path(path)
    if path.is_dir():
        return _read_folder(path, fallback_scheduler)
    if not path.is_file():
        raise UserError(f"{path}: checkpoint not found")
    blob = torch_load(path, "checkpoint")
    if not isinstance(blob, dict) or blob.get("format") != CKPT_FORMAT:
        raise UserError(
            f"{path}: not an advdiff diffusion checkpoint (format {CKPT_FORMAT}), a diffusers "
            f"UNet2DModel folder or a diffusers pipeline folder"
        )
    missing = [k for k in ("scheduler", "state_dict", "latent_scaling") if k not in blob]
    if "unet_config" not in blob and "unet_spec" not in blob:
        missing.insert(0, "unet_config")
    if missing:
        raise UserError(f"{path}: incomplete checkpoint (no {', '.join(missing)})")
    config = blob["unet_config"] if "unet_config" in blob else unet_config(spec_from_dict(blob["unet_spec"]))
    ae = blob.get("autoencoder")
    ae = None if ae in (None, "", "None") else ae if os.path.isabs(ae) else os.path.normpath(path.parent / ae)
    config = _unet_config(path, config)
    return Source(
        path=path,
        kind="advdiff",
        unet_config=config,
        scheduler=Schedule.from_dict(blob["scheduler"]).to_dict(),
        scaling=LatentScaling(**blob["latent_scaling"]),
        autoencoder=ae,
        step=int(blob.get("step", 0)),
        metrics=blob.get("metrics", {}),
        sampling=blob.get("sampling"),
        blob=blob,
        conditioning=Conditioning.of_unet_config(config, blob.get("conditioning")),
    )


def _read_folder(path: Path, fallback_scheduler: dict | None) -> Source:
    index, unet_dir, sched_dir, vae_dir, kind = _folder_layout(path)
    config = _read_json(unet_dir / "config.json")
    if not _has_weights(unet_dir):
        raise _bad(unet_dir, f"no weights ({' or '.join(WEIGHT_FILES)})")
    scheduler = _folder_scheduler(path, sched_dir, fallback_scheduler)
    scaling = ae = None
    if vae_dir is not None and (vae_dir / "config.json").is_file():
        scaling, ae = scaling_from_config(_read_json(vae_dir / "config.json")), str(vae_dir.resolve())
    sampling = None
    if kind == "pipeline" and "sampling_steps" in index:
        sampling = {
            "sampler": "ddim",
            "steps": int(index["sampling_steps"]),
            "eta": float(index.get("sampling_eta", 0.0)),
        }
    config = _unet_config(unet_dir / "config.json", config)
    conditioning = Conditioning.of_unet_config(config)  # a UNet with M class embeddings: M classes, no null
    record = index.get("conditioning") if kind == "pipeline" else None
    if record is not None:  # an advdiff export's class record (models/pipeline.py)
        conditioning = _recorded_conditioning(path / "model_index.json", record, config)
    return Source(
        path=path,
        kind=kind,
        unet_config=config,
        scheduler=scheduler,
        scaling=scaling,
        autoencoder=ae,
        sampling=sampling,
        conditioning=conditioning,
    )


def _folder_layout(path: Path):
    """(model_index.json's contents or None, unet/, scheduler/, vae/ or None, kind) of a pipeline folder
    or of a UNet folder (its scheduler/ beside it)."""
    if (path / "model_index.json").is_file():
        index = _read_json(path / "model_index.json")
        unet_dir, sched_dir, vae_dir = path / "unet", path / "scheduler", path / "vae"
        if "unet" not in index or not (unet_dir / "config.json").is_file():
            raise _bad(
                path,
                "a pipeline folder without a unet/ (config.json): advdiff fine-tunes a UNet2DModel",
            )
        return index, unet_dir, sched_dir, vae_dir, "pipeline"
    if (path / "config.json").is_file():
        return None, path, path.parent / "scheduler", None, "unet"
    raise _bad(path, "not a diffusers UNet2DModel folder (config.json) or pipeline folder (model_index.json)")


def _folder_scheduler(path: Path, sched_dir: Path, fallback_scheduler: dict | None) -> dict:
    """The full scheduler config of `sched_dir` (else `fallback_scheduler`), checked by building it."""
    sched_file = sched_dir / "scheduler_config.json"
    if sched_file.is_file():
        scheduler = _read_json(sched_file)
    elif fallback_scheduler is not None:
        scheduler = fallback_scheduler
    else:
        raise _bad(path, f"no scheduler ({sched_file} not found)")
    try:
        return Schedule(config=scheduler).to_dict()
    except Exception as e:  # diffusers raises several types for configs it cannot build
        raise _bad(
            sched_file if sched_file.is_file() else path,
            f"not a DDPM/DDIM-compatible scheduler config ({str(e).splitlines()[0][:80]})",
        ) from None


def _recorded_conditioning(where: Path, record, config: dict) -> Conditioning:
    """The classes model_index.json `conditioning` records, checked against the UNet's class embeddings."""
    embeds = config.get("num_class_embeds") or 0
    try:
        names = record["class_names"]
        conditioning = Conditioning.from_dict(record) if isinstance(names, list) else None
    except (KeyError, TypeError, ValueError, AttributeError):
        conditioning = None
    if conditioning is None or len(conditioning.class_names) != conditioning.num_classes:
        raise _bad(
            where, "conditioning: expected {num_classes, class_names (a list of that many), null_class}"
        )
    if conditioning.null_class not in (None, conditioning.num_classes):
        raise _bad(
            where, f"conditioning: null_class must be num_classes ({conditioning.num_classes}) or null"
        )
    if conditioning.num_class_embeds != embeds:
        raise _bad(
            where,
            f"conditioning: {conditioning.num_classes} classes"
            f"{' and a null label' if conditioning.null_class is not None else ''} need num_class_embeds "
            f"{conditioning.num_class_embeds}, unet/config.json has {embeds}",
        )
    return conditioning


def _folder_weights(unet_dir: Path) -> dict:
    st = unet_dir / WEIGHT_FILES[0]
    try:
        if st.is_file():
            from safetensors.torch import load_file

            return load_file(str(st))
        return torch.load(unet_dir / WEIGHT_FILES[1], map_location="cpu", weights_only=True)
    except Exception as e:
        raise _bad(
            unet_dir, f"unreadable weights ({type(e).__name__}: {str(e).splitlines()[0][:80]})"
        ) from None


def load_diffusion_checkpoint(
    path, use_ema: bool = True, fallback_scheduler: dict | None = None, scaling: LatentScaling | None = None
) -> DiffusionCheckpoint:
    """Load a diffusion model from any source `read_source` reads; errors are one line naming the file.
    `scaling` serves sources that do not carry one (a UNet folder: the autoencoder's config gives it)."""
    src = read_source(path, fallback_scheduler)
    if src.kind == "advdiff":
        blob = src.blob
        raw = blob.get("raw_state_dict")
        weights = blob["state_dict"] if use_ema or raw is None else raw
    else:
        blob, raw = {}, None
        weights = _folder_weights(src.path / "unet" if src.kind == "pipeline" else src.path)
    unet = unet_from_config(src.unet_config)
    try:
        unet.load_state_dict(weights)
    except RuntimeError as e:
        raise UserError(
            f"{src.path}: weights do not match the UNet config ({str(e).splitlines()[0][:80]})"
        ) from None
    return DiffusionCheckpoint(
        path=src.path,
        kind=src.kind,
        unet_config=src.unet_config,
        unet=unet.eval(),
        weights=weights,
        raw_weights=raw,
        scheduler=src.scheduler,
        scaling=src.scaling or scaling or LatentScaling(),
        autoencoder=src.autoencoder,
        step=src.step,
        metrics=src.metrics,
        sampling=src.sampling,
        blob=blob,
        conditioning=src.conditioning,
    )


def relative_path(target, start_dir) -> str | None:
    """`target` as a path relative to the folder `start_dir` (what exports store), None for no target."""
    if target in (None, "", "None"):
        return None
    return os.path.relpath(Path(target).resolve(), Path(start_dir).resolve())


def export_blob(
    unet_cfg: dict,
    weights,
    scaling,
    step,
    metrics,
    *,
    schedule: dict,
    autoencoder: str | None,
    config: dict,
    dest: Path,
    raw_weights=None,
    sampling: dict | None = None,
    conditioning=None,
) -> dict:
    """A self-describing diffusion export to be written at `dest`; `weights` (EMA) and `raw_weights` are CPU
    state dicts, `unet_cfg` the UNet's full diffusers config, `schedule` the full scheduler config the weights
    were trained with, `autoencoder` the frozen AE's path (stored relative to `dest`'s folder)."""
    blob = {
        "format": CKPT_FORMAT,
        "unet_config": dict(unet_cfg),
        "state_dict": weights,
        "raw_state_dict": raw_weights,
        "scheduler": dict(schedule),
        "latent_scaling": scaling.to_dict(),
        "autoencoder": relative_path(autoencoder, Path(dest).parent),
        "step": step,
        "metrics": {k: v for k, v in metrics.items() if isinstance(v, (int, float))},
        "config": config,
    }
    if sampling is not None:
        blob["sampling"] = dict(sampling)
    if conditioning is not None:  # a trainer.diffusion.conditioning.Conditioning
        blob["conditioning"] = conditioning.to_dict()
    return blob
