"""A small image classifier whose penultimate layer is a feature space for sample-quality metrics.

Three 3x3 conv levels (ReLU; max-pooled twice, then average-pooled to 2x2), a `feature_dim`-wide
hidden layer (the features) and a linear output layer (the logits). Trained by
`trainer.quality.classifier` on a manifest's training split; it backs `stage2.metric_features:
classifier:PATH` (cls_fd, cls_precision, cls_recall).

On disk: a self-describing `.pt` {"format": "advdiff.classifier", "config", "state_dict", "val_acc",
"resolution", "channels"}; inputs are images in [-1, 1] of `channels` x `resolution` x `resolution`.
"""

from __future__ import annotations

from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F

CLASSIFIER_FORMAT = "advdiff.classifier"


class ImageClassifier(nn.Module):
    def __init__(
        self,
        channels: int = 1,
        num_classes: int = 10,
        width: int = 16,
        feature_dim: int = 64,
        resolution: int = 32,
    ):
        super().__init__()
        self.config = {
            "channels": channels,
            "num_classes": num_classes,
            "width": width,
            "feature_dim": feature_dim,
            "resolution": resolution,
        }
        w = width
        self.conv1 = nn.Conv2d(channels, w, 3, padding=1)
        self.conv2 = nn.Conv2d(w, 2 * w, 3, padding=1)
        self.conv3 = nn.Conv2d(2 * w, 4 * w, 3, padding=1)
        self.hidden = nn.Linear(4 * w * 4, feature_dim)
        self.out = nn.Linear(feature_dim, num_classes)

    def features(self, x: torch.Tensor) -> torch.Tensor:
        """The penultimate layer (N, feature_dim): the input of the output layer."""
        x = F.max_pool2d(F.relu(self.conv1(x)), 2)
        x = F.max_pool2d(F.relu(self.conv2(x)), 2)
        x = F.adaptive_avg_pool2d(F.relu(self.conv3(x)), 2)
        return F.relu(self.hidden(x.flatten(1)))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.out(self.features(x))


class ClassifierLoadError(Exception):
    """The path does not hold a loadable advdiff classifier; the message says why."""


def classifier_export(model: ImageClassifier, **facts) -> dict:
    """The on-disk form; `facts` adds val_acc and anything else worth keeping (plain values)."""
    return {
        "format": CLASSIFIER_FORMAT,
        "config": dict(model.config),
        "state_dict": {k: v.detach().cpu() for k, v in model.state_dict().items()},
        "resolution": model.config["resolution"],
        "channels": model.config["channels"],
        **facts,
    }


def load_classifier(path: str | Path) -> tuple[ImageClassifier, dict]:
    """(the model in eval mode, frozen; the file's dict) or ClassifierLoadError."""
    path = Path(path)
    if not path.is_file():
        raise ClassifierLoadError(f"{path}: classifier not found")
    try:
        blob = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:
        raise ClassifierLoadError(f"{path}: unreadable classifier ({type(e).__name__})") from None
    if not isinstance(blob, dict) or blob.get("format") != CLASSIFIER_FORMAT:
        raise ClassifierLoadError(
            f"{path}: not an advdiff classifier (format {CLASSIFIER_FORMAT}; "
            f"`advdiff classifier CONFIG --out {path.name}` writes one)"
        )
    try:
        model = ImageClassifier(**blob["config"])
        model.load_state_dict(blob["state_dict"])
    except Exception as e:
        raise ClassifierLoadError(
            f"{path}: weights do not match its config: {str(e).splitlines()[0]}"
        ) from None
    model.requires_grad_(False)
    return model.eval(), blob
