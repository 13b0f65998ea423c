"""A real one-node SLURM cluster on this machine, for the SLURM tests.

`ensure_cluster()` installs slurm-wlm and munge with apt where sbatch is missing, writes a minimal
slurm.conf (once; a running or foreign cluster is reused, never rewritten), starts munged,
slurmctld and slurmd where they are not running, and waits until the node is idle. It raises
ClusterUnavailable with the reason when that is not possible (not root, no apt, a daemon that
does not come up).

    python3 tests/tools/slurm_cluster.py start|stop|status
"""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

CONF = Path("/etc/slurm/slurm.conf")
# The first line of the slurm.conf this module writes. The older marker (this file was tests/slurm_cluster.py)
# still counts as ours, so a cluster set up before the move is reused, not refused as foreign.
OURS = "# written by advdiff tests/tools/slurm_cluster.py"
OURS_BEFORE = ("# written by advdiff tests/slurm_cluster.py",)
BASE = Path("/var/lib/advdiff-slurm")
RUN = Path("/run/advdiff-slurm")
LOGS = Path("/var/log/advdiff-slurm")
MUNGE_KEY = Path("/etc/munge/munge.key")


class ClusterUnavailable(RuntimeError):
    pass


def sh(*cmd, timeout=60, check=False, **kw) -> subprocess.CompletedProcess:
    proc = subprocess.run(list(cmd), capture_output=True, text=True, timeout=timeout, **kw)
    if check and proc.returncode != 0:
        raise ClusterUnavailable(
            f"{' '.join(cmd)} failed ({proc.returncode}): {(proc.stderr or proc.stdout)[-500:]}"
        )
    return proc


def _install() -> None:
    if shutil.which("sbatch") and shutil.which("slurmctld") and shutil.which("munged"):
        return
    if os.geteuid() != 0:
        raise ClusterUnavailable("SLURM is not installed and installing it needs root")
    if not shutil.which("apt-get"):
        raise ClusterUnavailable("SLURM is not installed and apt-get is not available")
    env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
    cmd = ["apt-get", "install", "-y", "--no-install-recommends", "slurm-wlm", "munge"]
    if sh(*cmd, timeout=900, env=env).returncode != 0:
        # a fresh image often has no package lists yet
        sh("apt-get", "update", timeout=600, env=env, check=True)
        sh(*cmd, timeout=900, env=env, check=True)


def _munge_ok() -> bool:
    try:
        cred = sh("munge", "-n", timeout=10)
        return cred.returncode == 0 and sh("unmunge", input=cred.stdout, timeout=10).returncode == 0
    except (OSError, subprocess.TimeoutExpired):
        return False


def _start_munge() -> None:
    if _munge_ok():
        return
    if not MUNGE_KEY.exists():
        MUNGE_KEY.parent.mkdir(parents=True, exist_ok=True)
        if sh("mungekey", "--create", "--keyfile", str(MUNGE_KEY)).returncode != 0:
            MUNGE_KEY.write_bytes(os.urandom(1024))
    for path in (MUNGE_KEY.parent, MUNGE_KEY):
        shutil.chown(path, "munge", "munge")
    MUNGE_KEY.chmod(0o400)
    for folder in ("/run/munge", "/var/lib/munge", "/var/log/munge"):
        Path(folder).mkdir(parents=True, exist_ok=True)
        shutil.chown(folder, "munge", "munge")
    # munged refuses to run as root; the packaged service runs it as the munge user too
    sh("runuser", "-u", "munge", "--", "munged", check=True)
    _wait(_munge_ok, 20, "munged did not start")


def _write_conf(host: str) -> None:
    cpus = os.cpu_count() or 1
    mem_mb = int(Path("/proc/meminfo").read_text().split("MemTotal:")[1].split()[0]) // 1024
    for folder in (BASE / "ctld", BASE / "d", RUN, LOGS):
        folder.mkdir(parents=True, exist_ok=True)
    CONF.parent.mkdir(parents=True, exist_ok=True)
    text = f"""{OURS}
ClusterName=advdiff
SlurmctldHost={host}
SlurmUser=root
SlurmdUser=root
AuthType=auth/munge
StateSaveLocation={BASE}/ctld
SlurmdSpoolDir={BASE}/d
SlurmctldPidFile={RUN}/slurmctld.pid
SlurmdPidFile={RUN}/slurmd.pid
SlurmctldLogFile={LOGS}/slurmctld.log
SlurmdLogFile={LOGS}/slurmd.log
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
JobAcctGatherType=jobacct_gather/none
SelectType=select/cons_tres
SelectTypeParameters=CR_CPU
SchedulerType=sched/backfill
MpiDefault=none
JobRequeue=1
ReturnToService=2
# keep finished jobs visible to scontrol (there is no accounting database for sacct)
MinJobAge=900
NodeName={host} CPUs={cpus} RealMemory={max(mem_mb - 1024, mem_mb * 9 // 10)} State=UNKNOWN
PartitionName=debug Nodes=ALL Default=YES MaxTime=INFINITE State=UP
"""
    tmp = CONF.with_suffix(".tmp")
    tmp.write_text(text)
    tmp.replace(CONF)


def _pid_alive(pidfile: Path) -> bool:
    try:
        os.kill(int(pidfile.read_text().split()[0]), 0)
        return True
    except (OSError, ValueError, IndexError):
        return False


def ctld_up() -> bool:
    try:
        return "is UP" in sh("scontrol", "ping", timeout=15).stdout
    except (OSError, subprocess.TimeoutExpired):
        return False


def node_states() -> list[str]:
    try:
        return sh("sinfo", "-h", "-N", "-o", "%T", timeout=15).stdout.split()
    except (OSError, subprocess.TimeoutExpired):
        return []


def _wait(ok, seconds: float, message: str) -> None:
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        if ok():
            return
        time.sleep(0.5)
    raise ClusterUnavailable(message)


def _log_tail(name: str) -> str:
    try:
        return (LOGS / name).read_text()[-800:]
    except OSError:
        return "(no log)"


def ctld_log(job_id: str, lines: int = 30) -> str:
    """slurmctld's log lines about one job (best effort), for a failed test's message: why a job
    ended the way it did (e.g. "Killing non-startable batch JobId=N: Job credential revoked") is
    written there, not to the job's own output."""
    try:
        text = (LOGS / "slurmctld.log").read_text(errors="replace")
    except OSError:
        return "(no slurmctld log)"
    keys = (f"JobId={job_id} ", f"JobId={job_id}:", f"JobId={job_id}\n", f"job {job_id} ", f"job {job_id}:")
    hits = [line for line in text.splitlines() if any(k in line + "\n" for k in keys)]
    return "\n".join(hits[-lines:]) or f"(nothing about job {job_id} in {LOGS / 'slurmctld.log'})"


def ensure_cluster() -> str:
    """Bring the cluster up (or reuse it); returns the node name."""
    if sys.platform != "linux":
        raise ClusterUnavailable("the SLURM tests need Linux")
    if ctld_up() and any(s.startswith(("idle", "mix", "alloc")) for s in node_states()):
        return sh("sinfo", "-h", "-N", "-o", "%N", timeout=15).stdout.split()[0]
    if os.geteuid() != 0:
        raise ClusterUnavailable("no running SLURM cluster, and starting one needs root")
    _install()
    host = socket.gethostname()
    if CONF.exists() and not any(mark in CONF.read_text() for mark in (OURS, *OURS_BEFORE)):
        raise ClusterUnavailable(f"{CONF} exists and was not written by these tests; not touching it")
    if not CONF.exists():
        _write_conf(host)
    _start_munge()
    for folder in (BASE / "ctld", BASE / "d", RUN, LOGS):
        folder.mkdir(parents=True, exist_ok=True)
    if not ctld_up():
        if not _pid_alive(RUN / "slurmctld.pid"):
            sh("slurmctld", check=True)
        try:
            _wait(ctld_up, 30, "slurmctld did not come up")
        except ClusterUnavailable as e:
            raise ClusterUnavailable(f"{e}: {_log_tail('slurmctld.log')}") from None
    if not _pid_alive(RUN / "slurmd.pid"):
        sh("slurmd", check=True)

    def idle() -> bool:
        states = node_states()
        if any(s.startswith(("down", "drain")) for s in states):
            # a node that went away with the old daemons is brought back explicitly
            sh("scontrol", "update", f"nodename={host}", "state=resume")
        return any(s.startswith(("idle", "mix", "alloc")) for s in states)

    try:
        _wait(idle, 60, f"the node never became idle (sinfo: {node_states()})")
    except ClusterUnavailable as e:
        raise ClusterUnavailable(f"{e}: {_log_tail('slurmd.log')}") from None
    return host


def stop_cluster() -> None:
    for name in ("slurmd", "slurmctld"):
        pidfile = RUN / f"{name}.pid"
        if _pid_alive(pidfile):
            os.kill(int(pidfile.read_text().split()[0]), signal.SIGTERM)


if __name__ == "__main__":
    what = sys.argv[1] if len(sys.argv) > 1 else "status"
    if what == "start":
        print(f"SLURM node {ensure_cluster()} is up")
    elif what == "stop":
        stop_cluster()
    else:
        print(sh("sinfo").stdout if ctld_up() else "slurmctld is not running")
