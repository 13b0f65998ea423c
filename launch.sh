#!/usr/bin/env bash
# Run an advdiff stage under accelerate, on this machine or as a SLURM batch job.
#   ./launch.sh CONFIG [--stage stage0|stage1|stage2] [--gpus N] [--config accelerate_configs/X.yaml]
#               [--mixed-precision no|fp16|bf16] [--cpu] [--dry-run] -- [stage flags]
#   ./launch.sh --slurm --nodes M --gpus-per-node G [--partition P] [--time T] [--signal-seconds S]
#               [--cpus-per-task C] [--stage ...] [--config ...] [--mixed-precision ...] [--cpu] [--dry-run]
#               CONFIG -- [stage flags]
# The stage defaults to stage2. --dry-run prints what would run (and the sbatch script) and stops.
set -euo pipefail

usage() { sed -n '2,8p' "$0" | sed 's/^# \{0,1\}//'; }
die() { echo "launch.sh: error: $*" >&2; exit 2; }
# An option's value must exist and must not be the next option (a forgotten value).
value_of() { [ $# -ge 2 ] && [ -n "$2" ] && [[ "$2" != --* ]] || die "$1 needs a value"; printf '%s' "$2"; }
posint() { [[ "$2" =~ ^[1-9][0-9]*$ ]] || die "$1: expected a positive integer, got '$2'"; }
quoted() { local out; printf -v out '%q ' "$@"; printf '%s' "${out% }"; }

config="" stage="stage2" gpus="" acc_config="" mp="" cpu=0 dry_run=0
slurm=0 nodes="" gpus_per_node="" partition="" time_limit="" signal_seconds=300 cpus_per_task=""
while [ $# -gt 0 ]; do
  case "$1" in
    --stage) stage=$(value_of "$@"); shift 2 ;;
    --gpus) gpus=$(value_of "$@"); posint --gpus "$gpus"; shift 2 ;;
    --config) acc_config=$(value_of "$@"); shift 2 ;;
    --mixed-precision|--mixed_precision) mp=$(value_of "$@"); shift 2 ;;
    --cpu) cpu=1; shift ;;
    --dry-run|--dry_run) dry_run=1; shift ;;
    --slurm) slurm=1; shift ;;
    --nodes) nodes=$(value_of "$@"); posint --nodes "$nodes"; shift 2 ;;
    --gpus-per-node) gpus_per_node=$(value_of "$@"); posint --gpus-per-node "$gpus_per_node"; shift 2 ;;
    --partition) partition=$(value_of "$@"); shift 2 ;;
    --time) time_limit=$(value_of "$@"); shift 2 ;;
    --signal-seconds) signal_seconds=$(value_of "$@"); posint --signal-seconds "$signal_seconds"; shift 2 ;;
    --cpus-per-task) cpus_per_task=$(value_of "$@"); posint --cpus-per-task "$cpus_per_task"; shift 2 ;;
    -h|--help) usage; exit 0 ;;
    --) shift; break ;;
    -*) die "unknown option $1 (stage flags go after --; see ./launch.sh --help)" ;;
    *) [ -z "$config" ] || die "unexpected argument $1 (stage flags go after --)"; config="$1"; shift ;;
  esac
done
[ -n "$config" ] || die "CONFIG is required (see ./launch.sh --help)"
[ -f "$config" ] || die "$config: config file not found"
case "$stage" in stage0|stage1|stage2) ;; *) die "--stage: expected stage0, stage1 or stage2, got $stage" ;; esac
case "$mp" in ""|no|fp16|bf16) ;; *) die "--mixed-precision: expected no, fp16 or bf16, got $mp" ;; esac
if [ -n "$acc_config" ] && [ ! -f "$acc_config" ]; then die "--config $acc_config: file not found"; fi
PYTHON=${PYTHON:-python3}

stage_flags=()
[ -n "$mp" ] && stage_flags+=(--mixed_precision "$mp")
[ "$cpu" = 1 ] && stage_flags+=(--device cpu)

if [ "$slurm" = 0 ]; then
  for opt in nodes gpus_per_node partition time_limit cpus_per_task; do
    [ -z "${!opt}" ] || die "--${opt//_/-} needs --slurm"
  done
  args=()
  [ -n "$acc_config" ] && args+=(--config_file "$acc_config")
  if [ -n "$gpus" ]; then
    args+=(--num_processes "$gpus")
    [ "$gpus" -gt 1 ] && args+=(--multi_gpu)
  fi
  cmd=("$PYTHON" -m accelerate.commands.launch "${args[@]}" -m "trainer.$stage" "$config" "${stage_flags[@]}" "$@")
  if [ "$dry_run" = 1 ]; then
    [ "$cpu" = 1 ] && printf 'ACCELERATE_USE_CPU=1 '
    quoted "${cmd[@]}"; echo
    exit 0
  fi
  [ "$cpu" = 1 ] && export ACCELERATE_USE_CPU=1
  echo "+ $(quoted "${cmd[@]}")" >&2
  exec "${cmd[@]}"
fi

# ---- SLURM ----
[ -z "$gpus" ] || die "--gpus is for local runs; with --slurm give --nodes and --gpus-per-node"
[ -n "$nodes" ] || die "--slurm needs --nodes M"
[ -n "$gpus_per_node" ] || die "--slurm needs --gpus-per-node G (processes per node)"
[ "$dry_run" = 1 ] || command -v sbatch >/dev/null || die "sbatch not found; run this on a SLURM login node (or use --dry-run)"

# The job may start in another directory and on another node: hand it absolute paths and the
# interpreter this shell resolves (a venv or pyenv python), not a bare name looked up there.
abspath() { (cd "$(dirname "$1")" && printf '%s/%s' "$(pwd -P)" "$(basename "$1")"); }
config=$(abspath "$config")
[ -z "$acc_config" ] || acc_config=$(abspath "$acc_config")
python_bin=$("$PYTHON" -c 'import sys; print(sys.executable)') || die "$PYTHON does not run"
out_dir=$("$PYTHON" -m trainer.parallel.slurm out-dir "$config" -- "$@") || exit 2
# #SBATCH lines are not shell: sbatch would split them at blanks and expand % patterns in file names.
[[ "$out_dir" =~ ^[^[:space:]%\"\'\\]+$ ]] || die "experiment folder '$out_dir': SLURM output paths cannot hold blanks, quotes, backslashes or %"
slurm_dir="$out_dir/slurm"
script_path="$slurm_dir/advdiff_$stage.sbatch"
[ "$cpu" = 1 ] && [ -z "$cpus_per_task" ] && cpus_per_task=$gpus_per_node

exec_flags=(--gpus-per-node "$gpus_per_node")
[ -z "$acc_config" ] || exec_flags+=(--config-file "$acc_config")
srun_flags=(--nodes="$nodes" --ntasks-per-node=1 --kill-on-bad-exit=1)
# Without it a step's task may be confined to one CPU, shared by all G trainer processes.
[ -z "$cpus_per_task" ] || srun_flags+=(--cpus-per-task="$cpus_per_task")
run_cmd=(srun "${srun_flags[@]}" "$python_bin" -m trainer.parallel.slurm exec "${exec_flags[@]}" --
         "trainer.$stage" "$config" "${stage_flags[@]}" "$@")

sbatch_script() {
  cat <<EOF
#!/bin/bash
#SBATCH --job-name=advdiff_$stage
#SBATCH --nodes=$nodes
#SBATCH --ntasks-per-node=1
EOF
  if [ "$cpu" = 0 ]; then echo "#SBATCH --gpus-per-node=$gpus_per_node"; fi
  if [ -n "$cpus_per_task" ]; then echo "#SBATCH --cpus-per-task=$cpus_per_task"; fi
  if [ -n "$partition" ]; then echo "#SBATCH --partition=$partition"; fi
  if [ -n "$time_limit" ]; then echo "#SBATCH --time=$time_limit"; fi
  cat <<EOF
#SBATCH --signal=B:USR1@$signal_seconds
#SBATCH --requeue
#SBATCH --open-mode=append
#SBATCH --output=$slurm_dir/advdiff_${stage}_%j.out
#SBATCH --error=$slurm_dir/advdiff_${stage}_%j.err
# Written by launch.sh. Resubmitting this file (sbatch FILE) continues the run where it stopped.

# No -e: srun's exit status is inspected below, not fatal.
set -uo pipefail
out_dir=$(quoted "$out_dir")
stop_file="\$out_dir/.advdiff_stop"
marker="\$out_dir/.advdiff_requeue"

# --signal=B: reaches this shell only, and accelerate's launcher would not pass USR1 on to its
# workers anyway; the stop file (on the shared experiment folder) reaches every rank on every node.
# Trapped before anything else: with a time limit under --signal-seconds the signal comes at
# once, and an untrapped USR1 would kill this shell.
stop_requested=0
request_stop() {
  stop_requested=1
  echo "advdiff: received \$1; asking the trainer to save and stop at its next step"
  touch "\$stop_file"
}
trap 'request_stop USR1' USR1
trap 'request_stop TERM' TERM

# Leftovers of an earlier run would stop this one at its first step, or requeue it for nothing.
rm -f "\$stop_file" "\$marker"
[ "\$stop_requested" = 0 ] || touch "\$stop_file"
export ADVDIFF_STOP_FILE="\$stop_file"
export PYTHONUNBUFFERED=1
EOF
  if [ "$cpu" = 1 ]; then echo "export ACCELERATE_USE_CPU=1"; fi
  cat <<EOF
echo "advdiff: job \$SLURM_JOB_ID, start \$(( \${SLURM_RESTART_COUNT:-0} + 1 )), on \$SLURM_JOB_NODELIST at \$(date -Is)"

# In the background, because bash runs a trap only once the foreground command has returned.
# Each node's rank is computed by trainer.parallel.slurm inside its own task, never here.
$(quoted "${run_cmd[@]}") &
srun_pid=\$!
# A trap interrupts wait while srun runs on; wait again until srun is gone, then collect its status.
while kill -0 "\$srun_pid" 2>/dev/null; do wait "\$srun_pid"; done
wait "\$srun_pid"; status=\$?
trap - USR1 TERM
rm -f "\$stop_file"

# The trainer leaves the marker after saving its resume state (accelerate turns its exit code
# 75 into 1, so the marker is the reliable sign).
if [ -e "\$marker" ]; then
  rm -f "\$marker"
  echo "advdiff: resume state saved; requeueing job \$SLURM_JOB_ID"
  # Once the controller accepts the requeue it ends this script itself. A busy controller can
  # time an RPC out: a few tries, each bounded, each failure shown in the job's .err file.
  tries=3
  for try in \$(seq 1 "\$tries"); do
    if [ "\$try" -gt 1 ]; then sleep 3; fi
    if command -v timeout >/dev/null; then
      err=\$(timeout 60 scontrol requeue "\$SLURM_JOB_ID" 2>&1); rc=\$?
    else
      err=\$(scontrol requeue "\$SLURM_JOB_ID" 2>&1); rc=\$?
    fi
    [ "\$rc" != 0 ] || exit 0
    [ "\$rc" != 124 ] || err="no answer in 60 s"
    echo "advdiff: scontrol requeue \$SLURM_JOB_ID failed (try \$try of \$tries, exit status \$rc): \${err:-no message}" >&2
  done
  echo "advdiff: error: job \$SLURM_JOB_ID was not requeued; its resume state is saved: sbatch $(quoted "$script_path") continues the run" >&2
  exit 75
fi
echo "advdiff: srun finished with status \$status"
exit "\$status"
EOF
}

if [ "$dry_run" = 1 ]; then
  echo "# $script_path"
  sbatch_script
  echo "# launch command (run by srun on each node):"
  echo "# $(quoted "${run_cmd[@]}")"
  exit 0
fi

mkdir -p "$slurm_dir"
tmp=$(mktemp "$script_path.XXXXXX")
trap 'rm -f "$tmp"' EXIT
sbatch_script > "$tmp"
chmod 0644 "$tmp"
mv -f "$tmp" "$script_path"
trap - EXIT
job=$(sbatch --parsable "$script_path") || die "sbatch $script_path failed"
job=${job%%;*}
echo "launch.sh: submitted job $job: $script_path (logs: $slurm_dir/advdiff_${stage}_$job.{out,err})" >&2
echo "$job"
