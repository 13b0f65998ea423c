"""The feature space `stage2.metric_features` names, beside the raw latents and pixels of the summary:

    raw                  none: latent_* and pixel_* columns only
    classifier:PATH      the penultimate layer of an advdiff classifier (`advdiff classifier`): cls_* columns;
                         for a class-conditional model also class_fd, and label_fidelity from its logits
    inception:PATH       a module mapping images in [-1, 1], (N, 3, 299, 299), to Inception-v3 pool
                         features (N, 2048): inception_* columns. A TorchScript file (torch.jit.save), or
                         an exported program (torch.export.save, batch dimension dynamic): whatever
                         Inception weights the user trusts, exported with their own tools

Both read decoded images (fakes and reals both through the frozen AE) in [-1, 1]. Images are clamped to
[-1, 1] and resized (bilinear, antialiased) to the extractor's side; grey images are repeated to 3
channels for Inception. Nothing is downloaded: PATH is a local file, relative to the config's folder.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from trainer.core.errors import UserError

FIELD = "stage2.metric_features"
INCEPTION_SIDE = 299
PREFIX = {"classifier": "cls", "inception": "inception"}  # column prefix and reference-statistics name


def parse(value: str) -> tuple[str, str | None]:
    """("raw", None), ("classifier", PATH) or ("inception", PATH);
    the config's check() has vetted the form."""
    kind, _, path = value.partition(":")
    return (kind, path) if kind in PREFIX else ("raw", None)


def _resize(x: torch.Tensor, side: int) -> torch.Tensor:
    if x.shape[-1] == side and x.shape[-2] == side:
        return x
    return F.interpolate(x, size=(side, side), mode="bilinear", align_corners=False, antialias=True)


class FeatureSpace:
    """images (N, C, H, W) in [-1, 1] -> feature rows (N, D) float32, in batches, fp32, no gradients."""

    name: str
    batch_size = 64

    def _rows(self, x: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    @torch.no_grad()
    def __call__(self, images: torch.Tensor) -> torch.Tensor:
        with torch.autocast(device_type=images.device.type, enabled=False):
            parts = [
                self._rows(images[i : i + self.batch_size].float().clamp(-1, 1))
                for i in range(0, len(images), self.batch_size)
            ]
        if not parts:
            return torch.zeros((0, self.dim), device=images.device)
        return torch.cat(parts).float()


class ClassifierFeatures(FeatureSpace):
    name = "cls"

    def __init__(self, path, device):
        from models.classifier import ClassifierLoadError, load_classifier

        try:
            model, blob = load_classifier(path)
        except ClassifierLoadError as e:
            raise UserError(f"{FIELD}: {e}") from None
        self.model, self.val_acc = model.to(device), blob.get("val_acc")
        self.channels, self.side, self.dim = blob["channels"], blob["resolution"], model.config["feature_dim"]

    def _rows(self, x):
        if x.shape[1] != self.channels:
            raise UserError(
                f"{FIELD}: the classifier reads {self.channels}-channel images, the AE decodes "
                f"{x.shape[1]} channels"
            )
        return self.model.features(_resize(x, self.side))

    @property
    def num_classes(self) -> int:
        """K: the classifier was trained on integer labels 0..K-1."""
        return int(self.model.config["num_classes"])

    @torch.no_grad()
    def classify(self, rows: torch.Tensor) -> torch.Tensor:
        """The classifier's logits (N, K) from feature rows this space returned (its output layer alone, no
        second pass over the images)."""
        with torch.autocast(device_type=rows.device.type, enabled=False):
            return self.model.out(rows.float()).float()


def _load_module(path, device):
    """A TorchScript file, else an exported program; None when it is neither."""
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)  # torch.jit is deprecated, not gone
        try:
            return torch.jit.load(str(path), map_location=device).eval()
        except Exception:  # torch raises RuntimeError, ValueError, ... for foreign files
            pass
    try:
        return torch.export.load(str(path)).module().to(device)
    except Exception:
        return None


class TorchScriptInception(FeatureSpace):
    name = "inception"
    batch_size = 32

    def __init__(self, path, device):
        self.module, self.path, self.dim = _load_module(path, device), path, None
        if self.module is None:
            raise UserError(
                f"{FIELD}: {path}: not a TorchScript file (torch.jit.save) or an exported program "
                f"(torch.export.save)"
            )
        self.dim = self(torch.zeros((3, 3, 8, 8), device=device)).shape[1]  # fails here, not hours later

    def _rows(self, x):
        if x.shape[1] == 1:
            x = x.repeat(1, 3, 1, 1)
        try:
            out = self.module(_resize(x, INCEPTION_SIDE))
        except Exception as e:
            raise UserError(
                f"{FIELD}: {self.path}: the module fails on images (N, 3, {INCEPTION_SIDE}, "
                f"{INCEPTION_SIDE}): {str(e).strip().splitlines()[-1][:200]}"
            ) from None
        ok = (
            isinstance(out, torch.Tensor)
            and out.dim() >= 2
            and out.shape[0] == x.shape[0]
            and all(s == 1 for s in out.shape[2:])
        )  # (N, D) or (N, D, 1, 1)
        if not ok:
            shape = tuple(out.shape) if isinstance(out, torch.Tensor) else type(out).__name__
            raise UserError(
                f"{FIELD}: {self.path}: expected features (N, D) (or (N, D, 1, 1)) from the module, "
                f"got {shape}"
            )
        return out.flatten(1)


def load_space(cfg, device) -> FeatureSpace | None:
    kind, path = parse(cfg.stage2.metric_features)
    if kind == "raw":
        return None
    full = cfg.resolve_path(path)
    if not full.is_file():
        raise UserError(f"{FIELD}: {full}: file not found")
    return (ClassifierFeatures if kind == "classifier" else TorchScriptInception)(full, device)


def check_metric_features(cfg, ae_config: dict | None, pipeline: bool = False) -> None:
    """Before compute: the file exists and loads (the Inception module runs on a tiny batch), and the
    classifier reads the AE's channels. pipeline: a missing file is one the demo writes first."""
    kind, path = parse(cfg.stage2.metric_features)
    if kind == "raw" or (pipeline and not cfg.resolve_path(path).exists()):
        return
    space = load_space(cfg, "cpu")
    if (
        isinstance(space, ClassifierFeatures)
        and ae_config is not None
        and ae_config.get("in_channels") not in (None, space.channels)
    ):
        raise UserError(
            f"{FIELD}: {cfg.resolve_path(path)} reads {space.channels}-channel images, the AE decodes "
            f"{ae_config['in_channels']}"
        )
