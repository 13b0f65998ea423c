#!/usr/bin/env bash
# The GPU path on one CUDA GPU, through the trainer's own code (bench/gpu_bench.py):
#   - unet64_d4 at 16x32x32: 5000 fakes x 100 DDIM steps in bf16 and fp32 (TF32 on; strict fp32 on
#     1000 fakes, scaled to 5000), larger batches, channels-last, torch.compile;
#   - D and diffusion fine-tune steps/s in fp32 (TF32 on and off), bf16 and fp16, with peak memory;
#   - reproducibility: generation and 3 training steps twice, with and without training.deterministic.
# Usage: bash bench/gpu.sh            (results: $OUT/gpu_results.jsonl, default bench/results/)
# EXTRA="--device cpu --smoke" runs every part at toy sizes on a CPU (a check of the script).
# Runs what fits in BUDGET seconds (default 540), most important first; a part that fails is logged
# to $OUT/gpu_errors.log and the rest go on. Where diffusers is missing and .wheels/ holds its wheel
# (a machine without network), it is installed from there first.
set -u
cd "$(dirname "$0")/.."
export OUT=${OUT:-bench/results}
mkdir -p "$OUT"
BUDGET=${BUDGET:-540}
if ! python3 -c "import diffusers" 2>/dev/null; then
  python3 -m pip install -q --no-index --no-deps .wheels/*.whl || { echo "diffusers missing"; exit 2; }
fi
export PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH}
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader 2>&1 | tee "$OUT/gpu_machine.txt"
python3 -c "import torch, diffusers, accelerate; print('torch', torch.__version__, 'cuda', torch.version.cuda, 'diffusers', diffusers.__version__, 'accelerate', accelerate.__version__)" | tee -a "$OUT/gpu_machine.txt"
date -u +%Y-%m-%d | tee -a "$OUT/gpu_machine.txt"

run() {  # run SECONDS_NEEDED ARGS...: skip when the budget cannot cover it
  local need=$1; shift
  if (( SECONDS + need > BUDGET )); then echo "skipped (budget): $*" | tee -a "$OUT/gpu_errors.log"; return; fi
  local t0=$SECONDS
  timeout $(( need * 2 )) python3 bench/gpu_bench.py "$@" ${EXTRA:-} 2> "$OUT/last_err.txt" \
    || { echo "FAILED: $* (rc $?)" >> "$OUT/gpu_errors.log"; tail -5 "$OUT/last_err.txt" >> "$OUT/gpu_errors.log"; }
  echo "[$(( SECONDS - t0 )) s] $*"
}

run 45  gen --precision bf16 --n 5000 --batch 500
run 50  gen --precision no --n 5000 --batch 500
run 45  train --precision bf16
run 60  train --precision no
run 45  train --precision fp16
run 45  gen --precision no --no-tf32 --n 1000 --batch 500
run 40  gen --precision bf16 --n 5000 --batch 1250
run 40  gen --precision bf16 --n 5000 --batch 500 --channels_last
run 60  train --precision no --no-tf32 --g_steps 4
run 35  repro --precision bf16
run 35  repro --precision bf16 --deterministic
run 90  gen --precision bf16 --n 2000 --batch 500 --compile
run 45  train --precision bf16 --channels_last
python3 bench/gpu_table.py "$OUT/gpu_results.jsonl"
