"""The bad-input catalogue's class-label cases (bad_input_cases.py imports them into CASES): label fields on
an unconditional model, and a class-conditional model without labels or with other classes than the data's."""

import torch
from bad_input_cases import _set

__all__ = [
    "c_label_column_on_unconditional",
    "c_guidance_scale_on_unconditional",
    "c_conditional_model_without_labels",
    "c_class_count_differs",
    "c_guidance_scale_without_a_null_label",
]


def conditional_checkpoint(c, classes: int, label_dropout: float = 0.1):
    """The finished run's stage-1 checkpoint as an (untrained) class-conditional model of `classes`
    classes (trained with `label_dropout`, as its record says), written under the case's own folder."""
    from models.unet import unet_from_config
    from trainer.diffusion.checkpoints import export_blob, load_diffusion_checkpoint
    from trainer.diffusion.conditioning import Conditioning

    ck = load_diffusion_checkpoint(c.ckpt)
    config = dict(ck.unet_config, num_class_embeds=classes + 1)
    path = c.tmp / "conditional.pt"
    blob = export_blob(
        config,
        unet_from_config(config).state_dict(),
        ck.scaling,
        0,
        {},
        schedule=ck.scheduler,
        autoencoder=ck.autoencoder,
        config={},
        dest=path,
        conditioning=Conditioning.new([str(i) for i in range(classes)], label_dropout),
    )
    torch.save(blob, path)
    return path


def c_label_column_on_unconditional(c):
    p = c.config(_set("dataset.label_column", "label"))
    expected = (
        f"dataset.label_column: expected null (the stage-1 model {c.ckpt} is unconditional: it has no class "
        'embeddings), got "label"'
    )
    return [], p, f"{p}: {expected}", True


def c_guidance_scale_on_unconditional(c):
    p = c.config(_set("stage2.guidance_scale", 3.0))
    expected = (
        f"stage2.guidance_scale: expected null (the stage-1 model {c.ckpt} is unconditional: it has no class "
        "embeddings), got 3.0"
    )
    return [], p, f"{p}: {expected}", True


def c_conditional_model_without_labels(c):
    ckpt = conditional_checkpoint(c, 10)
    p = c.config(_set("diffusion.stage1_checkpoint", str(ckpt)))
    expected = (
        f"dataset.label_column: expected the manifest column of class labels (the stage-1 model {ckpt} is "
        "class-conditional), got null"
    )
    return [], p, f"{p}: {expected}", True


def c_class_count_differs(c):
    ckpt = conditional_checkpoint(c, 4)

    def edit(d):
        d["diffusion"]["stage1_checkpoint"] = str(ckpt)
        d["dataset"]["label_column"] = "label"

    p = c.config(edit)
    manifest = c.base["dataset"]["manifest"]
    expected = f"{manifest}: column 'label' has 10 classes (labels 0..9); the stage-1 model {ckpt} has 4"
    return [], p, expected, True


def c_guidance_scale_without_a_null_label(c):
    ckpt = conditional_checkpoint(c, 10, label_dropout=0.0)

    def edit(d):
        d["diffusion"]["stage1_checkpoint"] = str(ckpt)
        d["dataset"]["label_column"] = "label"
        d["stage2"]["guidance_scale"] = 2.0

    p = c.config(edit)
    expected = (
        f"stage2.guidance_scale: expected 1 or null (the stage-1 model {ckpt} has no trained null label, "
        "which classifier-free guidance needs: stage 1 ran with training.label_dropout 0, or the model was "
        "not trained by advdiff), got 2.0"
    )
    return [], p, f"{p}: {expected}", True
