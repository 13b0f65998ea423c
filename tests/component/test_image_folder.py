"""A folder of images as dataset.manifest, and `advdiff manifest DIR` that writes its CSV: the recursive
listing and its order, the same rows and latents as that CSV in stages 0 and 2 (`advdiff validate` and
the real-latent encoding), and one line with exit code 2 for each bad input."""

import os
import shutil

import numpy as np
import pandas as pd
import pytest
import torch
import yaml
from helpers import run_cli, stage2_config
from PIL import Image

from trainer.core.errors import UserError
from trainer.data.manifest import list_images, read_manifest

# name -> format: nested folders, mixed-case suffixes, one JPEG and one BMP among the PNGs, and a folder whose
# name ends in an image suffix (a folder, not an image: its contents are listed)
IMAGES = {
    "zeta.png": "PNG",
    "Alpha.PNG": "PNG",
    "a.Png": "PNG",
    "b/02.png": "PNG",
    "b/10.png": "PNG",
    "b/deep/er/03.png": "PNG",
    "b-c.png": "PNG",
    "c/photo.JPG": "JPEG",
    "c/scan.bmp": "BMP",
    "dir.png/inner.png": "PNG",
    "b/01.pNg": "PNG",
    "c/x.webp_not": None,
    "c/notes.txt": None,
    "README": None,
    ".hidden.png": "PNG",
    ".cache/skipped.png": "PNG",
    "b/.also_hidden.PNG": "PNG",
}
# sorted by the POSIX relative path ('-' < '.' < '/' < digits < upper case < lower case)
EXPECTED = [
    "Alpha.PNG",
    "a.Png",
    "b-c.png",
    "b/01.pNg",
    "b/02.png",
    "b/10.png",
    "b/deep/er/03.png",
    "c/photo.JPG",
    "c/scan.bmp",
    "dir.png/inner.png",
    "zeta.png",
]


def make_folder(root, names=None):
    """The IMAGES tree under root: each image 32x32 grey, its pixels seeded by its name (not by the order
    in which the files are written)."""
    for name in names or IMAGES:
        path = root / name
        path.parent.mkdir(parents=True, exist_ok=True)
        fmt = IMAGES[name]
        if fmt is None:
            path.write_text("not an image")
            continue
        rng = np.random.default_rng(sum(map(ord, name)) * 7919 + len(name))
        Image.fromarray(rng.integers(0, 256, (32, 32), dtype=np.uint8)).save(path, format=fmt)
    return root


@pytest.fixture
def folder(tmp_path):
    return make_folder(tmp_path / "tree" / "imgs")


def test_listing_is_recursive_case_insensitive_sorted_and_skips_hidden(folder):
    assert list_images(folder) == EXPECTED
    rows = read_manifest(folder, "image_path")
    assert rows["image_path"].tolist() == [str(folder.resolve() / p) for p in EXPECTED]
    assert rows["row"].tolist() == list(range(len(EXPECTED))) and rows["latent_path"].isna().all()


def test_order_does_not_depend_on_the_directory_order(tmp_path, monkeypatch):
    """The filesystem's listing order is arbitrary; the rows' order must not follow it."""
    a = make_folder(tmp_path / "a")
    b = make_folder(tmp_path / "b", list(reversed(IMAGES)))  # created in the opposite order
    real_scandir = os.scandir

    class Reversed:
        def __init__(self, path):
            with real_scandir(path) as it:
                self.entries = iter(sorted(it, key=lambda e: e.name, reverse=True))

        def __enter__(self):
            return self

        def __exit__(self, *exc):
            return False

        def __iter__(self):
            return self

        def __next__(self):
            return next(self.entries)

    forward = list_images(a)
    monkeypatch.setattr(os, "scandir", Reversed)
    assert list_images(a) == list_images(b) == forward == EXPECTED


def test_symlink_loop_is_read_once(folder):
    (folder / "b" / "loop").symlink_to(folder, target_is_directory=True)
    assert list_images(folder) == EXPECTED


def _manifest(*argv):
    from trainer.cli.main import main

    return main(["manifest", *map(str, argv)])


def test_manifest_command_writes_the_folder_rows_relative_to_the_csv(folder, tmp_path, capsys):
    assert _manifest(folder) == 0
    csv = folder / "manifest.csv"
    assert f"{len(EXPECTED)} images" in capsys.readouterr().out
    assert pd.read_csv(csv)["image_path"].tolist() == EXPECTED
    pd.testing.assert_frame_equal(read_manifest(csv, "image_path"), read_manifest(folder, "image_path"))
    assert list_images(folder) == EXPECTED  # the CSV written into the folder is not an image

    # elsewhere, both flag spellings: paths relative to the CSV's folder, so the pair can be moved
    for flags in (
        ["--out", tmp_path / "tree" / "lists" / "m.csv", "--image_column", "img"],
        ["--out", tmp_path / "tree" / "lists" / "m2.csv", "--image-column", "img"],
    ):
        assert _manifest(folder, *flags) == 0
        out = flags[1]
        assert pd.read_csv(out)["img"].tolist() == [f"../imgs/{p}" for p in EXPECTED]
    shutil.move(tmp_path / "tree", tmp_path / "moved")
    moved = read_manifest(tmp_path / "moved" / "lists" / "m.csv", "img")["image_path"]
    assert [os.path.realpath(p) for p in moved] == [
        str((tmp_path / "moved" / "imgs" / p).resolve()) for p in EXPECTED
    ]


def test_folder_and_its_csv_train_the_same_stage0(folder, tmp_path):
    from trainer.config.load import load_config
    from trainer.parallel.accelerator import build_accelerator
    from trainer.stage0.autoencoder_trainer import AutoencoderTrainer

    assert _manifest(folder) == 0
    weights = []
    for name, manifest in (("folder", folder), ("csv", folder / "manifest.csv")):
        path = tmp_path / f"{name}.yaml"
        path.write_text(
            yaml.safe_dump(
                {
                    "experiment": {"save_path": str(tmp_path / name)},
                    "dataset": {"manifest": str(manifest)},
                    "autoencoder": {
                        "model": {"block_out_channels": [8, 8], "norm_num_groups": 4},
                        "training": {
                            "max_steps": 2,
                            "batch_size": 4,
                            "eval_interval": 2,
                            "log_interval": 1,
                            "warmup_steps": 1,
                        },
                    },
                }
            )
        )
        trainer = AutoencoderTrainer(load_config(path), build_accelerator("cpu"))
        assert trainer.rows["image_path"].tolist() == [str(folder.resolve() / p) for p in EXPECTED]
        trainer.fit()
        weights.append(
            torch.load(tmp_path / name / "stage0" / "autoencoder_latest.pt", weights_only=True)["state_dict"]
        )
    assert weights[0].keys() == weights[1].keys()
    assert all(torch.equal(weights[0][k], weights[1][k]) for k in weights[0])


def test_folder_and_its_csv_give_stage1_the_same_latents(folder, tmp_path, small_ae):
    from trainer.config.load import load_config
    from trainer.parallel.accelerator import build_accelerator
    from trainer.stage1.diffusion_trainer import DiffusionTrainer

    assert _manifest(folder) == 0
    latents = []
    for name, manifest in (("folder", folder), ("csv", folder / "manifest.csv")):
        path = tmp_path / f"{name}.yaml"
        path.write_text(
            yaml.safe_dump(
                {
                    "experiment": {"save_path": str(tmp_path / name)},
                    "dataset": {"manifest": str(manifest)},
                    "autoencoder": {"checkpoint": str(small_ae), "scaling": "measure"},
                    "unet": {"preset": "micro"},
                    "training": {"batch_size": 4, "max_steps": 1},
                }
            )
        )
        latents.append(DiffusionTrainer(load_config(path), build_accelerator("cpu")).latents)
    assert latents[0].shape[0] == len(EXPECTED) and torch.equal(latents[0], latents[1])


def test_stage2_validate_and_real_latents_from_a_folder_equal_its_csv(
    folder, tmp_path, small_ae, stage1_ckpt, capsys
):
    from models.autoencoder import LatentScaling
    from trainer.cli.main import main
    from trainer.config.load import load_config
    from trainer.data.latents import LatentCodec
    from trainer.parallel.accelerator import build_accelerator
    from trainer.stage2.checks import check_stage2
    from trainer.stage2.generation import choose_real_rows

    assert _manifest(folder) == 0
    small = {"num_samples": 8, "val_samples": 2, "grid_samples": 0}
    latents = []
    for name, manifest in (("folder", folder), ("csv", folder / "manifest.csv")):
        cfg_path = stage2_config(tmp_path / name, manifest, small_ae, stage1_ckpt, stage2=small)
        assert main(["validate", str(cfg_path)]) == 0, capsys.readouterr().err
        assert f"{len(EXPECTED)} manifest rows" in capsys.readouterr().out
        cfg = load_config(cfg_path)
        facts = check_stage2(cfg)
        picked = choose_real_rows(len(facts.rows), 8, cfg.training.seed, 0, False)
        codec = LatentCodec(
            build_accelerator("cpu"),
            small_ae,
            LatentScaling(scale=1.0, shift=0.0),
            facts.latent_shape,
            resolution=None,
            batch_size=3,
        )
        latents.append(codec.encode(facts.rows.iloc[picked]))
    assert latents[0].shape == (8, *facts.latent_shape)
    assert torch.equal(latents[0], latents[1])
    assert not torch.equal(latents[0][0], latents[0][1])  # distinct images, so the order is tested too


# -- bad input: one line naming the folder or field, exit code 2
# -----------------------------------------------
def _stage0_config(tmp_path, manifest, filters=None):
    path = tmp_path / "bad.yaml"
    path.write_text(
        yaml.safe_dump(
            {  # tiny, should a bad input ever get past the checks
                "experiment": {"save_path": str(tmp_path / "out")},
                "dataset": {"manifest": str(manifest), "filters": filters or {}},
                "autoencoder": {
                    "model": {"block_out_channels": [8, 8], "norm_num_groups": 4},
                    "training": {"max_steps": 1, "batch_size": 2, "eval_interval": 1},
                },
            }
        )
    )
    return path


SUFFIXES = (
    "expected .bmp, .gif, .jpeg, .jpg, .png, .tif, .tiff or .webp, any case; "
    "hidden files and folders are skipped"
)


def _no_images(path):
    return f"{path}: no image files in this folder or its subfolders ({SUFFIXES})"


def c_empty_folder(tmp_path):
    (tmp_path / "empty").mkdir()
    return ["stage0", _stage0_config(tmp_path, tmp_path / "empty")], _no_images(tmp_path / "empty")


def c_only_hidden_and_other_files(tmp_path):
    make_folder(
        tmp_path / "d", [".hidden.png", ".cache/skipped.png", "c/notes.txt", "README", "c/x.webp_not"]
    )
    return ["stage0", _stage0_config(tmp_path, tmp_path / "d")], _no_images(tmp_path / "d")


def c_filter_on_a_folder(tmp_path):
    make_folder(tmp_path / "d")
    return (
        ["stage0", _stage0_config(tmp_path, tmp_path / "d", {"label": [1]})],
        f"{tmp_path / 'd'}: dataset.filters.label: an image folder has only the column 'image_path'; "
        f"write a CSV with `advdiff manifest {tmp_path / 'd'}` and add the column to it",
    )


def c_manifest_of_a_file(tmp_path):
    (tmp_path / "f.png").write_bytes(b"")
    return (
        ["manifest", tmp_path / "f.png"],
        f"{tmp_path / 'f.png'}: not a folder (advdiff manifest DIR lists the images under a folder)",
    )


def c_manifest_of_an_empty_folder(tmp_path):
    (tmp_path / "empty").mkdir()
    (tmp_path / "empty" / "dataset_info.json").write_text("{}")
    return ["manifest", tmp_path / "empty"], (
        _no_images(tmp_path / "empty")
        + "; it looks like a Hugging Face `datasets` folder, which advdiff does "
        "not read: save its images as files"
    )


def c_manifest_out_is_a_folder(tmp_path):
    make_folder(tmp_path / "d", ["a.Png"])
    return (
        ["manifest", tmp_path / "d", "--out", tmp_path / "d"],
        f"--out {tmp_path / 'd'}: is a folder; expected the path of the CSV to write",
    )


CASES = [v for k, v in sorted(globals().items()) if k.startswith("c_")]


@pytest.mark.parametrize("case", CASES, ids=[f.__name__[2:] for f in CASES])
def test_bad_input_is_one_line_and_exit_2(case, tmp_path, capsys):
    from trainer.cli.main import main

    argv, expected = case(tmp_path)
    code = main([str(a) for a in argv])
    err = capsys.readouterr().err
    assert code == 2, err
    assert [ln for ln in err.splitlines() if ln.startswith("advdiff: error:")] == [
        f"advdiff: error: {expected}"
    ]
    assert "Traceback" not in err
    assert (
        not (tmp_path / "d" / "manifest.csv").exists() and not (tmp_path / "empty" / "manifest.csv").exists()
    )


def test_validate_names_the_filter_on_a_folder(folder, tmp_path, small_ae, stage1_ckpt, capsys):
    from trainer.cli.main import main

    cfg = stage2_config(tmp_path, folder, small_ae, stage1_ckpt, stage2={"num_samples": 8})
    data = yaml.safe_load(cfg.read_text())
    data["dataset"]["filters"] = {"split": ["train"]}
    cfg.write_text(yaml.safe_dump(data))
    assert main(["validate", str(cfg)]) == 2
    assert (
        f"advdiff: error: {folder}: dataset.filters.split: an image folder has only the column 'image_path'; "
        f"write a CSV with `advdiff manifest {folder}` and add the column to it"
    ) in capsys.readouterr().err.splitlines()


def test_filter_on_the_image_column_keeps_those_rows(folder):
    rows = read_manifest(folder, "image_path", {"image_path": ["b/10.png", "a.Png", "missing.png"]})
    assert rows["image_path"].tolist() == [str(folder.resolve() / p) for p in ("a.Png", "b/10.png")]


def test_a_label_column_is_refused_in_one_line(folder):
    with pytest.raises(
        UserError, match=r"no column 'label'; an image folder has only the column 'image_path'"
    ):
        read_manifest(folder, "image_path", keep=("label",))


def test_process_exit_code_and_no_traceback(tmp_path):
    (tmp_path / "empty").mkdir()
    proc = run_cli("-m", "trainer.cli", "manifest", str(tmp_path / "empty"))
    assert proc.returncode == 2
    assert proc.stderr.strip() == f"advdiff: error: {_no_images(tmp_path / 'empty')}"
    assert proc.stdout == ""
