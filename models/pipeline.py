"""AdvdiffLatentPipeline: latent diffusion as a diffusers pipeline (UNet2DModel + DDIM + VAE), unconditional
or class-conditional.

Every pipeline folder advdiff exports holds a copy of this file as `pipeline.py`, and its model_index.json
names it, so the folder opens with diffusers alone:

    DiffusionPipeline.from_pretrained(folder, trust_remote_code=True)

(`trust_remote_code=True` is diffusers' consent to run a pipeline class shipped inside a folder: the code it
runs is this file's copy, which you can read there or compare with this one.)

Unlike diffusers' stock latent pipelines it honours the VAE's `shift_factor` as well as its
`scaling_factor`: the UNet works on `(z - shift_factor) * scaling_factor`, so latents go back to the VAE as
`x / scaling_factor + shift_factor`. The defaults of `__call__` (steps, eta) are the ones the model was
fine-tuned to sample with (config `sampling_steps`, `sampling_eta`).

A class-conditional model (a UNet with `num_class_embeds`) samples one class per image:

    pipe(class_labels=[3, 3, "seven"], guidance_scale=2.0)

Its class record, config `conditioning` = {num_classes, class_names, null_class, label_dropout}, says what
the class indices mean and which one is the null label that classifier-free guidance needs (the record is
one JSON object because diffusers' hub loader takes any list in model_index.json for a component folder). A
UNet with `num_class_embeds = M` and no record has M classes named "0".."M-1" and no null label, so it
samples at guidance scale 1 only. Guidance at scale w is out(null) + w * (out(y) - out(null)) on the UNet's
output, from one forward of both halves, and w = 1 is the conditional output from one plain forward:
advdiff's own sampler (trainer/diffusion/conditioning.py, model_output) computes the same.

This file imports only torch and diffusers: it must work where advdiff is not installed.
"""

from __future__ import annotations

import math
import operator

import torch
from diffusers import DiffusionPipeline, ImagePipelineOutput
from diffusers.utils.torch_utils import randn_tensor


def _shown(names, limit: int = 12) -> str:
    names = [repr(n) for n in names]
    return ", ".join(names[:limit]) + (f", ... ({len(names)} in all)" if len(names) > limit else "")


class AdvdiffLatentPipeline(DiffusionPipeline):
    model_cpu_offload_seq = "unet->vae"
    _optional_components = ["vae"]

    def __init__(
        self,
        unet,
        scheduler,
        vae=None,
        sampling_steps: int = 50,
        sampling_eta: float = 0.0,
        conditioning: dict | None = None,
    ):
        super().__init__()
        self.register_modules(unet=unet, scheduler=scheduler, vae=vae)
        self.register_to_config(sampling_steps=int(sampling_steps), sampling_eta=float(sampling_eta))
        if conditioning is not None:  # an unconditional pipeline's config stays as it was before classes
            self.register_to_config(conditioning=self._checked_record(dict(conditioning)))

    def _checked_record(self, record: dict) -> dict:
        embeds = self.unet.config.get("num_class_embeds", None)
        try:
            num = int(record["num_classes"])
            names = [str(n) for n in record["class_names"]]
            null = record.get("null_class")
            null = None if null is None else int(null)
            dropout = float(record.get("label_dropout", 0.0))
        except (KeyError, TypeError, ValueError) as e:
            raise ValueError(f"conditioning: expected num_classes, class_names, null_class ({e!r})") from None
        if len(names) != num or len(set(names)) != num:
            raise ValueError(f"conditioning: expected {num} distinct class_names, got {len(names)}")
        if null is not None and null != num:
            raise ValueError(f"conditioning: null_class must be num_classes ({num}) or null, got {null}")
        if embeds != num + (null is not None):
            raise ValueError(
                f"conditioning: {num} classes{' and a null label' if null is not None else ''} need a UNet "
                f"with num_class_embeds {num + (null is not None)}, this one has {embeds}"
            )
        return {"num_classes": num, "class_names": names, "null_class": null, "label_dropout": dropout}

    @property
    def class_record(self) -> dict | None:
        """The class record {num_classes, class_names, null_class, label_dropout}; None: unconditional."""
        record = self.config.get("conditioning", None)
        if record is not None:
            return dict(record)
        m = self.unet.config.get("num_class_embeds", None)
        if not m:
            return None
        return {
            "num_classes": m,
            "class_names": [str(i) for i in range(m)],
            "null_class": None,
            "label_dropout": 0.0,
        }

    def class_indices(self, class_labels) -> torch.Tensor:
        """Class labels (indices, or names from the record; one label or a sequence) -> a long tensor."""
        record = self.class_record
        if record is None:
            raise ValueError(
                "class_labels: this pipeline's UNet is unconditional; sample it without class_labels"
            )
        if torch.is_tensor(class_labels):
            class_labels = class_labels.reshape(-1).tolist()
        elif isinstance(class_labels, (str, int)):
            class_labels = [class_labels]
        names, num = record["class_names"], record["num_classes"]
        out = []
        for label in class_labels:
            if isinstance(label, str):
                if label not in names:
                    raise ValueError(
                        f"class_labels: unknown class name {label!r} (the classes: {_shown(names)})"
                    )
                out.append(names.index(label))
                continue
            try:
                index = operator.index(label)
            except TypeError:
                raise ValueError(f"class_labels: expected class indices or names, got {label!r}") from None
            if not 0 <= index < num:
                raise ValueError(f"class_labels: class index {index} is outside 0..{num - 1}")
            out.append(index)
        if not out:
            raise ValueError("class_labels: expected at least one label")
        return torch.tensor(out, dtype=torch.long)

    def latent_shape(self, batch_size: int) -> tuple:
        size = self.unet.config.sample_size
        h, w = (size, size) if isinstance(size, int) else tuple(size)
        return (batch_size, self.unet.config.in_channels, h, w)

    def to_vae_latents(self, x: torch.Tensor) -> torch.Tensor:
        """The UNet's latents -> the VAE's (undo scale and shift)."""
        scale = self.vae.config.scaling_factor if self.vae.config.scaling_factor is not None else 1.0
        shift = self.vae.config.get("shift_factor", None) or 0.0
        return x / scale + shift

    def model_output(self, x, t, labels=None, guidance_scale: float = 1.0) -> torch.Tensor:
        """The UNet's output at (x, t) for class `labels` (None: unconditional) under classifier-free
        guidance at `guidance_scale` (1: the conditional output, one forward)."""
        if labels is None:
            return self.unet(x, t).sample
        if guidance_scale == 1.0:
            return self.unet(x, t, class_labels=labels).sample
        n = x.shape[0]
        null = torch.full_like(labels, self.class_record["null_class"])
        both = self.unet(torch.cat([x, x]), t, class_labels=torch.cat([labels, null])).sample
        cond, uncond = both[:n], both[n:]
        return uncond + guidance_scale * (cond - uncond)

    def _labels(self, class_labels, guidance_scale, batch_size, latents):
        """Checked class labels (None for an unconditional model) and the batch size they make."""
        record = self.class_record
        if not math.isfinite(guidance_scale):
            raise ValueError(f"guidance_scale: expected a finite number, got {guidance_scale}")
        if record is None:
            if class_labels is not None:
                self.class_indices(class_labels)  # raises: unconditional
            if guidance_scale != 1.0:
                raise ValueError(
                    f"guidance_scale: this pipeline's UNet is unconditional; expected 1, got {guidance_scale}"
                )
            return None, 1 if batch_size is None else batch_size
        if class_labels is None:
            raise ValueError(
                "class_labels: this pipeline's UNet is class-conditional; give one class (index or name) "
                f"per sample, e.g. class_labels=[0, 1] (the classes: {_shown(record['class_names'])})"
            )
        labels = self.class_indices(class_labels)
        n = labels.shape[0]
        if batch_size is not None and batch_size != n:
            raise ValueError(f"batch_size: {batch_size}, but {n} class_labels (one per sample)")
        if latents is not None and latents.shape[0] != n:
            raise ValueError(f"latents: {latents.shape[0]} rows, but {n} class_labels (one per sample)")
        if guidance_scale != 1.0 and record["null_class"] is None:
            raise ValueError(
                f"guidance_scale: this model has no null class (it was not trained with label dropout), so "
                f"classifier-free guidance is off: expected 1, got {guidance_scale}"
            )
        return labels, n

    @torch.no_grad()
    def __call__(
        self,
        batch_size: int | None = None,
        num_inference_steps: int | None = None,
        eta: float | None = None,
        generator=None,
        latents: torch.Tensor | None = None,
        output_type: str = "pil",
        return_dict: bool = True,
        class_labels=None,
        guidance_scale: float = 1.0,
    ):
        """Sample `batch_size` images (default 1), or from the starting noise `latents` (UNet latent space).

        class_labels: a class-conditional model's classes, one per sample (indices or class names; the batch
        size is their number); guidance_scale: classifier-free guidance (1: none; other scales need a model
        with a null class). Both are refused for an unconditional model.
        output_type: "pil", "np" (NHWC in [0, 1]), "pt" (NCHW in [0, 1]) or "latent" (the UNet's latents).
        """
        guidance_scale = float(guidance_scale)
        labels, batch_size = self._labels(class_labels, guidance_scale, batch_size, latents)
        steps = int(num_inference_steps or self.config.sampling_steps)
        eta = float(self.config.sampling_eta if eta is None else eta)
        device = self._execution_device
        dtype = self.unet.dtype
        if latents is None:
            latents = randn_tensor(
                self.latent_shape(batch_size), generator=generator, device=device, dtype=dtype
            )
        x = latents.to(device=device, dtype=dtype)
        labels = None if labels is None else labels.to(device)
        self.scheduler.set_timesteps(steps, device=device)
        for t in self.progress_bar(self.scheduler.timesteps):
            out = self.model_output(x, t, labels, guidance_scale)
            x = self.scheduler.step(out.float(), t, x, eta=eta, generator=generator).prev_sample
        if output_type == "latent":
            images = x
        else:
            if self.vae is None:
                raise ValueError("this pipeline has no vae: use output_type='latent'")
            z = self.to_vae_latents(x.float()).to(self.vae.dtype)
            images = (self.vae.decode(z).sample.float() / 2 + 0.5).clamp(0, 1)
            if output_type in ("np", "pil"):
                images = images.cpu().permute(0, 2, 3, 1).numpy()
                if output_type == "pil":
                    images = self.numpy_to_pil(images)
        self.maybe_free_model_hooks()
        if not return_dict:
            return (images,)
        return ImagePipelineOutput(images=images)
