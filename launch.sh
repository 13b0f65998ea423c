#!/usr/bin/env bash
# Local launcher: one `accelerate launch` of an advdiff stage.
#   ./launch.sh CONFIG [--stage stage1] [--gpus N] [--config accelerate_configs/X.yaml]
#               [--mixed-precision no|fp16|bf16] [--cpu] -- [stage flags]
# (SLURM submission arrives with the scale-out work.)
set -euo pipefail

usage() { sed -n '2,5p' "$0" | sed 's/^# \{0,1\}//'; }

config="" stage="stage1" gpus="" acc_config="" mp="" cpu=0
while [ $# -gt 0 ]; do
  case "$1" in
    --stage) stage="$2"; shift 2 ;;
    --gpus) gpus="$2"; shift 2 ;;
    --config) acc_config="$2"; shift 2 ;;
    --mixed-precision|--mixed_precision) mp="$2"; shift 2 ;;
    --cpu) cpu=1; shift ;;
    -h|--help) usage; exit 0 ;;
    --) shift; break ;;
    -*) echo "launch.sh: error: unknown option $1" >&2; usage >&2; exit 2 ;;
    *) if [ -z "$config" ]; then config="$1"; shift; else echo "launch.sh: error: unexpected $1" >&2; exit 2; fi ;;
  esac
done
[ -n "$config" ] || { echo "launch.sh: error: CONFIG is required" >&2; usage >&2; exit 2; }
[ -f "$config" ] || { echo "launch.sh: error: $config: config file not found" >&2; exit 2; }
case "$stage" in stage0|stage1) ;; *) echo "launch.sh: error: --stage: expected stage0 or stage1, got $stage" >&2; exit 2 ;; esac

args=()
[ -n "$acc_config" ] && args+=(--config_file "$acc_config")
if [ -n "$gpus" ]; then
  args+=(--num_processes "$gpus")
  [ "$gpus" -gt 1 ] && args+=(--multi_gpu)
fi
stage_flags=()
[ -n "$mp" ] && stage_flags+=(--mixed_precision "$mp")
if [ "$cpu" = 1 ]; then export ACCELERATE_USE_CPU=1; stage_flags+=(--device cpu); fi
set -x
exec python3 -m accelerate.commands.launch "${args[@]}" -m "trainer.$stage" "$config" "${stage_flags[@]}" "$@"
