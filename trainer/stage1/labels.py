"""Stage 1 of a class-conditional model: the config's label fields agree, and the manifest's labels give the
classes the model records (trainer/diffusion/conditioning.py)."""

from __future__ import annotations

import torch

from trainer.core.errors import ConfigError, UserError
from trainer.data.labels import check_present, class_names_of, label_indices
from trainer.diffusion.conditioning import Conditioning


def check_labels_config(cfg) -> None:
    """A label column needs a class-conditional UNet and the other way round (one line, before compute)."""
    where = cfg.source or "<config>"
    if cfg.dataset.label_column and cfg.unet.num_class_embeds is None:
        raise ConfigError(
            f"{where}: unet.num_class_embeds: expected the number of classes of dataset.label_column "
            f"'{cfg.dataset.label_column}' (a label column trains a class-conditional UNet), got null"
        )
    if cfg.unet.num_class_embeds is not None and not cfg.dataset.label_column:
        raise ConfigError(
            f"{where}: dataset.label_column: expected the manifest column of class labels (unet."
            f"num_class_embeds {cfg.unet.num_class_embeds} makes a class-conditional UNet), got null"
        )


def training_labels(cfg, rows) -> tuple[Conditioning | None, torch.Tensor | None]:
    """(the model's Conditioning, each row's class index) for a conditional model, (None, None) else. The
    classes are the labels' (integer labels: 0..num_class_embeds-1); more classes in the data than
    unet.num_class_embeds, or text labels of another count, are one line."""
    if not cfg.dataset.label_column:
        return None, None
    manifest = cfg.dataset.manifest
    column = cfg.dataset.label_column
    values = list(rows["label"])
    check_present(values, f"{manifest}: column '{column}'")
    names = class_names_of(values)
    c = cfg.unet.num_class_embeds
    integer = names == [str(i) for i in range(len(names))]
    if len(names) > c or (not integer and len(names) != c):
        raise UserError(
            f"{manifest}: column '{column}' has {len(names)} classes "
            + ("(labels 0.." + str(len(names) - 1) + ")" if integer else f"({', '.join(names[:6])}...)")
            + f"; unet.num_class_embeds is {c}: set it to {len(names)}"
        )
    if integer:
        names = [str(i) for i in range(c)]
    indices = label_indices(values, names, f"{manifest}: column '{column}'")
    return Conditioning.new(names, cfg.training.label_dropout), torch.from_numpy(indices)
