"""launch.sh without a cluster: the dry-run output of both modes, usage errors, and the generated batch
script run under bash with stand-ins for srun, scontrol and sbatch. The per-node arguments that
trainer.parallel.slurm computes are tested in test_launch_args.py."""

import signal
import subprocess

import pytest
from helpers import launch, run_batch_script, submit_with_fake_sbatch, write_config

# ---- launch.sh ----


def test_local_dry_run(tmp_path):
    cfg = write_config(tmp_path)
    proc = launch(cfg, "--cpu", "--gpus", "2", "--dry-run", "--", "--num_samples", "3")
    assert proc.returncode == 0, proc.stderr
    cmd = proc.stdout.strip()
    assert cmd.startswith("ACCELERATE_USE_CPU=1 ")
    assert (
        f"accelerate.commands.launch --num_processes 2 --multi_gpu -m trainer.stage2 {cfg} "
        f"--device cpu --num_samples 3" in cmd
    )  # stage 2 by default
    proc = launch(cfg, "--stage", "stage1", "--mixed-precision", "bf16", "--dry-run")
    assert "-m trainer.stage1 " in proc.stdout and "--mixed_precision bf16" in proc.stdout
    assert "ACCELERATE_USE_CPU" not in proc.stdout and "--multi_gpu" not in proc.stdout
    assert not (tmp_path / "out").exists()


def split_dry_run(stdout: str):
    """(sbatch script, launch command) from `launch.sh --slurm --dry-run`."""
    lines = stdout.splitlines()
    assert lines[0].startswith("# ") and lines[0].endswith(".sbatch")
    cut = lines.index("# launch command (run by srun on each node):")
    return "\n".join(lines[1:cut]) + "\n", lines[cut + 1][2:], lines[0][2:]


def test_slurm_dry_run_gpu(tmp_path):
    cfg = write_config(tmp_path / "exp", save_path="runs/r1")  # relative: against the YAML's folder
    proc = launch(
        "--slurm",
        "--nodes",
        3,
        "--gpus-per-node",
        4,
        "--partition",
        "gpu",
        "--time",
        "02:00:00",
        "--signal-seconds",
        120,
        "--dry-run",
        cfg,
        "--",
        "--num_iterations",
        "2",
    )
    assert proc.returncode == 0, proc.stderr
    script, command, path = split_dry_run(proc.stdout)
    out = (tmp_path / "exp" / "runs" / "r1").resolve()
    assert path == f"{out}/slurm/advdiff_stage2.sbatch"
    header = [line for line in script.splitlines() if line.startswith("#SBATCH")]
    for expected in (
        "--nodes=3",
        "--ntasks-per-node=1",
        "--gpus-per-node=4",
        "--partition=gpu",
        "--time=02:00:00",
        "--signal=B:USR1@120",
        "--requeue",
        "--open-mode=append",
        f"--output={out}/slurm/advdiff_stage2_%j.out",
        f"--error={out}/slurm/advdiff_stage2_%j.err",
    ):
        assert f"#SBATCH {expected}" in header, expected
    assert not any("cpus-per-task" in line for line in header)
    for expected in (
        "srun",
        "trainer.parallel.slurm exec",
        'ADVDIFF_STOP_FILE="$stop_file"',
        "scontrol requeue",
        "trap 'request_stop USR1' USR1",
        "trap 'request_stop TERM' TERM",
        "wait",
    ):
        assert expected in script, expected
    assert "ACCELERATE_USE_CPU" not in script
    # the rank is never decided by the batch shell: no $SLURM_NODEID anywhere in what it runs
    assert "SLURM_NODEID" not in script and "SLURM_PROCID" not in script and "machine_rank" not in script
    assert command.startswith("srun --nodes=3 --ntasks-per-node=1 ")
    assert command.endswith(
        f"-m trainer.parallel.slurm exec --gpus-per-node 4 -- trainer.stage2 {cfg.resolve()} "
        f"--num_iterations 2"
    )
    assert command in script
    assert subprocess.run(["bash", "-n"], input=script, text=True).returncode == 0
    assert not out.exists(), "a dry run writes nothing"


def test_slurm_dry_run_cpu_and_overrides(tmp_path):
    cfg = write_config(tmp_path)
    other = tmp_path / "elsewhere"
    proc = launch(
        "--slurm",
        "--nodes",
        1,
        "--gpus-per-node",
        2,
        "--cpu",
        "--stage",
        "stage1",
        "--dry-run",
        cfg,
        "--",
        "--set",
        f"experiment.save_path={other}",
    )
    assert proc.returncode == 0, proc.stderr
    script, command, path = split_dry_run(proc.stdout)
    assert path == f"{other}/slurm/advdiff_stage1.sbatch"  # --set experiment.save_path moves everything
    assert "#SBATCH --cpus-per-task=2" in script and "#SBATCH --gpus-per-node" not in script
    assert "export ACCELERATE_USE_CPU=1" in script
    assert f"-- trainer.stage1 {cfg} --device cpu --set experiment.save_path={other}" in command
    assert "--cpus-per-task=2" in command
    assert 'stop_file="$out_dir/.advdiff_stop"' in script and f"out_dir={other}" in script


BAD_USAGE = [
    ([], "CONFIG is required"),
    (["{cfg}", "--stage", "stage3"], "--stage: expected stage0, stage1 or stage2, got stage3"),
    (["{cfg}", "--stage"], "--stage needs a value"),
    (["{cfg}", "--gpus", "--cpu"], "--gpus needs a value"),
    (["{cfg}", "--gpus", "two"], "--gpus: expected a positive integer, got 'two'"),
    (["{cfg}", "--bogus"], "unknown option --bogus"),
    (["{cfg}", "extra.yaml"], "unexpected argument extra.yaml"),
    (["missing.yaml"], "missing.yaml: config file not found"),
    (["{cfg}", "--nodes", "2"], "--nodes needs --slurm"),
    (["{cfg}", "--mixed-precision", "fp8"], "--mixed-precision: expected no, fp16 or bf16, got fp8"),
    (["--slurm", "{cfg}", "--gpus-per-node", "2"], "--slurm needs --nodes M"),
    (["--slurm", "{cfg}", "--nodes", "2"], "--slurm needs --gpus-per-node G"),
    (
        ["--slurm", "{cfg}", "--nodes", "0", "--gpus-per-node", "2"],
        "--nodes: expected a positive integer, got '0'",
    ),
    (
        ["--slurm", "{cfg}", "--nodes", "1", "--gpus-per-node", "2", "--gpus", "2", "--dry-run"],
        "--gpus is for local",
    ),
    (
        ["--slurm", "{cfg}", "--nodes", "1", "--gpus-per-node", "2", "--signal-seconds", "soon", "--dry-run"],
        "--signal-seconds: expected a positive integer",
    ),
    (["--slurm", "{bad}", "--nodes", "1", "--gpus-per-node", "1", "--dry-run"], "experiment.name"),
    (["--slurm", "{spaced}", "--nodes", "1", "--gpus-per-node", "1", "--dry-run"], "cannot hold blanks"),
]


@pytest.mark.parametrize("argv, message", BAD_USAGE, ids=[m for _, m in BAD_USAGE])
def test_bad_usage_is_one_line_and_exit_2(tmp_path, argv, message):
    cfg = write_config(tmp_path)
    bad = tmp_path / "bad.yaml"
    bad.write_text("experiment:\n  name: a/b\n")
    spaced = write_config(tmp_path / "s", save_path="with space")
    argv = [a.format(cfg=cfg, bad=bad, spaced=spaced) for a in argv]
    proc = launch(*argv)
    assert proc.returncode == 2, proc.stdout + proc.stderr
    assert len(proc.stderr.strip().splitlines()) == 1, proc.stderr
    assert message in proc.stderr and "Traceback" not in proc.stderr, proc.stderr
    assert proc.stdout == ""


# ---- the batch script itself, with stand-ins for the SLURM commands (the fake_slurm fixture, conftest.py)
# ----


def test_submission_writes_the_script_and_prints_the_job_id(fake_slurm):
    cfg, out, fake_dir, env = fake_slurm
    proc = submit_with_fake_sbatch(cfg, env)
    script = out / "slurm" / "advdiff_stage2.sbatch"
    assert proc.stdout == "4242\n"
    assert (fake_dir / "sbatch").read_text().split() == ["--parsable", str(script)]
    assert script.read_text().startswith("#!/bin/bash\n#SBATCH")
    assert [p.name for p in (out / "slurm").iterdir()] == ["advdiff_stage2.sbatch"]  # no temp file left


@pytest.mark.parametrize("sig", [signal.SIGUSR1, signal.SIGTERM])
def test_signal_saves_and_requeues(fake_slurm, sig):
    cfg, out, fake_dir, env = fake_slurm
    submit_with_fake_sbatch(cfg, env)
    rc, stdout, stderr = run_batch_script(
        out / "slurm" / "advdiff_stage2.sbatch", env, fake_dir, signal_after=sig
    )
    assert rc == 0, stdout + stderr
    assert f"received {sig.name[3:]}" in stdout and "requeueing job 4242" in stdout
    assert (fake_dir / "scontrol").read_text() == "requeue 4242\n"
    assert not (out / ".advdiff_requeue").exists() and not (out / ".advdiff_stop").exists()
    args = (fake_dir / "srun_args").read_text().splitlines()
    assert args[args.index("--") + 1 :] == [
        "trainer.stage2",
        str(cfg),
        "--device",
        "cpu",
        "--num_iterations",
        "1",
    ]


def test_no_marker_passes_the_exit_status_through(fake_slurm):
    cfg, out, fake_dir, env = fake_slurm
    submit_with_fake_sbatch(cfg, env)
    rc, stdout, _ = run_batch_script(
        out / "slurm" / "advdiff_stage2.sbatch", {**env, "FAKE_EXIT": "3"}, fake_dir, finish_after=True
    )
    assert rc == 3 and "srun finished with status 3" in stdout
    assert not (fake_dir / "scontrol").exists()


def test_leftovers_of_an_earlier_run_are_cleared(fake_slurm):
    cfg, out, fake_dir, env = fake_slurm
    submit_with_fake_sbatch(cfg, env)
    (out / ".advdiff_stop").touch()
    (out / ".advdiff_requeue").write_text("old\n")
    rc, stdout, _ = run_batch_script(
        out / "slurm" / "advdiff_stage2.sbatch", env, fake_dir, finish_after=True
    )
    assert rc == 0 and not (fake_dir / "saw_stale_stop_file").exists()
    assert not (fake_dir / "scontrol").exists() and not (out / ".advdiff_requeue").exists()
