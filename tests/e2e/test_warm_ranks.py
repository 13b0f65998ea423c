"""Warm ranks (tests/tools/warm.py) stand in for `accelerate launch`'s workers in most multi-process
tests: they must see what a real launch gives its workers, for DDP and for DeepSpeed, and fail as the
launcher fails."""

import json

import pytest
from helpers import accelerate_launch, deepspeed_launch

# Where a warm rank differs by design: each launch has its own port and error files, and no elastic
# agent hosts the rendezvous store (rank 0 does).
BY_DESIGN = {"MASTER_PORT", "TORCHELASTIC_ERROR_FILE", "TORCHELASTIC_USE_AGENT_STORE"}

SCRIPT = """
import json, os, sys
rank = os.environ.get("RANK", "0")
with open(os.path.join(sys.argv[1], f"rank{rank}.json"), "w") as f:
    json.dump({"env": dict(os.environ), "argv": sys.argv, "cwd": os.getcwd(), "path0": sys.path[0]}, f)
print(f"rank {rank} done", flush=True)
sys.exit(int(os.environ.get("EXIT_ON_RANK_1", "0")) if rank == "1" else 0)
"""


def _records(folder, n):
    """Each rank's record, removed once read (the next launch writes them again)."""
    records = [json.loads((folder / f"rank{r}.json").read_text()) for r in range(n)]
    for r in range(n):
        (folder / f"rank{r}.json").unlink()
    return records


def _real_then_warm(tmp_path, launch, nproc):
    """launch(folder, warm) with the real launcher, then with warm ranks, on the same folder argument:
    {warm: (the finished launch, each rank's record)}."""
    script = tmp_path / "env_dump.py"
    script.write_text(SCRIPT)
    folder = tmp_path / "records"
    folder.mkdir(exist_ok=True)
    out = {}
    for warm in (False, True):
        proc = launch(script, folder, warm)
        out[warm] = proc, _records(folder, nproc) if proc.returncode == 0 else None
    return out


def _compare(real, warm):
    for r, (a, b) in enumerate(zip(real, warm, strict=True)):
        keys_a, keys_b = set(a["env"]) - BY_DESIGN, set(b["env"]) - BY_DESIGN
        assert keys_a == keys_b, (r, sorted(keys_a ^ keys_b))
        differ = {k: (a["env"][k], b["env"][k]) for k in keys_a if a["env"][k] != b["env"][k]}
        assert not differ, (r, differ)
        assert (a["argv"][1:], a["cwd"], a["path0"]) == (b["argv"][1:], b["cwd"], b["path0"]), r
        assert a["argv"][0].endswith("env_dump.py") and b["argv"][0].endswith("env_dump.py")


@pytest.mark.slow
@pytest.mark.parametrize("nproc", [1, 2])
def test_warm_ranks_see_a_real_launchs_environment(tmp_path, nproc):
    def launch(script, folder, warm):
        return accelerate_launch(nproc, str(script), str(folder), warm=warm)

    runs = _real_then_warm(tmp_path, launch, nproc)
    for proc, _ in runs.values():
        assert proc.returncode == 0, proc.stderr[-3000:]
        assert all(f"rank {r} done" in proc.stdout for r in range(nproc))
    _compare(runs[False][1], runs[True][1])
    if nproc == 2:
        assert runs[True][1][1]["env"]["TORCHELASTIC_USE_AGENT_STORE"] == "False"


@pytest.mark.slow
def test_warm_deepspeed_ranks_see_a_real_launchs_environment(tmp_path):
    def launch(script, folder, warm):
        return deepspeed_launch("deepspeed_zero2.yaml", 2, str(folder), script=script, warm=warm)

    runs = _real_then_warm(tmp_path, launch, 2)
    for proc, _ in runs.values():
        assert proc.returncode == 0, proc.stderr[-3000:]
    assert runs[True][1][0]["env"]["ACCELERATE_USE_DEEPSPEED"] == "true"
    _compare(runs[False][1], runs[True][1])


@pytest.mark.slow
def test_a_failing_warm_rank_fails_the_launch_as_the_launcher_does(tmp_path):
    def launch(script, folder, warm):
        return accelerate_launch(2, str(script), str(folder), env={"EXIT_ON_RANK_1": "3"}, warm=warm)

    runs = _real_then_warm(tmp_path, launch, 2)
    for proc, _ in runs.values():
        assert "rank 1 done" in proc.stdout
    assert {warm: proc.returncode for warm, (proc, _) in runs.items()} == {False: 1, True: 1}
