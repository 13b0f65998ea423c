"""Warm ranks: the workers of an `accelerate launch` forked from an interpreter that has already imported
torch, accelerate and diffusers, instead of each one importing them afresh (about 6 CPU-seconds a
process, most of what a small test run costs; docs/TESTING.md).

`run_ranks(launcher_args, args, env)` takes what `accelerate launch` would take. accelerate's own code
turns the launcher's arguments into the workers' environment (`prepare_multi_gpu_env`,
`prepare_deepspeed_cmd_env`, `prepare_simple_launcher_cmd_env`), and each rank gets the variables that
torchrun gives its workers (RANK, LOCAL_RANK, WORLD_SIZE, MASTER_ADDR/PORT, TORCHELASTIC_*). Rank 0 hosts
the rendezvous store, as a worker does without an elastic agent. Like the launcher: if one rank fails,
the others are stopped, and the exit code is 0 when every rank exits 0, else 1. stdout and stderr are
each rank's in rank order (the launcher interleaves them as they come).

What stays the launcher's own, and is tested with the real one: its start-up and signal handling,
kill -9 of the run (faults.kill_run walks the launcher's children), SLURM's srun and launch.sh.
tests/e2e/test_warm_ranks.py checks that warm ranks see the environment a real launch gives its workers.
Only third-party modules are preloaded: advdiff's own modules read their environment at import
(trainer.core.faults), so each rank imports them itself, after its environment is set."""

import atexit
import contextlib
import multiprocessing
import multiprocessing.connection
import os
import runpy
import subprocess
import sys
import tempfile
import time
import traceback
from pathlib import Path

# What a rank of `advdiff stage1/stage2` imports before its first step, minus advdiff itself (and minus
# DeepSpeed, which picks its accelerator from DS_ACCELERATOR when first asked, in the rank's environment).
PRELOAD = [
    "numpy",
    "pandas",
    "yaml",
    "PIL.Image",
    "torch",
    "torch.distributed",
    "torch.nn.parallel",
    "torch.utils.data",
    "safetensors.torch",
    "accelerate",
    "accelerate.commands.launch",
    "diffusers",
    "diffusers.models.autoencoders.autoencoder_kl",
    "diffusers.models.unets.unet_2d",
    "diffusers.models.unets.unet_2d_condition",
    "diffusers.schedulers",
    "matplotlib",
]

# Variables torchrun's agent adds for each worker that no accelerate function computes.
_TORCHRUN_SIGNALS = "SIGTERM,SIGINT,SIGHUP,SIGQUIT"
_context = None


@contextlib.contextmanager
def _environ(env: dict):
    """os.environ is `env` inside (accelerate's prepare_* functions read os.environ)."""
    saved = dict(os.environ)
    os.environ.clear()
    os.environ.update(env)
    try:
        yield
    finally:
        os.environ.clear()
        os.environ.update(saved)


def _forkserver():
    """The forkserver context, its server started (once per test process) with one OpenMP thread, as
    the ranks run: a fork inherits no thread pool that it could not use."""
    global _context
    if _context is None:
        from multiprocessing import forkserver

        context = multiprocessing.get_context("forkserver")
        context.set_forkserver_preload(PRELOAD)
        with _environ({**os.environ, "OMP_NUM_THREADS": "1"}):
            forkserver.ensure_running()
        _context = context
    return _context


def rank_environments(launcher_args: list, args: list, env: dict) -> tuple:
    """(one environment per rank, the parsed launch arguments) for `accelerate launch *launcher_args
    *args` started with environment `env`."""
    from accelerate.commands.launch import _validate_launch_command, launch_command_parser
    from accelerate.utils.launch import (
        prepare_deepspeed_cmd_env,
        prepare_multi_gpu_env,
        prepare_simple_launcher_cmd_env,
    )

    with _environ(env):
        parsed = launch_command_parser().parse_args([str(a) for a in [*launcher_args, *args]])
        parsed, defaults, mixed_precision_from_config = _validate_launch_command(parsed)
        if parsed.use_deepspeed and not parsed.cpu:  # as launch_command picks its launcher
            fields = list(defaults.deepspeed_config.keys()) if defaults else []
            if mixed_precision_from_config:
                fields.append("mixed_precision")
            parsed.deepspeed_fields_from_accelerate_config = ",".join(fields)
            base = prepare_deepspeed_cmd_env(parsed)[1]
            # the real launcher imports deepspeed first, which sets this in its (the workers') environment
            base.setdefault("PYTORCH_NVML_BASED_CUDA_CHECK", "1")
        elif parsed.multi_gpu and not parsed.cpu:
            base = prepare_multi_gpu_env(parsed)
        else:  # one process, no torchrun
            return [prepare_simple_launcher_cmd_env(parsed)[1]], parsed
    n = int(parsed.num_processes)
    shared = {
        "GROUP_RANK": "0",
        "GROUP_WORLD_SIZE": "1",
        "LOCAL_WORLD_SIZE": str(n),
        "MASTER_ADDR": "127.0.0.1",
        "MASTER_PORT": str(parsed.main_process_port),
        "ROLE_NAME": "default",
        "ROLE_WORLD_SIZE": str(n),
        "TORCHELASTIC_MAX_RESTARTS": "0",
        "TORCHELASTIC_RESTART_COUNT": "0",
        "TORCHELASTIC_RUN_ID": "none",
        "TORCHELASTIC_SIGNALS_TO_HANDLE": _TORCHRUN_SIGNALS,
        "TORCHELASTIC_USE_AGENT_STORE": "False",  # no agent: rank 0 hosts the store
        "TORCH_NCCL_ASYNC_ERROR_HANDLING": "1",
        "WORLD_SIZE": str(n),
    }
    base.setdefault("OMP_NUM_THREADS", "1")  # torchrun's default for several workers
    per_rank = [{"LOCAL_RANK": str(r), "RANK": str(r), "ROLE_RANK": str(r)} for r in range(n)]
    return [{**base, **shared, **mine} for mine in per_rank], parsed


def _rank_main(env: dict, cwd: str, argv: list, module: bool, out_path: str, err_path: str) -> None:
    """One rank, in a process forked from the preloaded server: its environment, folder, output files and
    command line, then the module or script as `python [-m] argv` would run it. Never returns."""
    os.environ.clear()
    os.environ.update(env)
    os.chdir(cwd)
    for fd, path in ((1, out_path), (2, err_path)):
        opened = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
        os.dup2(opened, fd)
        os.close(opened)
    sys.stdout = open(1, "w", buffering=1, closefd=False, encoding="utf-8", errors="backslashreplace")
    sys.stderr = open(2, "w", buffering=1, closefd=False, encoding="utf-8", errors="backslashreplace")
    import torch

    threads = os.environ.pop("ADVDIFF_WARM_THREADS", None) or env.get("OMP_NUM_THREADS") or 1
    torch.set_num_threads(int(threads))
    extra = [p for p in env.get("PYTHONPATH", "").split(os.pathsep) if p]
    sys.path[:0] = ([cwd] if module else [str(Path(argv[0]).resolve().parent)]) + extra
    sys.argv = list(argv)
    code = 0
    try:
        if module:
            runpy.run_module(argv[0], run_name="__main__", alter_sys=True)
        else:
            runpy.run_path(argv[0], run_name="__main__")
    except SystemExit as stop:
        if stop.code is None or isinstance(stop.code, int):
            code = stop.code or 0
        else:
            print(stop.code, file=sys.stderr)
            code = 1
    except BaseException:
        traceback.print_exc()
        code = 1
    try:
        atexit._run_exitfuncs()
    finally:
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(code)


def _stop(processes, grace: float = 5.0) -> None:
    """SIGTERM the ranks still running, then SIGKILL any left after `grace` seconds (as torchrun does)."""
    for p in processes:
        if p.exitcode is None:
            p.terminate()
    deadline = time.monotonic() + grace
    for p in processes:
        p.join(max(0.0, deadline - time.monotonic()))
        if p.exitcode is None:
            p.kill()
            p.join()


def run_ranks(launcher_args: list, args: list, env: dict, cwd, timeout: float = 600):
    """`accelerate launch *launcher_args *args` with warm ranks. Returns helpers.Finished; raises
    subprocess.TimeoutExpired as subprocess.run would."""
    if "ADVDIFF_FAULT_AT" in env:
        raise ValueError("kill points kill the launcher's process tree: launch them with the real launcher")
    envs, parsed = rank_environments(launcher_args, args, env)
    argv = [parsed.training_script, *parsed.training_script_args]
    code, out, err = _run(envs, cwd, argv, bool(parsed.module), timeout, ["accelerate", "launch", *args])
    from helpers import Finished

    return Finished(0 if code == 0 else 1, out, err)  # the launcher's exit code: 1 when a rank failed


def run_python(args: list, env: dict, cwd, timeout: float = 600):
    """`python *args` (`-m module ...` or `script ...`) in one warm process with environment `env`, torch at
    the thread count a fresh interpreter starts with (OMP_NUM_THREADS, else every core this process may
    use). Returns helpers.Finished with the process's own exit code."""
    from helpers import Finished

    if "ADVDIFF_FAULT_AT" in env:
        raise ValueError("kill points kill the process tree: run them in a real process")
    module = args[0] == "-m"
    argv = [str(a) for a in (args[1:] if module else args)]
    env = {**env, "ADVDIFF_WARM_THREADS": env.get("OMP_NUM_THREADS") or str(len(os.sched_getaffinity(0)))}
    code, out, err = _run([env], cwd, argv, module, timeout, ["python", *map(str, args)])
    return Finished(code, out, err)


def _run(envs: list, cwd, argv: list, module: bool, timeout: float, cmd: list):
    """One warm process per environment, all running argv; (the first non-zero exit code or 0, the
    processes' stdout and stderr in order). One failing stops the others."""
    context = _forkserver()
    with tempfile.TemporaryDirectory(prefix="advdiff-warm-") as logs:
        outs = [(os.path.join(logs, f"{r}.out"), os.path.join(logs, f"{r}.err")) for r in range(len(envs))]
        for r, rank_env in enumerate(envs):
            if "TORCHELASTIC_RUN_ID" in rank_env:
                rank_env["TORCHELASTIC_ERROR_FILE"] = os.path.join(logs, f"{r}.error.json")
        processes = [
            context.Process(target=_rank_main, args=(e, str(cwd), argv, module, *o))
            for e, o in zip(envs, outs, strict=True)
        ]
        for p in processes:
            p.start()
        deadline = time.monotonic() + timeout
        running = list(processes)
        failed = False
        while running and not failed:
            left = deadline - time.monotonic()
            if left <= 0:
                _stop(processes, grace=0.0)
                raise subprocess.TimeoutExpired(cmd, timeout)
            for sentinel in multiprocessing.connection.wait([p.sentinel for p in running], left):
                done = next(p for p in running if p.sentinel == sentinel)
                done.join()
                running.remove(done)
                failed = failed or done.exitcode != 0
        _stop(processes)
        stdout = "".join(Path(o).read_text(errors="backslashreplace") for o, _ in outs)
        stderr = "".join(Path(e).read_text(errors="backslashreplace") for _, e in outs)
    codes = [p.exitcode for p in processes]
    return next((c for c in codes if c != 0), 0), stdout, stderr
