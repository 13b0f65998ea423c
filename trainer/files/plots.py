"""Pictures of the CSVs: D history and diffusion metrics per iteration, and the quality summary.
Matplotlib is an optional extra; without it the pictures are skipped with one warning."""
from __future__ import annotations

import io as _io
import math

from trainer.core.log import warn
from trainer.files import atomic
from trainer.files.read import read_csv_rows

_warned = {"missing": False}


def _pyplot():
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        if not _warned["missing"]:
            warn("matplotlib is not installed: plots are skipped (pip install 'advdiff[plots]')")
            _warned["missing"] = True
        return None
    return plt


def _series(rows, key):
    xs = [r.get("epoch", r.get("iteration")) for r in rows if key in r and not math.isnan(r[key])]
    ys = [r[key] for r in rows if key in r and not math.isnan(r[key])]
    return xs, ys


def _save(fig, plt, path):
    buf = _io.BytesIO()
    fig.savefig(buf, format="png", dpi=100, bbox_inches="tight")
    plt.close(fig)
    atomic.atomic_write(path, lambda f: f.write(buf.getvalue()))


def _panels(csv_path, png_path, panels, xlabel, title):
    plt = _pyplot()
    rows = read_csv_rows(csv_path)
    if plt is None or not rows:
        return
    fig, axes = plt.subplots(1, len(panels), figsize=(4.2 * len(panels), 3.4))
    for ax, (name, keys) in zip(axes, panels):
        for key in keys:
            xs, ys = _series(rows, key)
            if xs:
                ax.plot(xs, ys, marker="o", markersize=3, label=key)
        ax.set_title(name)
        ax.set_xlabel(xlabel)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    fig.suptitle(title)
    _save(fig, plt, png_path)


def redraw_stale(csv_path, draw, *args) -> None:
    """Draw `csv_path`'s picture (beside it, .png) again where it is missing or not newer than the CSV:
    a run killed between writing a CSV and drawing it leaves the picture missing or behind."""
    png_path = csv_path.with_suffix(".png")
    if csv_path.is_file() and (not png_path.is_file() or png_path.stat().st_mtime_ns <= csv_path.stat().st_mtime_ns):
        draw(csv_path, png_path, *args)


def plot_d_history(csv_path, png_path, k: int):
    _panels(csv_path, png_path, [("loss", ["train_loss", "val_loss"]),
                                 ("accuracy", ["train_acc", "val_acc", "val_real_acc", "val_fake_acc"])],
            "epoch", f"discriminator, iteration {k}")


def plot_metrics(csv_path, png_path, k: int):
    _panels(csv_path, png_path, [("loss", ["train_loss", "val_loss"]), ("MSE", ["train_mse", "val_mse"]),
                                 ("adversarial", ["train_adv", "val_adv"]),
                                 ("D on samples", ["d_prob_fake", "adv_weight"])],
            "epoch", f"diffusion fine-tune, iteration {k}")


def plot_summary(csv_path, png_path):
    _panels(csv_path, png_path, [("Fréchet distance", ["latent_fd", "pixel_fd", "cls_fd", "inception_fd"]),
                                 ("k-NN precision / recall", ["precision", "recall", "pixel_precision",
                                                              "pixel_recall", "cls_precision", "cls_recall",
                                                              "inception_precision", "inception_recall"]),
                                 ("D", ["d_acc", "d_prob_fake"])],
            "iteration (0 = stage 1)", "sample quality per stage-2 iteration")
