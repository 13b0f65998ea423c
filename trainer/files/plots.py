"""Pictures of the CSVs: D history and diffusion metrics per iteration, and the quality summary.
Matplotlib is an optional extra; without it the pictures are skipped with one warning."""

from __future__ import annotations

import io as _io
import math

from trainer.config.loss_types import metric_panels
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


LOG_SPAN = 10.0  # a panel of positive values whose largest is at least this many times its smallest: log y


def _panels(csv_path, png_path, panels, xlabel, title, log_panels=()):
    """One row of panels; x is a whole number (epoch, iteration), so only whole ticks are shown. Panels
    named in `log_panels` switch to a log y axis when their values span LOG_SPAN or more."""
    plt = _pyplot()
    rows = read_csv_rows(csv_path)
    if plt is None or not rows:
        return
    from matplotlib.ticker import MaxNLocator

    # constrained layout keeps the figure title above the panels' titles (tight bbox alone lets them overlap)
    fig, axes = plt.subplots(1, len(panels), figsize=(4.2 * len(panels), 3.6), layout="constrained")
    for ax, (name, keys) in zip(axes, panels, strict=True):
        values = []
        for key in keys:
            xs, ys = _series(rows, key)
            if xs:
                ax.plot(xs, ys, marker="o", markersize=3, label=key)
                values += ys
        log = name in log_panels and values and min(values) > 0 and max(values) >= LOG_SPAN * min(values)
        if log:
            ax.set_yscale("log")
        ax.set_title(name + (" (log scale)" if log else ""))
        ax.set_xlabel(xlabel)
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        ax.grid(alpha=0.3, which="both" if log else "major")
        if ax.get_legend_handles_labels()[0]:
            ax.legend(fontsize=8)
    fig.suptitle(title)
    _save(fig, plt, png_path)


def redraw_stale(csv_path, draw, *args) -> None:
    """Draw `csv_path`'s picture (beside it, .png) again where it is missing or not newer than the CSV:
    a run killed between writing a CSV and drawing it leaves the picture missing or behind."""
    png_path = csv_path.with_suffix(".png")
    if csv_path.is_file() and (
        not png_path.is_file() or png_path.stat().st_mtime_ns <= csv_path.stat().st_mtime_ns
    ):
        draw(csv_path, png_path, *args)


def plot_d_history(csv_path, png_path, k: int):
    _panels(
        csv_path,
        png_path,
        [
            ("loss", ["train_loss", "val_loss"]),
            ("accuracy", ["train_acc", "val_acc", "val_real_acc", "val_fake_acc"]),
        ],
        "epoch",
        f"discriminator, iteration {k}",
    )


def plot_metrics(csv_path, png_path, k: int):
    rows = read_csv_rows(csv_path)
    present = set(rows[0]) if rows else set()
    _panels(
        csv_path,
        png_path,
        [
            ("loss", ["train_loss", "val_loss"]),
            ("MSE", ["train_mse", "val_mse"]),
            ("adversarial", ["train_adv", "val_adv"]),
            ("D on samples", ["d_prob_fake", "adv_weight"]),
        ]
        # the terms' and helpers' panels (config/loss_types.py), where the history has their columns
        + [(name, keys) for name, keys in metric_panels() if present & set(keys)],
        "epoch",
        f"diffusion fine-tune, iteration {k}",
    )


def plot_summary(csv_path, png_path):
    _panels(
        csv_path,
        png_path,
        [
            ("Fréchet distance", ["latent_fd", "pixel_fd", "cls_fd", "inception_fd"]),
            (
                "k-NN precision / recall",
                [
                    "precision",
                    "recall",
                    "pixel_precision",
                    "pixel_recall",
                    "cls_precision",
                    "cls_recall",
                    "inception_precision",
                    "inception_recall",
                ],
            ),
            ("D", ["d_acc", "d_prob_fake"]),
        ],
        "iteration (0 = stage 1)",
        "sample quality per stage-2 iteration",
        log_panels=("Fréchet distance",),
    )
