"""The classifier behind `stage2.metric_features: classifier:PATH`: trained on the labelled manifest rows of
the training split (training.train_split / split_seed, the split every stage uses), so the held-out rows
the quality summary compares against are never seen; its accuracy on those rows is printed and stored.

    advdiff classifier CONFIG [--out PATH] [--epochs N] [--label-column label]

A few seconds on 2 CPU cores for the embedded digits (models/classifier.py is three conv levels). It is
meant for small labelled sets like those: the images are held in memory (at most MAX_BYTES) and it
trains on the CPU; for large images bring Inception features instead (`inception:PATH`). Images are
read as stage 2's AE sees them: its channels and side (the AE checkpoint's config where it exists,
else autoencoder.model; dataset.resolution wins when set).
"""

from __future__ import annotations

import math
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from trainer.core.errors import ConfigError, UserError
from trainer.data.manifest import load_image, read_manifest, split_indices
from trainer.files import atomic

DEFAULT_EPOCHS = 10
MAX_BYTES = 4 << 30


def read_labels(cfg, label_column: str = "label"):
    """(filtered manifest rows, integer labels >= 0); a missing column or a label that is not an integer
    is one line naming the manifest and the column."""
    if cfg.dataset.manifest is None:
        raise ConfigError(
            f"{cfg.source or '<config>'}: dataset.manifest: expected a manifest CSV path, got null"
        )
    manifest = cfg.resolve_path(cfg.dataset.manifest)
    rows = read_manifest(manifest, cfg.dataset.image_column, cfg.dataset.filters, keep=(label_column,))
    if len(rows) == 0:
        raise UserError(f"{manifest}: no rows left after dataset.filters")
    labels = []
    for i, v in enumerate(rows[label_column]):
        try:
            f = float(v)
            ok = math.isfinite(f) and f == int(f) and f >= 0 and not isinstance(v, (bool, np.bool_))
        except (TypeError, ValueError):
            ok = False
        if not ok:
            raise UserError(
                f"{manifest}: column '{label_column}': expected integer class labels >= 0, got {v!r} "
                f"(row {i} after dataset.filters)"
            )
        labels.append(int(f))
    missing = [i for i, p in enumerate(rows["image_path"]) if not isinstance(p, str)]
    if missing:
        raise UserError(
            f"{manifest}: row {missing[0]}: no image in '{cfg.dataset.image_column}' (the classifier "
            f"reads images)"
        )
    return rows, np.asarray(labels, dtype=np.int64)


def image_geometry(cfg) -> tuple[int, int]:
    """(channels, side) of the images stage 2 decodes: the AE checkpoint's where it exists."""
    from trainer.data.latents import load_ae_config

    ae = cfg.resolve_path(cfg.autoencoder.checkpoint) if cfg.autoencoder.checkpoint else None
    if ae is not None and ae.exists():
        config = load_ae_config(ae)
        channels, side = config["in_channels"], config["sample_size"]
    else:
        channels, side = cfg.autoencoder.model.in_channels, cfg.autoencoder.model.sample_size
    return int(channels), int(cfg.dataset.resolution or side)


def _shifted(x: torch.Tensor, g: torch.Generator, pad: int = 2) -> torch.Tensor:
    """Each image moved by up to `pad` pixels each way (background -1 comes in): cheap augmentation."""
    n, _, h, w = x.shape
    padded = F.pad(x, (pad, pad, pad, pad), value=-1.0)
    dy, dx = torch.randint(0, 2 * pad + 1, (2, n), generator=g).tolist()
    return torch.stack([padded[i, :, dy[i] : dy[i] + h, dx[i] : dx[i] + w] for i in range(n)])


@torch.no_grad()
def accuracy(model, images: torch.Tensor, labels: torch.Tensor, batch: int = 256) -> float:
    if len(labels) == 0:
        return math.nan
    model.eval()
    right = sum(
        int((model(images[i : i + batch]).argmax(1) == labels[i : i + batch]).sum())
        for i in range(0, len(labels), batch)
    )
    return right / len(labels)


def fit(
    images: torch.Tensor,
    labels: torch.Tensor,
    num_classes: int,
    *,
    epochs: int = DEFAULT_EPOCHS,
    seed: int = 0,
    batch_size: int = 64,
    lr: float = 1e-2,
):
    """A trained ImageClassifier for images (N, C, S, S) in [-1, 1] (AdamW, one-cycle LR, shifted copies)."""
    from models.classifier import ImageClassifier

    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = ImageClassifier(
            channels=images.shape[1], num_classes=num_classes, resolution=images.shape[-1]
        )
    g = torch.Generator().manual_seed(seed)
    steps_per_epoch = max(1, math.ceil(len(labels) / batch_size))
    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=1e-4)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=lr, total_steps=epochs * steps_per_epoch)
    model.train()
    for _ in range(epochs):
        perm = torch.randperm(len(labels), generator=g)
        for j in range(steps_per_epoch):
            idx = perm[j * batch_size : (j + 1) * batch_size]
            loss = F.cross_entropy(model(_shifted(images[idx], g)), labels[idx])
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            sched.step()
    return model.eval()


def train_classifier(
    cfg, out: str | Path, *, epochs: int = DEFAULT_EPOCHS, label_column: str = "label", log=print
) -> dict:
    """Train on the training split of the config's manifest, score the held-out split, write `out`
    atomically. Returns the facts stored beside the weights (val_acc, rows, seconds, ...)."""
    from models.classifier import classifier_export

    t0 = time.time()
    rows, labels = read_labels(cfg, label_column)
    channels, side = image_geometry(cfg)
    train, held = split_indices(len(rows), cfg.training.train_split, cfg.training.split_seed)
    paths = rows["image_path"].tolist()
    need = len(paths) * channels * side * side * 4
    if need > MAX_BYTES:
        raise UserError(
            f"{cfg.dataset.manifest}: {len(paths)} images of {channels}x{side}x{side} need "
            f"{need / 2**30:.1f} GiB in memory, over the classifier's {MAX_BYTES / 2**30:.0f} GiB; "
            f"narrow dataset.filters, or use stage2.metric_features inception:PATH"
        )
    images = torch.stack([load_image(p, side, channels) for p in paths])
    y = torch.from_numpy(labels)
    num_classes = int(labels.max()) + 1
    model = fit(images[train], y[train], num_classes, epochs=epochs, seed=cfg.training.seed)
    val_acc = accuracy(model, images[held], y[held])
    facts = {
        "val_acc": val_acc,
        "train_rows": len(train),
        "held_out_rows": len(held),
        "epochs": epochs,
        "label_column": label_column,
        "seconds": round(time.time() - t0, 2),
    }
    atomic.save_torch(classifier_export(model, **facts), out)
    shown = "n/a (no held-out rows)" if math.isnan(val_acc) else f"{val_acc:.4f}"
    log(
        f"classifier: {len(train)} training rows, {num_classes} classes, "
        f"{epochs} epochs, {facts['seconds']:.1f}s; "
        f"held-out accuracy {shown} on {len(held)} rows -> {out}"
    )
    return facts
