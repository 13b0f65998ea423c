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


def accelerate_launch(nproc: int, *args, env=None, timeout=600):
    """`accelerate launch` on CPU with `nproc` processes (gloo, DDP)."""
    launcher = [sys.executable, "-m", "accelerate.commands.launch", "--num_machines", "1",
                "--num_processes", str(nproc), "--main_process_port", str(29500 + os.getpid() % 1000)]
    if nproc > 1:
        launcher += ["--multi_gpu"]
    full_env = {**os.environ, "PYTHONUNBUFFERED": "1", "ACCELERATE_USE_CPU": "1", "OMP_NUM_THREADS": "1",
                **(env or {})}
    return subprocess.run(launcher + list(args), capture_output=True, text=True, env=full_env, timeout=timeout,
                          cwd=REPO)
