"""Manifest reading (a CSV, or a folder of images read as one), filters, and image loading."""

from __future__ import annotations

import os
import unicodedata
from pathlib import Path

import numpy as np
import pandas as pd
import torch

from trainer.core.errors import UserError

# The suffixes of an image folder's files (any case). A fixed list, not Pillow's registry, so that the
# rows of a folder do not depend on the Pillow build of the machine reading it.
IMAGE_SUFFIXES = (".bmp", ".gif", ".jpeg", ".jpg", ".png", ".tif", ".tiff", ".webp")


def _walk_error(e: OSError):
    raise UserError(f"{e.filename}: cannot list this folder ({e.strerror})")


def list_images(folder: Path) -> list[str]:
    """The images under `folder` (recursive; hidden files and folders, '.'-prefixed, skipped) as POSIX
    paths relative to it, sorted by that path (compared in Unicode NFC form), so that the order is the
    same on every machine and filesystem. A folder reached twice through symbolic links is read once."""
    folder = Path(folder)
    found, seen = [], set()
    for root, dirs, files in os.walk(folder, onerror=_walk_error, followlinks=True):
        real = os.path.realpath(root)
        if real in seen:  # a link back up the tree, or a second link to the same folder
            dirs[:] = []
            continue
        seen.add(real)
        dirs[:] = sorted(d for d in dirs if not d.startswith("."))
        rel = Path(root).relative_to(folder)
        found += [
            (rel / f).as_posix()
            for f in files
            if not f.startswith(".") and os.path.splitext(f)[1].lower() in IMAGE_SUFFIXES
        ]
    return sorted(found, key=lambda p: (unicodedata.normalize("NFC", p), p))


def image_folder_rows(folder: Path) -> list[str]:
    """`list_images`, refusing a folder without images in one line that names the suffixes."""
    paths = list_images(folder)
    if not paths:
        hint = (
            "; it looks like a Hugging Face `datasets` folder, which advdiff does not read: save its "
            "images as files"
            if any((Path(folder) / f).is_file() for f in ("dataset_info.json", "state.json"))
            else ""
        )
        raise UserError(
            f"{folder}: no image files in this folder or its subfolders (expected "
            f"{', '.join(IMAGE_SUFFIXES[:-1])} or {IMAGE_SUFFIXES[-1]}, any case; hidden files and "
            f"folders are skipped){hint}"
        )
    return paths


def read_manifest(
    manifest: Path,
    image_column: str,
    filters: dict | None = None,
    latent_column: str | None = None,
    keep: tuple[str, ...] = (),
    label_column: str | None = None,
) -> pd.DataFrame:
    """Read and filter the manifest; returns rows with absolute `image_path`/`latent_path` columns, and
    the columns named in `keep` as they are (each must exist). `manifest` is a CSV (relative paths in it
    resolve against its folder) or a folder of images, read as the CSV `advdiff manifest` writes into it
    would be: one column, `image_column`, of its `list_images` (so filters may name only that column).
    `label_column` (dataset.label_column): its values come back as the column `label`; a folder's label
    of an image is its first sub-folder's name (None for an image directly in the folder)."""
    manifest = Path(manifest)
    folder = manifest.is_dir()
    df = _manifest_frame(manifest, folder, image_column, label_column)
    has_latents = bool(latent_column) and latent_column in df.columns
    _check_columns(manifest, df, folder, image_column, has_latents, keep, label_column)
    df = _filtered(manifest, df, folder, image_column, filters).reset_index(drop=True)
    base = manifest.resolve() if folder else manifest.resolve().parent
    out = _resolved_rows(df, base, image_column, latent_column if has_latents else None, keep, label_column)
    for i, (img, lat) in enumerate(zip(out["image_path"], out["latent_path"], strict=True)):
        if img is None and lat is None:
            raise UserError(
                f"{manifest}: row {i}: empty '{image_column}'"
                + (f" and '{latent_column}'" if has_latents else "")
            )
    return out


def _manifest_frame(manifest: Path, folder: bool, image_column: str, label_column: str | None):
    """The manifest as read: a folder's images as one column (and their sub-folder labels), or the CSV."""
    if folder:
        df = pd.DataFrame({image_column: pd.Series(image_folder_rows(manifest), dtype=object)})
        if label_column:
            df[label_column] = [p.split("/")[0] if "/" in p else None for p in df[image_column]]
        return df
    if not manifest.is_file():
        raise UserError(f"{manifest}: manifest not found")
    try:
        return pd.read_csv(manifest)
    except (pd.errors.ParserError, pd.errors.EmptyDataError, UnicodeDecodeError) as e:
        raise UserError(f"{manifest}: not a readable CSV ({str(e).splitlines()[0]})") from None


def _folder_only(manifest: Path, image_column: str) -> str:
    """Why a column other than the image one cannot be read from an image folder."""
    return (
        f"an image folder has only the column '{image_column}'; write a CSV with `advdiff manifest "
        f"{manifest}` and add the column to it"
    )


def _check_columns(manifest, df, folder: bool, image_column, has_latents: bool, keep, label_column) -> None:
    """The image (or latent), label and `keep` columns must be there."""
    if image_column not in df.columns and not has_latents:
        raise UserError(
            f"{manifest}: no column '{image_column}' (dataset.image_column); "
            f"columns are: {', '.join(map(str, df.columns))}"
        )
    if label_column and label_column not in df.columns:
        raise UserError(
            f"{manifest}: no column '{label_column}' (dataset.label_column); "
            f"columns are: {', '.join(map(str, df.columns))}"
        )
    for column in keep:
        if column not in df.columns:
            raise UserError(
                f"{manifest}: no column '{column}'; "
                + (
                    _folder_only(manifest, image_column)
                    if folder
                    else f"columns are: {', '.join(map(str, df.columns))}"
                )
            )


def _filtered(manifest, df, folder: bool, image_column: str, filters: dict | None):
    """The rows whose every dataset.filters column holds one of its allowed values."""
    for column, allowed in (filters or {}).items():
        if column not in df.columns:
            raise UserError(
                f"{manifest}: dataset.filters.{column}: "
                + (_folder_only(manifest, image_column) if folder else "no such column in the manifest")
            )
        df = df[df[column].isin(allowed)]
    return df


def _resolved_rows(df, base: Path, image_column: str, latent_column: str | None, keep, label_column):
    """The returned frame: row, absolute image_path and latent_path (None where empty or absent), the
    `keep` columns and `label`. `latent_column`: None when the manifest has no latents."""

    def resolve(value):
        if not isinstance(value, str) or not value:
            return None
        p = Path(value)
        return str(p if p.is_absolute() else base / p)

    out = pd.DataFrame({"row": np.arange(len(df))})
    if image_column in df.columns:
        out["image_path"] = pd.Series([resolve(v) for v in df[image_column]], dtype=object)
    else:
        out["image_path"] = pd.Series([None] * len(df), dtype=object)
    out["latent_path"] = pd.Series(
        [resolve(v) for v in df[latent_column]] if latent_column else [None] * len(df), dtype=object
    )
    for column in keep:
        out[column] = df[column].to_numpy()
    if label_column:
        out["label"] = pd.Series(list(df[label_column]), dtype=object)
    return out


def load_image(path: str, size: int, channels: int) -> torch.Tensor:
    """An image as a float tensor (C, size, size) in [-1, 1]."""
    from PIL import Image, UnidentifiedImageError

    try:
        with Image.open(path) as img:
            img = img.convert("L" if channels == 1 else "RGB")
            if img.size != (size, size):
                img = img.resize((size, size), Image.BICUBIC)
            arr = np.asarray(img, dtype=np.float32)
    except FileNotFoundError:
        raise UserError(f"{path}: image not found") from None
    except (UnidentifiedImageError, OSError) as e:
        raise UserError(f"{path}: cannot read image ({type(e).__name__})") from None
    if arr.ndim == 2:
        arr = arr[None]
    else:
        arr = arr.transpose(2, 0, 1)
    if arr.shape[0] != channels:
        raise UserError(f"{path}: expected {channels} channels, got {arr.shape[0]}")
    return torch.from_numpy(arr / 127.5 - 1.0)


class ImageDataset(torch.utils.data.Dataset):
    """Images of a manifest, by row index; returns (row index, image)."""

    def __init__(self, paths: list[str], size: int, channels: int):
        self.paths, self.size, self.channels = list(paths), size, channels

    def __len__(self):
        return len(self.paths)

    def __getitem__(self, i):
        return i, load_image(self.paths[i], self.size, self.channels)


def split_indices(n: int, train_split: float, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """A shuffled train/val split with a fixed seed; val is empty only when train_split is 1."""
    perm = np.random.default_rng(seed).permutation(n)
    n_train = n if train_split >= 1 else min(n - 1, max(1, int(round(n * train_split))))
    return np.sort(perm[:n_train]), np.sort(perm[n_train:])
