"""trainer.parallel.slurm without a cluster: per-node accelerate arguments from faked SLURM environments
(ranks, rendezvous, ports, host names), its errors, and `exec` replacing itself with accelerate launch.
launch.sh itself is tested in test_launch.py."""

import os
import shlex
import subprocess
import sys

import pytest
from helpers import REPO

from trainer.parallel.slurm import SlurmError, expand_nodelist, launch_args, main_process_port

HOSTS = ["gpu07", "gpu08", "gpu09"]


def node_env(node_id, nodes=3, job_id="4242", nodelist="gpu[07-09]"):
    return {
        "SLURM_NNODES": str(nodes),
        "SLURM_NODEID": str(node_id),
        "SLURM_JOB_ID": job_id,
        "SLURM_JOB_NODELIST": nodelist,
    }


def as_dict(args):
    """accelerate arguments as {flag: value or True}."""
    out, i = {}, 0
    while i < len(args):
        if i + 1 < len(args) and not args[i + 1].startswith("--"):
            out[args[i]] = args[i + 1]
            i += 2
        else:
            out[args[i]] = True
            i += 1
    return out


# ---- launch_args ----


def test_every_node_gets_its_own_rank_and_the_same_rendezvous():
    per_node = [as_dict(launch_args(node_env(i), 4, HOSTS)) for i in range(3)]
    assert [a["--machine_rank"] for a in per_node] == ["0", "1", "2"]
    for a in per_node:
        assert a["--num_machines"] == "3" and a["--num_processes"] == "12"
        assert a["--main_process_ip"] == "gpu07"
        assert a["--main_process_port"] == per_node[0]["--main_process_port"]
        assert a["--rdzv_backend"] == "c10d" and a["--multi_gpu"] is True
        assert "--same_network" not in a


def test_the_cli_reads_each_tasks_own_environment():
    """What srun does: the same command line on three nodes, each with its own SLURM_NODEID."""
    ranks, rendezvous = [], set()
    for i in range(3):
        env = {k: v for k, v in os.environ.items() if not k.startswith("SLURM_")}
        proc = subprocess.run(
            [sys.executable, "-m", "trainer.parallel.slurm", "print-args", "--gpus-per-node", "2"],
            capture_output=True,
            text=True,
            cwd=REPO,
            env={**env, **node_env(i)},
        )
        assert proc.returncode == 0, proc.stderr
        a = as_dict(shlex.split(proc.stdout))
        ranks.append(a["--machine_rank"])
        rendezvous.add((a["--main_process_ip"], a["--main_process_port"], a["--num_processes"]))
    assert ranks == ["0", "1", "2"]
    assert rendezvous == {("gpu07", str(main_process_port(4242)), "6")}


def test_single_node():
    a = as_dict(launch_args(node_env(0, nodes=1, nodelist="n1"), 2, ["n1"]))
    assert a["--num_machines"] == "1" and a["--machine_rank"] == "0" and a["--num_processes"] == "2"
    assert a["--same_network"] is True and a["--multi_gpu"] is True
    assert a["--rdzv_backend"] == "static"  # c10d would ignore our port on one machine
    one = as_dict(launch_args(node_env(0, nodes=1, nodelist="n1"), 1, ["n1"]))
    assert "--multi_gpu" not in one and one["--num_processes"] == "1"


def test_port_is_deterministic_and_differs_between_jobs():
    ports = {main_process_port(j) for j in range(1000, 1100)}
    assert len(ports) == 100 and all(20000 <= p < 32768 for p in ports)
    assert main_process_port(123456) == main_process_port(123456)


def test_hostnames_come_from_scontrol(tmp_path, monkeypatch):
    fake = tmp_path / "scontrol"
    fake.write_text(
        "#!/bin/sh\n[ \"$1 $2 $3\" = 'show hostnames weird[1-2]' ] && printf 'first\\nsecond\\n'\n"
    )
    fake.chmod(0o755)
    monkeypatch.setenv("PATH", f"{tmp_path}:{os.environ['PATH']}")
    a = as_dict(launch_args(node_env(1, nodes=2, nodelist="weird[1-2]"), 1))
    assert a["--main_process_ip"] == "first" and a["--machine_rank"] == "1"


def test_hostnames_without_scontrol(tmp_path, monkeypatch):
    monkeypatch.setenv("PATH", str(tmp_path))  # nothing to run there: the built-in expansion is used
    a = as_dict(launch_args(node_env(2, nodelist="gpu[07-09]"), 1))
    assert a["--main_process_ip"] == "gpu07"
    assert expand_nodelist("gpu[07-09,11],login1,r[1-2]-n[1-2]") == [
        "gpu07",
        "gpu08",
        "gpu09",
        "gpu11",
        "login1",
        "r1-n1",
        "r1-n2",
        "r2-n1",
        "r2-n2",
    ]
    assert expand_nodelist("n[008-010]") == ["n008", "n009", "n010"]


@pytest.mark.parametrize(
    "drop, message",
    [
        ("SLURM_NODEID", "SLURM_NODEID is not set"),
        ("SLURM_NNODES", "SLURM_NNODES / SLURM_JOB_NUM_NODES is not set"),
        ("SLURM_JOB_ID", "SLURM_JOB_ID / SLURM_JOBID is not set"),
    ],
)
def test_missing_slurm_variables(drop, message):
    env = node_env(0)
    del env[drop]
    with pytest.raises(SlurmError, match=message):
        launch_args(env, 2, HOSTS)


def test_inconsistent_slurm_variables():
    with pytest.raises(SlurmError, match="SLURM_NODEID=3 is not below SLURM_NNODES=3"):
        launch_args(node_env(3), 2, HOSTS)
    with pytest.raises(SlurmError, match="expected an integer"):
        launch_args({**node_env(0), "SLURM_NNODES": "three"}, 2, HOSTS)
    with pytest.raises(SlurmError, match="fewer than SLURM_NNODES=3"):
        launch_args(node_env(0), 2, HOSTS[:2])


@pytest.mark.parametrize(
    "argv, message",
    [
        (["print-args", "--gpus-per-node", "2"], "SLURM_NNODES / SLURM_JOB_NUM_NODES is not set"),
        (["exec", "--gpus-per-node", "2", "--", "trainer.stage2", "x.yaml"], "SLURM_NNODES"),
        (["exec", "--gpus-per-node", "2"], "expected -- MODULE"),
        (["print-args"], "--gpus-per-node is required"),
    ],
)
def test_cli_errors_are_one_line(argv, message):
    env = {k: v for k, v in os.environ.items() if not k.startswith("SLURM_")}
    if "SLURM" not in message:
        env.update(node_env(0))
    proc = subprocess.run(
        [sys.executable, "-m", "trainer.parallel.slurm", *argv],
        capture_output=True,
        text=True,
        cwd=REPO,
        env=env,
    )
    assert proc.returncode == 2
    assert len(proc.stderr.strip().splitlines()) == 1 and message in proc.stderr, proc.stderr
    assert proc.stderr.startswith("trainer.parallel.slurm: error: ")


def test_exec_replaces_itself_with_accelerate_launch(tmp_path):
    data = tmp_path / "x.json"
    data.write_text('{"b": 1}')
    env = {
        **{k: v for k, v in os.environ.items() if not k.startswith("SLURM_")},
        **node_env(0, nodes=1, nodelist="localhost"),
        "ACCELERATE_USE_CPU": "1",
    }
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "trainer.parallel.slurm",
            "exec",
            "--gpus-per-node",
            "1",
            "--",
            "json.tool",
            str(data),
        ],
        capture_output=True,
        text=True,
        cwd=REPO,
        env=env,
        timeout=120,
    )
    assert proc.returncode == 0, proc.stderr
    assert '"b": 1' in proc.stdout
    assert "accelerate.commands.launch --num_machines 1 --machine_rank 0" in proc.stderr
