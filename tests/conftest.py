import os
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="session")
def digits_manifest(tmp_path_factory):
    from trainer.digits import build_digits

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


def tiny_config(tmp_path: Path, manifest: Path, ae: Path, **training) -> Path:
    """A stage-1 config small enough for tests: micro UNet, a few steps."""
    data = {
        "experiment": {"name": "t", "save_path": str(tmp_path / "out")},
        "dataset": {"manifest": str(manifest), "filters": {"label": [0, 1, 2, 3]}},
        "autoencoder": {"checkpoint": str(ae), "scaling": "measure"},
        "unet": {"preset": "micro"},
        "training": {"batch_size": 16, "learning_rate": 2e-3, "weight_decay": 0.0, "max_steps": 12,
                     "eval_interval": 6, "log_interval": 3, "ema_decay": 0.9, "sample_steps": 3,
                     "scheduler": {"warmup_steps": 2}, **training},
    }
    tmp_path.mkdir(parents=True, exist_ok=True)
    path = tmp_path / "cfg.yaml"
    path.write_text(yaml.safe_dump(data))
    return path


def run_cli(*args, env=None, timeout=600):
    full_env = {**os.environ, "PYTHONUNBUFFERED": "1", **(env or {})}
    return subprocess.run([sys.executable, *args], capture_output=True, text=True, env=full_env, timeout=timeout,
                          cwd=REPO)


def free_port() -> int:
    """A port nobody listens on now: each launch gets its own, so a previous run's rendezvous socket
    (still closing) or a concurrent run can never collide with it."""
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def accelerate_launch(nproc: int, *args, env=None, timeout=600):
    """`accelerate launch` on CPU with `nproc` processes (gloo, DDP)."""
    launcher = [sys.executable, "-m", "accelerate.commands.launch", "--num_machines", "1",
                "--num_processes", str(nproc), "--main_process_port", str(free_port())]
    if nproc > 1:
        launcher += ["--multi_gpu"]
    full_env = {**os.environ, "PYTHONUNBUFFERED": "1", "ACCELERATE_USE_CPU": "1", "OMP_NUM_THREADS": "1",
                **(env or {})}
    return subprocess.run(launcher + list(args), capture_output=True, text=True, env=full_env, timeout=timeout,
                          cwd=REPO)


@pytest.fixture(scope="session")
def stage1_ckpt(tmp_path_factory, digits_manifest, small_ae):
    """A tiny stage-1 checkpoint (micro UNet, a few steps) on a subset of the digits."""
    from trainer.config import load_config
    from trainer.runtime import build_accelerator
    from trainer.stage1 import DiffusionTrainer

    root = tmp_path_factory.mktemp("stage1")
    cfg = load_config(tiny_config(root, digits_manifest, small_ae))
    DiffusionTrainer(cfg, build_accelerator("cpu")).fit()
    return cfg.out_dir / "stage1" / "checkpoint_best.pt"


def stage2_config(tmp_path: Path, manifest: Path, ae: Path, ckpt: Path, stage2=None, loss=None,
                  discriminator=None) -> Path:
    """A stage-2 config small enough for tests (8x8x4 latents, micro UNet)."""
    data = {
        "experiment": {"name": "t2", "save_path": str(tmp_path / "out")},
        "diffusion": {"stage1_checkpoint": str(ckpt)},
        "autoencoder": {"checkpoint": str(ae)},
        "dataset": {"manifest": str(manifest)},
        "discriminator": {"config": {"latent_channels": 4, "base_channels": 8, "num_layers": 2},
                          "training": {"batch_size": 8, "epochs": 2, **(discriminator or {})}},
        "training": {"batch_size": 8, "learning_rate": 1e-3, "weight_decay": 0.0, "ema_decay": 0.9,
                     "loss": {"type": "CompositeLoss", "losses": loss or [
                         {"type": "MSELoss", "key": "pred_noise", "target": "noise", "weight": 1.0},
                         {"type": "DiscriminatorLoss", "key": "latent", "target": None, "weight": 0.1}]}},
        "stage2": {"num_samples": 24, "num_iterations": 1, "diffusion_epochs": 2, "generation_steps": 3,
                   "generation_batch_size": 8, "val_samples": 6, "grid_samples": 4, **(stage2 or {})},
    }
    tmp_path.mkdir(parents=True, exist_ok=True)
    path = tmp_path / "stage2.yaml"
    path.write_text(yaml.safe_dump(data))
    return path
