"""Shared test helpers that are not fixtures: paths, subprocess runners, small config builders and the
stand-ins for SLURM's commands. The fixtures live in conftest.py; tests import these with
`from helpers import ...` (tests/ is on sys.path: pytest's default import mode puts it there, as the
folder of conftest.py, and conftest.py makes sure of it under any import mode).

Scripts that tests run in their own processes are in tests/tools/ (see TOOLS)."""

import os
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import yaml

REPO = Path(__file__).resolve().parents[1]
TESTS = REPO / "tests"
TOOLS = TESTS / "tools"
# Runs an advdiff module and records which files each process writes (ADVDIFF_AUDIT_DIR) and/or the
# dtypes forward passes compute in (ADVDIFF_PROBE_OUT).
LAUNCH_PROBE = str(TOOLS / "launch_probe.py")
LAUNCH_SH = REPO / "launch.sh"
# Set to 1, every test runs the real `accelerate launch` (and python) instead of warm processes.
REAL_LAUNCHER_ENV = "ADVDIFF_TEST_REAL_LAUNCHER"


# -- config builders -----------------------------------------------------------------------------------
def tiny_config(tmp_path: Path, manifest: Path, ae: Path, **training) -> Path:
    """A stage-1 config small enough for tests: micro UNet, a few steps."""
    data = {
        "experiment": {"name": "t", "save_path": str(tmp_path / "out")},
        "dataset": {"manifest": str(manifest), "filters": {"label": [0, 1, 2, 3]}},
        "autoencoder": {"checkpoint": str(ae), "scaling": "measure"},
        "unet": {"preset": "micro"},
        "training": {
            "batch_size": 16,
            "learning_rate": 2e-3,
            "weight_decay": 0.0,
            "max_steps": 12,
            "eval_interval": 6,
            "log_interval": 3,
            "ema_decay": 0.9,
            "sample_steps": 3,
            "scheduler": {"warmup_steps": 2},
            **training,
        },
    }
    tmp_path.mkdir(parents=True, exist_ok=True)
    path = tmp_path / "cfg.yaml"
    path.write_text(yaml.safe_dump(data))
    return path


def stage2_config(
    tmp_path: Path, manifest: Path, ae: Path, ckpt: Path, stage2=None, loss=None, discriminator=None
) -> Path:
    """A stage-2 config small enough for tests (8x8x4 latents, micro UNet)."""
    data = {
        "experiment": {"name": "t2", "save_path": str(tmp_path / "out")},
        "diffusion": {"stage1_checkpoint": str(ckpt)},
        "autoencoder": {"checkpoint": str(ae)},
        "dataset": {"manifest": str(manifest)},
        "discriminator": {
            "config": {"latent_channels": 4, "base_channels": 8, "num_layers": 2},
            "training": {"batch_size": 8, "epochs": 2, **(discriminator or {})},
        },
        "training": {
            "batch_size": 8,
            "learning_rate": 1e-3,
            "weight_decay": 0.0,
            "ema_decay": 0.9,
            "loss": {
                "type": "CompositeLoss",
                "losses": loss
                or [
                    {"type": "MSELoss", "key": "pred_noise", "target": "noise", "weight": 1.0},
                    {"type": "DiscriminatorLoss", "key": "latent", "target": None, "weight": 0.1},
                ],
            },
        },
        "stage2": {
            "num_samples": 24,
            "num_iterations": 1,
            "diffusion_epochs": 2,
            "generation_steps": 3,
            "generation_batch_size": 8,
            "val_samples": 6,
            "grid_samples": 4,
            # 32 fixed-seed samples per summary row (the default, 1000, is capped at the ~180 held-out
            # digits): every quality column is still measured; tests of the numbers set their own
            "metric_samples": 32,
            **(stage2 or {}),
        },
    }
    tmp_path.mkdir(parents=True, exist_ok=True)
    path = tmp_path / "stage2.yaml"
    path.write_text(yaml.safe_dump(data))
    return path


def conditional_stage1_config(root: Path, manifest: Path, ae: Path, **unet) -> Path:
    """tiny_config with the digits' labels: a class-conditional micro UNet of the digits 0-3."""
    path = tiny_config(root, manifest, ae)
    data = yaml.safe_load(path.read_text())
    data["dataset"]["label_column"] = "label"
    data["unet"].update({"num_class_embeds": 4, **unet})
    path.write_text(yaml.safe_dump(data))
    return path


def write_config(folder: Path, save_path="out") -> Path:
    """A minimal config for launch.sh, which reads only experiment.name and save_path."""
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / "cfg.yaml"
    path.write_text(yaml.safe_dump({"experiment": {"name": "e", "save_path": save_path}}))
    return path


# -- in-process runs and the stop/resume harness ----------------------------------------------------------
def run_stage2(cfg, stop_after=None, start_iteration=None, overrides=None) -> Path:
    """Stage 2 of `cfg` (a config path) in this process, on the CPU; stopped after `stop_after` fine-tune
    steps when given. Returns the run's folder."""
    from trainer.config.load import load_config
    from trainer.parallel.accelerator import build_accelerator
    from trainer.stage2.run import run

    loaded = load_config(cfg, overrides)
    run(loaded, build_accelerator("cpu"), start_iteration, stop_after)
    return loaded.out_dir


def finetune_alone(cfg, k: int = 0, d: bool = True, return_d: bool = False):
    """Iteration k's fine-tune phase alone, from stage 1's EMA weights, on 24 random latents (seed 0) and,
    with `d`, a fresh latent D drawn after them: what the component tests of the fine-tune train, without
    the phases before it. `cfg`: a config path or a loaded config. return_d: (trainer, D)."""
    import torch

    from models.discriminator import build_discriminator
    from trainer.config.load import load_config
    from trainer.parallel.accelerator import build_accelerator
    from trainer.stage2.generation import stratified_split
    from trainer.stage2.run import setup

    s = setup(load_config(cfg) if isinstance(cfg, (str, Path)) else cfg, build_accelerator("cpu"))
    torch.manual_seed(0)
    real = torch.randn(24, 4, 8, 8)
    critic = build_discriminator(s.cfg.discriminator.config) if d else None
    init = {"raw": s.stage1.weights, "ema": s.stage1.weights}
    trainer = s.finetune_trainer(k, real, stratified_split(24, 0.8, 0, 0, "real"), critic, init)
    return (trainer, critic) if return_d else trainer


def fit_alone(cfg, stop_after=None, **kwargs):
    """finetune_alone's trainer, fitted (stopped after `stop_after` steps when given)."""
    trainer = finetune_alone(cfg, **kwargs)
    trainer.stop_after = stop_after
    trainer.fit()
    return trainer


def stop_then_resume(cfg, stop_after: int, run=run_stage2, between=None):
    """The stop/resume harness: `run(cfg, stop_after=n)`, then `between()` (a log reset, say), then
    `run(cfg)` again on the same folder, which resumes. Returns both results (stopped, resumed); a test
    compares the resumed one with an uninterrupted `run(other_cfg)`."""
    stopped = run(cfg, stop_after=stop_after)
    if between is not None:
        between()
    return stopped, run(cfg)


# -- processes -----------------------------------------------------------------------------------------
def run_cli(*args, env=None, timeout=600, warm=True):
    """`python *args` in its own process. warm (the default): forked from a preloaded interpreter
    (tests/tools/warm.py), which saves the imports; warm=False a fresh interpreter, where that is what is
    tested (the bad-input catalogue's exit codes and stderr)."""
    full_env = {**os.environ, "PYTHONUNBUFFERED": "1", **(env or {})}
    if warm and os.environ.get(REAL_LAUNCHER_ENV) != "1":
        from tools.warm import run_python

        return run_python(list(args), full_env, REPO, timeout)
    return subprocess.run(
        [sys.executable, *args], capture_output=True, text=True, env=full_env, timeout=timeout, cwd=REPO
    )


@dataclass
class Finished:
    """What a run left: its exit code and its log (as subprocess.run's result has them)."""

    returncode: int
    stdout: str
    stderr: str


def cli(capfd, *args) -> Finished:
    """`advdiff *args` in this process (trainer.cli.main, the command line's entry point), its output read
    from pytest's `capfd`: for tests of what a command says and does, where a fresh interpreter is not
    what is tested (test_bad_inputs.py keeps a real process for exit code and stderr)."""
    from trainer.cli.main import main

    capfd.readouterr()
    code = main([str(a) for a in args])
    out, err = capfd.readouterr()
    return Finished(code, out, err)


def stage2_at(nproc: int, cfg: Path, *flags, capfd=None, timeout=300):
    """`advdiff stage2 cfg --device cpu *flags` at `nproc` CPU processes: 2 or more through `accelerate
    launch`; 1 in this process (the reference of a world-size test: the code path that `accelerate launch
    --num_processes 1` runs, without a launcher's and a worker's start-up), its log read from `capfd`."""
    args = (str(cfg), "--device", "cpu", *flags)
    if nproc > 1:
        return accelerate_launch(nproc, "-m", "trainer.stage2", *args, timeout=timeout)
    from trainer.cli.stages import stage2_main

    capfd.readouterr()
    code = stage2_main(list(args))
    out, err = capfd.readouterr()
    return Finished(code, out, err)


def free_port() -> int:
    """A port nobody listens on now: each launch gets its own, so a previous run's rendezvous socket
    (still closing) or a concurrent run can never collide with it."""
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def accelerate_launch(nproc: int, *args, env=None, timeout=600, warm=True):
    """`accelerate launch` on CPU with `nproc` processes (gloo, DDP). warm (the default): the ranks fork
    from a preloaded interpreter with the environment the launcher would give them (tests/tools/warm.py);
    warm=False runs the real launcher, for the tests of launching itself."""
    launcher = ["--num_machines", "1", "--num_processes", str(nproc), "--main_process_port", str(free_port())]
    if nproc > 1:
        launcher += ["--multi_gpu"]
    full_env = {
        **os.environ,
        "PYTHONUNBUFFERED": "1",
        "ACCELERATE_USE_CPU": "1",
        "OMP_NUM_THREADS": "1",
        **(env or {}),
    }
    return _launch(launcher, list(args), full_env, timeout, warm)


def deepspeed_launch(config_name: str, nproc: int, *args, timeout=900, script=None, warm=True):
    """`accelerate launch --config_file accelerate_configs/<config_name>` of `-m trainer.stage2 *args` (or
    of `script *args`) on CPU (DS_ACCELERATOR=cpu, gloo): the DeepSpeed tests' one launcher. warm: as in
    accelerate_launch (DeepSpeed itself is imported by each rank)."""
    env = {**os.environ, "DS_ACCELERATOR": "cpu", "PYTHONUNBUFFERED": "1", "OMP_NUM_THREADS": "1"}
    env.pop("ACCELERATE_USE_CPU", None)  # it would silently turn DeepSpeed into plain DDP
    launcher = ["--config_file", str(REPO / "accelerate_configs" / config_name)]
    launcher += ["--num_processes", str(nproc), "--main_process_port", str(free_port())]
    target = [str(script)] if script else ["-m", "trainer.stage2"]
    return _launch(launcher, [*target, *args], env, timeout, warm)


def _launch(launcher: list, args: list, env: dict, timeout, warm: bool):
    if warm and os.environ.get(REAL_LAUNCHER_ENV) != "1":
        from tools.warm import run_ranks

        return run_ranks(launcher, args, env, REPO, timeout)
    cmd = [sys.executable, "-m", "accelerate.commands.launch", *launcher, *args]
    return subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=timeout, cwd=REPO)


def launch(*args, env=None, cwd=REPO):
    """launch.sh under bash, with this interpreter as its PYTHON."""
    full = {**os.environ, "PYTHON": sys.executable, **(env or {})}
    return subprocess.run(
        ["bash", str(LAUNCH_SH), *map(str, args)],
        capture_output=True,
        text=True,
        env=full,
        cwd=cwd,
        timeout=120,
    )


# -- stage-2 output layout -----------------------------------------------------------------------------
def spec_layout(name: str, iterations: int) -> set:
    paths = {f"{name}_metrics_iter_{k}.csv" for k in range(iterations)}
    for k in range(iterations):
        paths |= {
            f"discriminator_iter_{k}/{f}"
            for f in ("real_latents.pt", "fake_latents.pt", "discriminator_history.csv")
        }
        paths |= {f"checkpoints/{name}_iter_{k}_checkpoint_{t}.pt" for t in ("best", "latest")}
    return paths


def files_under(root):
    return {str(p.relative_to(root)) for p in root.rglob("*") if p.is_file()}


# -- launch.sh's batch script with stand-ins for srun, scontrol and sbatch (the `fake_slurm` fixture) ---
FAKE_SRUN = """#!/bin/bash
# Stands in for srun + the trainer: honours the stop file like trainer/parallel/preempt.py does.
printf '%s\\n' "$@" > "$FAKE_DIR/srun_args"
[ -e "$ADVDIFF_STOP_FILE" ] && echo stale > "$FAKE_DIR/saw_stale_stop_file"
for _ in $(seq 1 200); do
  if [ -e "$ADVDIFF_STOP_FILE" ]; then
    echo "preempted" > "$FAKE_OUT/.advdiff_requeue"
    exit 1   # what accelerate makes of the trainer's 75
  fi
  [ -e "$FAKE_DIR/finish" ] && exit "${FAKE_EXIT:-0}"
  sleep 0.05
done
exit 99
"""


def submit_with_fake_sbatch(cfg, env):
    proc = launch(
        "--slurm", "--nodes", 1, "--gpus-per-node", 2, "--cpu", cfg, "--", "--num_iterations", "1", env=env
    )
    assert proc.returncode == 0, proc.stderr
    return proc


def run_batch_script(script, env, fake_dir, signal_after=None, finish_after=None):
    full = {**os.environ, **env, "SLURM_JOB_ID": "4242", "SLURM_JOB_NODELIST": "n1"}
    proc = subprocess.Popen(
        ["bash", str(script)], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=full
    )
    deadline = time.monotonic() + 10
    while not (fake_dir / "srun_args").exists() and time.monotonic() < deadline:
        time.sleep(0.02)
    time.sleep(0.1)
    if signal_after is not None:
        proc.send_signal(signal_after)  # like scancel --signal=USR1 --batch: the batch shell alone
    if finish_after:
        (fake_dir / "finish").touch()
    out, err = proc.communicate(timeout=30)
    return proc.returncode, out, err
