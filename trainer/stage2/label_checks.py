"""The checks of a class-conditional stage 2 (before compute): the model, the data's labels and the label
fields of the config agree. A conditional run's manifest rows get the column `label_index`: each row's class
under the stage-1 model's class names."""

from __future__ import annotations

from trainer.config.schema import error_at
from trainer.core.errors import ConfigError, UserError
from trainer.data.labels import check_present, class_names_of, label_indices
from trainer.stage1.labels import check_labels_config


def check_labels(cfg, stage1, rows) -> None:
    """stage1: the starting model's facts (checks.Stage1Facts; None where stage 1 has not run yet: the
    config's unet fields stand for it); rows: the filtered manifest, given the column `label_index` here."""
    where, col, s2 = cfg.source or "<config>", cfg.dataset.label_column, cfg.stage2
    if stage1 is None:
        check_labels_config(cfg)
        conditional = cfg.unet.num_class_embeds is not None
        guidable = conditional and cfg.training.label_dropout > 0
        model = "the stage-1 model this config trains"
    else:
        cond = stage1.conditioning
        conditional, guidable = cond is not None, cond is not None and cond.guidable()
        model = f"the stage-1 model {stage1.path}"
    if not conditional:
        for field, value in (
            ("dataset.label_column", col),
            ("stage2.guidance_scale", s2.guidance_scale),
            ("discriminator.config.conditional", cfg.discriminator.config.conditional or None),
        ):
            if value is not None:
                raise error_at(
                    where, field, f"null ({model} is unconditional: it has no class embeddings)", value
                )
        return
    if not col:
        raise ConfigError(
            f"{where}: dataset.label_column: expected the manifest column of class labels ({model} is "
            "class-conditional), got null"
        )
    if s2.guidance_scale not in (None, 1.0) and not guidable:
        raise error_at(
            where,
            "stage2.guidance_scale",
            f"1 or null ({model} has no trained null label, which classifier-free guidance needs: "
            "stage 1 ran with training.label_dropout 0, or the model was not trained by advdiff)",
            s2.guidance_scale,
        )
    if stage1 is None or rows is None:
        return
    manifest, names = cfg.dataset.manifest, list(cond.class_names)
    values = list(rows["label"])
    check_present(values, f"{manifest}: column '{col}'")
    data_names = class_names_of(values)
    integer = data_names == [str(i) for i in range(len(data_names))]
    if integer and names == [str(i) for i in range(len(names))] and len(data_names) > len(names):
        raise UserError(
            f"{manifest}: column '{col}' has {len(data_names)} classes (labels 0..{len(data_names) - 1}); "
            f"the stage-1 model {stage1.path} has {len(names)}"
        )
    rows["label_index"] = label_indices(values, names, f"{manifest}: column '{col}'")
