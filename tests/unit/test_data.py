"""Manifest reading, filters, relative paths, image loading, splits and index sharding."""

import numpy as np
import pandas as pd
import pytest
import torch
from PIL import Image

from trainer.core.errors import UserError
from trainer.data.manifest import load_image, read_manifest, split_indices
from trainer.parallel.collectives import shard_range


@pytest.fixture
def manifest(tmp_path):
    (tmp_path / "imgs").mkdir()
    rows = []
    for i in range(6):
        Image.fromarray(np.full((10, 10, 3), i * 40, dtype=np.uint8)).save(tmp_path / "imgs" / f"{i}.png")
        rows.append({"img": f"imgs/{i}.png", "is_empty": i == 5, "split": "a" if i % 2 else "b"})
    pd.DataFrame(rows).to_csv(tmp_path / "m.csv", index=False)
    return tmp_path / "m.csv"


def test_filters_and_relative_paths(manifest):
    df = read_manifest(manifest, "img", {"is_empty": [False], "split": ["a"]})
    assert len(df) == 2  # rows 1 and 3 (row 5 is empty)
    assert df["image_path"].tolist() == [
        str(manifest.parent / "imgs" / "1.png"),
        str(manifest.parent / "imgs" / "3.png"),
    ]


def test_missing_column_is_a_clear_error(manifest):
    with pytest.raises(UserError, match="no column 'image_path'"):
        read_manifest(manifest, "image_path")
    with pytest.raises(UserError, match="dataset.filters.label: no such column"):
        read_manifest(manifest, "img", {"label": [1]})


def test_latent_column_used_where_present(tmp_path):
    torch.save(torch.zeros(4, 2, 2), tmp_path / "z0.pt")
    pd.DataFrame({"image_path": ["a.png", "b.png"], "latent_path": ["z0.pt", None]}).to_csv(
        tmp_path / "m.csv", index=False
    )
    df = read_manifest(tmp_path / "m.csv", "image_path", None, "latent_path")
    assert df["latent_path"].tolist()[0] == str(tmp_path / "z0.pt")
    assert df["latent_path"].tolist()[1] is None


def test_load_image_resizes_and_scales(manifest):
    x = load_image(str(manifest.parent / "imgs" / "0.png"), 16, 3)
    assert x.shape == (3, 16, 16) and float(x.min()) == -1.0
    g = load_image(str(manifest.parent / "imgs" / "5.png"), 8, 1)
    assert g.shape == (1, 8, 8) and -1 <= float(g.min()) <= float(g.max()) <= 1


def test_corrupt_image_is_a_clear_error(tmp_path):
    (tmp_path / "bad.png").write_bytes(b"not a png")
    with pytest.raises(UserError, match="bad.png: cannot read image"):
        load_image(str(tmp_path / "bad.png"), 8, 1)


def test_split_is_shuffled_fixed_and_disjoint():
    tr, va = split_indices(100, 0.8, seed=3)
    assert len(tr) == 80 and len(va) == 20 and not set(tr) & set(va)
    assert va.max() < 99 or va.min() > 0  # not simply the tail
    assert list(va) != list(range(80, 100))
    tr2, va2 = split_indices(100, 0.8, seed=3)
    assert (va == va2).all()


@pytest.mark.parametrize("n, world", [(37, 2), (5, 4), (3, 8), (100, 3)])
def test_shards_cover_each_index_exactly_once(n, world):
    seen = [i for r in range(world) for i in shard_range(n, r, world)]
    assert seen == list(range(n))
