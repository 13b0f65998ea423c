"""`advdiff manifest DIR [--out CSV]`: the manifest CSV of a folder of images.

The CSV has one column (`--image-column`, default `image_path` like dataset.image_column) and the same
rows in the same order as using DIR itself as dataset.manifest: every image under DIR, hidden files and
folders skipped, sorted by relative path. Its paths are relative to the CSV's own folder, so the CSV and
the images can be moved together. Default --out: DIR/manifest.csv. Written atomically; an existing file
is replaced.
"""

from __future__ import annotations

import argparse
import os
from pathlib import Path

from trainer.cli.common import one_line_errors
from trainer.cli.flags import Parser
from trainer.core.errors import UserError
from trainer.data.manifest import image_folder_rows
from trainer.files import atomic


def build_parser() -> argparse.ArgumentParser:
    p = Parser(prog="advdiff manifest", description=__doc__)
    p.add_argument("folder", metavar="DIR", help="folder of images (read recursively)")
    p.add_argument(
        "--out",
        default=None,
        metavar="CSV",
        help="the CSV to write (default DIR/manifest.csv); its paths are relative to its folder",
    )
    p.add_argument(
        "--image_column",
        default="image_path",
        metavar="NAME",
        help="name of the CSV's column (match dataset.image_column)",
    )
    return p


def manifest_rows(folder: Path, out: Path, column: str) -> list[dict]:
    """One row per image under `folder`, its path relative to `out`'s folder (POSIX separators)."""
    root, here = folder.resolve(), out.resolve().parent
    rows = []
    for rel in image_folder_rows(folder):
        try:
            rel.encode("utf-8")
        except UnicodeEncodeError:
            raise UserError(
                f"{folder}: {ascii(rel)}: file name is not valid UTF-8, which a CSV cannot hold; "
                f"rename the file, or use the folder itself as dataset.manifest"
            ) from None
        try:
            path = Path(os.path.relpath(root / rel, here)).as_posix()
        except ValueError:  # another drive (Windows): no relative path exists
            path = (root / rel).as_posix()
        rows.append({column: path})
    return rows


def write_manifest(folder, out=None, column: str = "image_path") -> tuple[Path, int]:
    """Write the CSV of `folder`'s images to `out` (default folder/manifest.csv); returns (path, rows)."""
    folder = Path(folder)
    if not folder.is_dir():
        raise UserError(f"{folder}: not a folder (advdiff manifest DIR lists the images under a folder)")
    if not column:
        raise UserError("--image-column: expected a column name, got ''")
    out = Path(out) if out is not None else folder / "manifest.csv"
    if out.is_dir():
        raise UserError(f"--out {out}: is a folder; expected the path of the CSV to write")
    rows = manifest_rows(folder, out, column)
    atomic.write_csv(rows, out, fieldnames=[column])
    return out, len(rows)


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)

    def call():
        out, n = write_manifest(args.folder, args.out, args.image_column)
        print(f"advdiff manifest: {n} images under {args.folder} -> {out}")

    return one_line_errors(call)
