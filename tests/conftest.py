"""Fixtures only; the shared helpers they use (and tests import) are in helpers.py."""

import os
import sys
from pathlib import Path

import pytest

# The suite by layer: unit/ (pure functions), component/ (stages and parts trained in process), e2e/
# (launches, kill -9, SLURM, DeepSpeed, the benches and the demo). tests/ and each layer's folder are on
# sys.path whatever the import mode, so that `from helpers import ...`, `from tools import ...` and an
# end-to-end test's `from test_distribution_matching import ...` (a component module's config builders)
# work in every xdist worker, whichever file it collected first.
_HERE = Path(__file__).resolve().parent
for _folder in (_HERE, *(_HERE / layer for layer in ("unit", "component", "e2e"))):
    if str(_folder) not in sys.path:
        sys.path.insert(0, str(_folder))

from helpers import FAKE_SRUN, conditional_stage1_config, tiny_config, write_config  # noqa: E402

# Under pytest-xdist (pyproject's addopts: one worker per core, at most 4) every worker is one process on
# one core: torch and every subprocess a test starts use one thread, so that two workers never fight over
# the cores (OpenMP threads that spin-wait for a busy core are many times slower than one thread).
if os.environ.get("PYTEST_XDIST_WORKER"):
    os.environ["OMP_NUM_THREADS"] = "1"


def pytest_configure(config):
    if os.environ.get("PYTEST_XDIST_WORKER"):
        import torch

        torch.set_num_threads(1)


def pytest_collection_finish(session):
    """Collection has imported torch, diffusers and the trainer: move what exists now out of the cyclic
    garbage collector's view (gc.freeze). Each in-process stage-2 run ends its phases with accelerate's
    free_memory(), a full gc.collect() that would otherwise walk those modules' objects every time
    (about 0.2 s each); the objects stay alive as they would anyway."""
    import gc

    gc.collect()
    gc.freeze()


def pytest_collection_modifyitems(config, items):
    """Under xdist the slow tests go first (a stable sort, the same in every worker): the longest runs
    start while the short ones can still fill the other workers, rather than one of them ending the run
    alone."""
    if os.environ.get("PYTEST_XDIST_WORKER"):
        items.sort(key=lambda item: item.get_closest_marker("slow") is None)


def shared(tmp_path_factory, name: str, build):
    """build(folder) -> a path, run once per test session however many xdist workers there are: the first
    worker to ask builds it under a file lock, in a folder every worker of the session shares, and the
    others reuse it. Without xdist: built in a fresh temporary folder."""
    if not os.environ.get("PYTEST_XDIST_WORKER"):
        return build(tmp_path_factory.mktemp(name))
    import shutil

    from filelock import FileLock

    root = tmp_path_factory.getbasetemp().parent  # this session's, above each worker's own
    folder, done = root / f"shared_{name}", root / f"shared_{name}.done"
    with FileLock(str(root / f"shared_{name}.lock")):
        if done.is_file():
            return Path(done.read_text())
        shutil.rmtree(folder, ignore_errors=True)
        folder.mkdir()
        result = build(folder)
        done.write_text(str(result))
        return result


@pytest.fixture(scope="session")
def digits_manifest(tmp_path_factory):
    from trainer.data.digits import build_digits

    return shared(tmp_path_factory, "digits", build_digits)


@pytest.fixture(scope="session")
def small_ae(tmp_path_factory):
    """A freshly initialised (untrained) 32x32x1 -> 8x8x4 AutoencoderKL as a diffusers folder."""
    import torch

    from models.autoencoder import build_autoencoder

    def build(folder):
        torch.manual_seed(0)
        build_autoencoder().save_pretrained(str(folder / "autoencoder"))
        return folder / "autoencoder"

    return shared(tmp_path_factory, "ae", build)


@pytest.fixture(scope="session")
def stage1_ckpt(tmp_path_factory, digits_manifest, small_ae):
    """A tiny stage-1 checkpoint (micro UNet, a few steps) on a subset of the digits."""
    from trainer.config.load import load_config
    from trainer.parallel.accelerator import build_accelerator
    from trainer.stage1.diffusion_trainer import DiffusionTrainer

    def build(root):
        cfg = load_config(tiny_config(root, digits_manifest, small_ae))
        DiffusionTrainer(cfg, build_accelerator("cpu")).fit()
        return cfg.out_dir / "stage1" / "checkpoint_best.pt"

    return shared(tmp_path_factory, "stage1", build)


@pytest.fixture(scope="session")
def conditional_stage1(tmp_path_factory, digits_manifest, small_ae):
    """A tiny class-conditional stage-1 model of the digits 0-3 (label dropout 0.1)."""
    from trainer.config.load import load_config
    from trainer.parallel.accelerator import build_accelerator
    from trainer.stage1.diffusion_trainer import DiffusionTrainer

    def build(root):
        cfg = load_config(conditional_stage1_config(root, digits_manifest, small_ae))
        DiffusionTrainer(cfg, build_accelerator("cpu")).fit()
        return cfg.out_dir / "stage1" / "checkpoint_best.pt"

    return shared(tmp_path_factory, "conditional_stage1", build)


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
