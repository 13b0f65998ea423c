"""The embedded dataset: scikit-learn's bundled `load_digits` (1,797 real 8x8 scans of handwritten
digits), upsampled to 32x32 grey PNGs with a manifest, so every stage has real data offline."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from trainer.core.errors import UserError
from trainer.files import atomic


def build_digits(out_dir: str | Path, size: int = 32) -> Path:
    """Write `images/*.png` and `manifest.csv` under out_dir; returns the manifest path. Idempotent."""
    try:
        from sklearn.datasets import load_digits
    except ImportError:
        raise UserError(
            "scikit-learn is needed for the embedded digits data: pip install 'advdiff[demo]'"
        ) from None
    from PIL import Image

    out_dir = Path(out_dir)
    manifest = out_dir / "manifest.csv"
    if manifest.is_file():
        return manifest
    digits = load_digits()
    (out_dir / "images").mkdir(parents=True, exist_ok=True)
    lines = ["image_path,label,is_empty,is_augmented"]
    for i, (img, label) in enumerate(zip(digits.images, digits.target, strict=True)):
        arr = (img / 16.0 * 255.0).clip(0, 255).astype(np.uint8)
        big = np.asarray(Image.fromarray(arr).resize((size, size), Image.BICUBIC))
        rel = f"images/{i:04d}.png"
        atomic.save_png(big, out_dir / rel)
        lines.append(f"{rel},{int(label)},False,False")
    atomic.write_text("\n".join(lines) + "\n", manifest)
    return manifest
