"""SLURM glue: turn one node's SLURM environment into `accelerate launch` arguments.

`srun` starts one task per node; each task runs `python3 -m trainer.parallel.slurm exec -- MODULE ARGS...`,
which reads *its own* SLURM_NODEID and replaces itself with `accelerate launch`. Computing the
rank here, inside the task, is the point: a batch script that writes `$SLURM_NODEID` into the
srun command line expands it once, on the first node, and every node then claims rank 0.

    python3 -m trainer.parallel.slurm exec [--gpus-per-node G] [--config-file F] -- MODULE ARGS...
    python3 -m trainer.parallel.slurm print-args [--gpus-per-node G] [--config-file F]
    python3 -m trainer.parallel.slurm out-dir CONFIG [STAGE FLAGS...]
"""

from __future__ import annotations

import argparse
import os
import re
import shlex
import subprocess
import sys
from typing import Mapping, Sequence

from trainer.core.errors import UserError

PORT_BASE = 20000
# Kept below Linux's default ephemeral range (32768+), so an outgoing connection of some other
# process on the main node cannot already hold the port.
PORT_SPAN = 10000


class SlurmError(UserError):
    """Missing or malformed SLURM environment; printed as one line, exit code 2."""


def _int_var(env: Mapping, names: Sequence[str], minimum: int) -> int:
    for name in names:
        raw = env.get(name)
        if raw is None or raw == "":
            continue
        try:
            value = int(raw)
        except ValueError:
            raise SlurmError(f"{name}={raw!r}: expected an integer") from None
        if value < minimum:
            raise SlurmError(f"{name}={value}: expected an integer >= {minimum}")
        return value
    raise SlurmError(f"{' / '.join(names)} is not set; run this inside a SLURM job step (srun)")


def main_process_port(job_id: int) -> int:
    """The rendezvous port, the same on every node of a job and different for neighbouring jobs."""
    return PORT_BASE + job_id % PORT_SPAN


def _split_top_level(text: str) -> list[str]:
    parts, depth, start = [], 0, 0
    for i, ch in enumerate(text):
        if ch == "[":
            depth += 1
        elif ch == "]":
            depth -= 1
        elif ch == "," and depth == 0:
            parts.append(text[start:i])
            start = i + 1
    parts.append(text[start:])
    return [p for p in parts if p]


def _expand_one(pattern: str) -> list[str]:
    m = re.search(r"\[([^\]]*)\]", pattern)
    if not m:
        return [pattern]
    head, tail = pattern[: m.start()], pattern[m.end() :]
    names = []
    for item in m.group(1).split(","):
        lo, _, hi = item.partition("-")
        if hi:
            width = len(lo)  # "node[008-010]" keeps its zero padding
            names += [f"{head}{n:0{width}d}" for n in range(int(lo), int(hi) + 1)]
        else:
            names.append(head + lo)
    return [full for name in names for full in _expand_one(name + tail)]


def expand_nodelist(nodelist: str) -> list[str]:
    """Slurm's compressed host list ("gpu[01-03,07],login1") as host names, in order.

    Only a fallback for machines without scontrol; `scontrol show hostnames` is the reference.
    """
    try:
        return [host for part in _split_top_level(nodelist.strip()) for host in _expand_one(part)]
    except ValueError:
        raise SlurmError(f"cannot parse the node list {nodelist!r}") from None


def hostnames_of(nodelist: str) -> list[str]:
    """`scontrol show hostnames`, or our own expansion where scontrol is missing or cannot run."""
    try:
        proc = subprocess.run(
            ["scontrol", "show", "hostnames", nodelist], capture_output=True, text=True, timeout=60
        )
        if proc.returncode == 0 and proc.stdout.split():
            return proc.stdout.split()
    except (OSError, subprocess.TimeoutExpired):
        pass
    return expand_nodelist(nodelist)


def launch_args(env: Mapping, gpus_per_node: int, hostnames: list[str] | None = None) -> list[str]:
    """`accelerate launch` arguments for the node whose environment is `env`.

    `hostnames` is the job's node list, expanded; when None it comes from
    `scontrol show hostnames $SLURM_JOB_NODELIST`.
    """
    if gpus_per_node < 1:
        raise SlurmError(f"--gpus-per-node: expected an integer >= 1, got {gpus_per_node}")
    nodes = _int_var(env, ("SLURM_NNODES", "SLURM_JOB_NUM_NODES"), 1)
    node_id = _int_var(env, ("SLURM_NODEID",), 0)
    job_id = _int_var(env, ("SLURM_JOB_ID", "SLURM_JOBID"), 0)
    if node_id >= nodes:
        raise SlurmError(f"SLURM_NODEID={node_id} is not below SLURM_NNODES={nodes}")
    if hostnames is None:
        nodelist = env.get("SLURM_JOB_NODELIST") or env.get("SLURM_NODELIST")
        if not nodelist:
            raise SlurmError("SLURM_JOB_NODELIST is not set; run this inside a SLURM job step (srun)")
        hostnames = hostnames_of(nodelist)
    if len(hostnames) < nodes:
        raise SlurmError(f"the node list names {len(hostnames)} host(s), fewer than SLURM_NNODES={nodes}")
    total = nodes * gpus_per_node
    args = [
        "--num_machines",
        str(nodes),
        "--machine_rank",
        str(node_id),
        "--num_processes",
        str(total),
        "--main_process_ip",
        hostnames[0],
        "--main_process_port",
        str(main_process_port(job_id)),
    ]
    if nodes == 1:
        # One node: torchrun's static rendezvous on our port, said explicitly so that an accelerate
        # config naming c10d cannot win. With one machine accelerate gives c10d no endpoint, torchrun
        # falls back to localhost:29400, and two single-node jobs sharing a machine would meet there.
        args += ["--rdzv_backend", "static", "--same_network"]
    else:
        args += ["--rdzv_backend", "c10d"]
    if total > 1:
        args.append("--multi_gpu")
    return args


def _default_gpus(env: Mapping) -> int:
    raw = env.get("SLURM_GPUS_ON_NODE")
    if not raw:
        raise SlurmError("--gpus-per-node is required (SLURM_GPUS_ON_NODE is not set)")
    return _int_var(env, ("SLURM_GPUS_ON_NODE",), 1)


def _accelerate_args(opts) -> list[str]:
    env = os.environ
    gpus = opts.gpus_per_node if opts.gpus_per_node is not None else _default_gpus(env)
    args = ["--config_file", opts.config_file] if opts.config_file else []
    return args + launch_args(env, gpus)


def _out_dir(argv: list[str]) -> str:
    """The experiment folder a stage command would write to, honouring `--set experiment.*`."""
    import warnings

    from trainer.config.load import load_config, parse_override

    p = argparse.ArgumentParser(prog="python3 -m trainer.parallel.slurm out-dir", add_help=False)
    p.add_argument("config")
    p.add_argument("--set", dest="overrides", action="append", default=[])
    opts, _ = p.parse_known_args(argv)
    if not os.path.isfile(opts.config):
        raise UserError(f"{opts.config}: config file not found")
    with warnings.catch_warnings():
        # the stage itself reports unused keys; saying it twice here would only add noise
        warnings.simplefilter("ignore")
        cfg = load_config(opts.config, dict(parse_override(o) for o in opts.overrides))
    return str(cfg.out_dir.resolve())


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python3 -m trainer.parallel.slurm",
        description="Run an advdiff stage under accelerate from inside a SLURM job step.",
    )
    sub = p.add_subparsers(dest="command", required=True)
    for name, doc in (
        ("exec", "replace this process with accelerate launch -m MODULE ARGS..."),
        ("print-args", "print the accelerate launch arguments for this node"),
    ):
        s = sub.add_parser(name, help=doc)
        s.add_argument(
            "--gpus-per-node",
            type=int,
            default=None,
            metavar="G",
            help="processes per node (default: $SLURM_GPUS_ON_NODE)",
        )
        s.add_argument("--config-file", default=None, metavar="FILE", help="accelerate config file")
    o = sub.add_parser("out-dir", help="print the experiment folder of CONFIG [STAGE FLAGS]")
    o.add_argument("rest", nargs=argparse.REMAINDER)
    return p


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    # Everything after "--" belongs to the stage, so argparse never sees (or rejects) its flags.
    tail: list[str] = []
    if "--" in argv:
        cut = argv.index("--")
        argv, tail = argv[:cut], argv[cut + 1 :]
    opts = build_parser().parse_args(argv)
    try:
        if opts.command == "out-dir":
            rest = opts.rest + tail
            if not rest:
                raise UserError("out-dir: CONFIG is required")
            print(_out_dir(rest))
            return 0
        if opts.command == "exec" and not tail:
            raise UserError("exec: expected -- MODULE [ARGS...] after the options")
        args = _accelerate_args(opts)
        if opts.command == "print-args":
            print(shlex.join(args))
            return 0
        cmd = [sys.executable, "-m", "accelerate.commands.launch", *args, "-m", *tail]
        print(
            f"advdiff.slurm: node {os.environ.get('SLURMD_NODENAME', '?')}: {shlex.join(cmd)}",
            file=sys.stderr,
            flush=True,
        )
        sys.stdout.flush()
        os.execvp(cmd[0], cmd)
    except UserError as e:
        print(f"trainer.parallel.slurm: error: {e}", file=sys.stderr)
        return e.exit_code
    return 0


if __name__ == "__main__":
    sys.exit(main())
