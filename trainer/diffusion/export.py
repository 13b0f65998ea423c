"""A diffusion checkpoint -> a diffusers pipeline folder that opens without advdiff.

    {out}/
      model_index.json     names the components and the pipeline class ["pipeline", "AdvdiffLatentPipeline"];
                           a class-conditional model's class record is its `conditioning` (num_classes,
                           class_names, null_class, label_dropout)
      pipeline.py          a copy of models/pipeline.py (the pipeline class; honours the VAE's shift_factor)
      unet/                UNet2DModel: config.json + diffusion_pytorch_model.safetensors (EMA weights)
      scheduler/           DDIMScheduler: scheduler_config.json (the model's full schedule, custom betas and
                           the timestep_spacing it samples with in)
      vae/                 AutoencoderKL with the latent scaling_factor and shift_factor (when an AE is known)
      advdiff.json         where it came from: the checkpoint's file name, step, metrics, sampling

Open it with `DiffusionPipeline.from_pretrained(out, trust_remote_code=True)` (the class comes from
`pipeline.py` inside the folder), or `models.pipeline.AdvdiffLatentPipeline.from_pretrained(out)`; a
class-conditional one samples with `pipe(class_labels=[...], guidance_scale=w)`. The folder
holds no pickles and no absolute paths: it can be copied anywhere.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

from trainer.core.errors import UserError
from trainer.diffusion.checkpoints import DiffusionCheckpoint
from trainer.diffusion.schedule import Schedule
from trainer.files import atomic

PIPELINE_MODULE = "pipeline"
PIPELINE_CLASS = "AdvdiffLatentPipeline"
RECORD = "advdiff.json"


def default_steps(ckpt: DiffusionCheckpoint) -> int:
    """The DDIM steps the weights were trained or fine-tuned to sample with (50 where unknown)."""
    if ckpt.sampling and ckpt.sampling.get("steps"):
        return int(ckpt.sampling["steps"])
    return min(50, int(ckpt.scheduler["num_train_timesteps"]))


def export_record(ckpt: DiffusionCheckpoint) -> dict:
    return {
        "source": ckpt.path.name,
        "kind": ckpt.kind,
        "step": ckpt.step,
        "metrics": {k: v for k, v in ckpt.metrics.items() if isinstance(v, (int, float))},
        "sampling": ckpt.sampling,
    }


def is_current(out: Path, ckpt: DiffusionCheckpoint) -> bool:
    """Whether `out` already holds this checkpoint's export (same source file name and step)."""
    try:
        record = json.loads((Path(out) / RECORD).read_text())
    except (OSError, ValueError):
        return False
    want = export_record(ckpt)
    return record.get("source") == want["source"] and record.get("step") == want["step"]


def export_pipeline(
    ckpt: DiffusionCheckpoint,
    out,
    autoencoder=None,
    steps: int | None = None,
    eta: float | None = None,
    timestep_spacing: str | None = None,
) -> Path:
    """Write `ckpt` (its EMA weights, or whichever weights it was loaded with) as a pipeline folder at `out`,
    atomically. `autoencoder`: the AE folder or .pt to ship as `vae/` (None: no vae/, latents only);
    `timestep_spacing`: the DDIM spacing scheduler/ samples with (None: the checkpoint's own)."""
    import models.pipeline as pipeline_module
    from models.autoencoder import AutoencoderLoadError, load_autoencoder

    vae = None
    if autoencoder is not None:
        try:
            vae = load_autoencoder(autoencoder)
        except AutoencoderLoadError as e:
            raise UserError(str(e)) from None
        if vae.config.latent_channels != ckpt.latent_shape[0]:
            raise UserError(
                f"{autoencoder}: latent channels {vae.config.latent_channels} differ from the UNet's "
                f"{ckpt.latent_shape[0]}"
            )
        vae.register_to_config(
            scaling_factor=float(ckpt.scaling.scale), shift_factor=float(ckpt.scaling.shift)
        )
    steps = int(steps or default_steps(ckpt))
    eta = float(eta if eta is not None else (ckpt.sampling or {}).get("eta", 0.0))
    try:
        pipe = pipeline_module.AdvdiffLatentPipeline(
            unet=ckpt.unet.to("cpu"),
            scheduler=Schedule.from_dict(ckpt.scheduler).with_spacing(timestep_spacing).ddim(),
            vae=vae,
            sampling_steps=steps,
            sampling_eta=eta,
            conditioning=None if ckpt.conditioning is None else ckpt.conditioning.to_dict(),
        )
    except ValueError as e:  # a class record that does not fit the UNet
        raise UserError(f"{ckpt.path}: {e}") from None

    def fill(tmp: Path) -> None:
        pipe.save_pretrained(str(tmp), safe_serialization=True)
        index = json.loads((tmp / "model_index.json").read_text())
        index["_class_name"] = [PIPELINE_MODULE, PIPELINE_CLASS]
        (tmp / "model_index.json").write_text(json.dumps(index, indent=2, sort_keys=True) + "\n")
        shutil.copyfile(pipeline_module.__file__, tmp / f"{PIPELINE_MODULE}.py")
        (tmp / RECORD).write_text(json.dumps(export_record(ckpt), indent=2, sort_keys=True) + "\n")
        for config in tmp.rglob("*.json"):  # diffusers may record where a model was loaded from
            data = json.loads(config.read_text())
            if isinstance(data, dict) and data.pop("_name_or_path", None) is not None:
                config.write_text(json.dumps(data, indent=2, sort_keys=True) + "\n")

    return atomic.write_folder(out, fill)
