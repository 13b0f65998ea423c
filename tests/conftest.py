"""Fixtures only; the shared helpers they use (and tests import) are in helpers.py."""

import os
import sys
from pathlib import Path

import pytest

# tests/ on sys.path whatever the import mode, so that `from helpers import ...` (and `from tools import
# ...`) works; pytest's default "prepend" mode already puts it there, tests/ having no __init__.py.
if str(Path(__file__).resolve().parent) not in sys.path:
    sys.path.insert(0, str(Path(__file__).resolve().parent))

from helpers import FAKE_SRUN, tiny_config, write_config  # noqa: E402


@pytest.fixture(scope="session")
def digits_manifest(tmp_path_factory):
    from trainer.data.digits import build_digits

    return build_digits(tmp_path_factory.mktemp("digits"))


@pytest.fixture(scope="session")
def small_ae(tmp_path_factory):
    """A freshly initialised (untrained) 32x32x1 -> 8x8x4 AutoencoderKL as a diffusers folder."""
    import torch

    from models.autoencoder import build_autoencoder

    torch.manual_seed(0)
    path = tmp_path_factory.mktemp("ae") / "autoencoder"
    build_autoencoder().save_pretrained(str(path))
    return path


@pytest.fixture(scope="session")
def stage1_ckpt(tmp_path_factory, digits_manifest, small_ae):
    """A tiny stage-1 checkpoint (micro UNet, a few steps) on a subset of the digits."""
    from trainer.config.load import load_config
    from trainer.parallel.accelerator import build_accelerator
    from trainer.stage1.diffusion_trainer import DiffusionTrainer

    root = tmp_path_factory.mktemp("stage1")
    cfg = load_config(tiny_config(root, digits_manifest, small_ae))
    DiffusionTrainer(cfg, build_accelerator("cpu")).fit()
    return cfg.out_dir / "stage1" / "checkpoint_best.pt"


@pytest.fixture()
def fake_slurm(tmp_path):
    """Stand-ins for srun, scontrol and sbatch on PATH, and a launch.sh config: (cfg, out, fake_dir, env)."""
    bin_dir, fake_dir = tmp_path / "bin", tmp_path / "fake"
    bin_dir.mkdir()
    fake_dir.mkdir()
    (bin_dir / "srun").write_text(FAKE_SRUN)
    (bin_dir / "scontrol").write_text('#!/bin/sh\necho "$@" >> "$FAKE_DIR/scontrol"\n')
    (bin_dir / "sbatch").write_text('#!/bin/sh\necho "$@" > "$FAKE_DIR/sbatch"\necho "4242;cluster"\n')
    for f in bin_dir.iterdir():
        f.chmod(0o755)
    cfg = write_config(tmp_path / "exp")
    out = tmp_path / "exp" / "out"
    env = {"PATH": f"{bin_dir}:{os.environ['PATH']}", "FAKE_DIR": str(fake_dir), "FAKE_OUT": str(out)}
    return cfg, out, fake_dir, env
