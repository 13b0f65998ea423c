"""Config sections of what a run reads and where it writes: the experiment's name and folder, the stage-1
checkpoint stage 2 starts from, and the dataset (manifest, columns, filters, resolution)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Optional

from trainer.config.schema import error_at, option


@dataclass
class ExperimentConfig:
    name: str = option("advdiff", "Experiment name; prefixes checkpoint and metric file names.")
    save_path: str = option("runs/advdiff", "Output folder; every output of the run lives under it.")

    def check(self, where, prefix):
        if not self.name or any(c in self.name for c in "/\\"):
            raise error_at(where, f"{prefix}.name", "a non-empty name without slashes", self.name)


@dataclass
class DiffusionConfig:
    stage1_checkpoint: Optional[str] = option(None, "Stage-1 checkpoint (.pt) that stage 2 fine-tunes.")


@dataclass
class DatasetOutputs:
    latent: str = option(
        "latent_path", "Manifest column with pre-embedded latents (.pt), used where present."
    )


@dataclass
class DatasetConfig:
    manifest: Optional[str] = option(
        None,
        "Manifest CSV (relative paths in it resolve against its folder), or a "
        "folder of images: every .png/.jpg/.jpeg/.bmp/.webp/.gif/.tif/.tiff under it "
        "(any case; hidden files and folders skipped), sorted by relative path, as "
        "the CSV `advdiff manifest DIR` writes; filters may then only name "
        "image_column.",
    )
    image_column: str = option("image_path", "Manifest column holding image paths.")
    label_column: Optional[str] = option(
        None,
        "Manifest column of class labels, for a class-conditional model (unet.num_class_embeds). Integer "
        "labels are class indices; other labels are sorted names. For a folder of images any name "
        "reads each image's first sub-folder as its label.",
    )
    outputs: DatasetOutputs = option(doc="Output columns of the manifest.", factory=DatasetOutputs)
    filters: dict[str, list[Any]] = option(doc="Keep rows whose column value is in the list.", factory=dict)
    resolution: Optional[int] = option(
        None, "Resize images to this side; default: the AE's sample_size.", ge=1
    )
