#!/usr/bin/env bash
# GPU checks for pbt on ONE CUDA GPU, in one go (each step has a time limit; 10 minutes at
# most), nothing downloaded.
#
#   1. bench/gpu_speed.py (limit 280 s; about 3-4 min on an H100): resnet50 at 224x224,
#      batch 64, one synthetic batch on the device, images/s for fp32, bf16,
#      bf16 + channels_last and bf16 + channels_last + torch.compile (compile time shown),
#      each through a hand-written loop and through pbt's engine; then resnet18 bf16 +
#      channels_last through the engine on 5,000 JPEG files with pbt's loader vs synthetic
#      data, with the GPU utilisation during the timed steps.
#   2. pytest -m gpu (tests/test_gpu.py, one case in test_prune.py): bf16 / fp16 (GradScaler)
#      / fp32 training steps with the forward's dtype checked; SlimRegularizer under fp16's
#      scaler; pinned-memory loaders; the recipe end to end on --gpu_id 0;
#      exact resume on GPU (an MLP bit-identical after SIGKILL; resnet18 compared with the
#      GPU's own rerun, since cuDNN may choose non-deterministic kernels); pruning and
#      fine-tuning on GPU, then ONNX export of that CUDA-trained model with CUDA hidden.
#      The 2-GPU DDP + SyncBatchNorm test skips on one GPU.
#   3. one summary table of every step and the facts the tests report.
#
# Usage: bash bench/gpu_check.sh      (exit status 0 only if every step passed)
#        PYTHON=python3 bash bench/gpu_check.sh
set -uo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-$(command -v python || command -v python3)}
LOGS=$(mktemp -d /tmp/pbt-gpu-check.XXXXXX)
export PBT_GPU_REPORT="${LOGS}/facts.txt"
: >"${PBT_GPU_REPORT}"
status=0
ROWS=()
step() {  # step LIMIT_S TITLE PATTERN COMMAND...: run one check; PATTERN picks its result line
    local limit=$1 title=$2 pattern=$3
    shift 3
    echo
    echo "== ${title}"
    local start=$SECONDS log="${LOGS}/step${#ROWS[@]}.log"
    timeout --kill-after=10 "${limit}" "$@" 2>&1 | tee "${log}"
    local rc=${PIPESTATUS[0]}
    local seconds=$((SECONDS - start))
    local result
    result=$(grep -E "${pattern}" "${log}" | tail -n 1 | tr -s ' ' | cut -c1-90)
    echo "-- ${title}: exit ${rc} after ${seconds} s"
    ROWS+=("$(printf '%-34s %4s %5ss  %s' "${title}" "${rc}" "${seconds}" "${result}")")
    if [ "${rc}" -ne 0 ]; then status=1; fi
}

if ! "${PYTHON}" -c "import sys, torch; sys.exit(0 if torch.cuda.is_available() else 1)"; then
    echo "gpu_check: no CUDA GPU is visible to torch" >&2
    exit 1
fi
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader || true
"${PYTHON}" -c "import torch, torchvision, accelerate; print('torch', torch.__version__, \
'CUDA', torch.version.cuda, 'cuDNN', torch.backends.cudnn.version(), 'torchvision', \
torchvision.__version__, 'accelerate', accelerate.__version__, 'bf16', \
torch.cuda.is_bf16_supported())"

step 280 "gpu_speed (resnet50, JPEG loader)" '^gpu_speed:' \
    "${PYTHON}" bench/gpu_speed.py

step 330 "pytest -m gpu" '(passed|failed|error)' \
    "${PYTHON}" -m pytest -q -m gpu -rA -p no:cacheprovider tests/

echo
echo "================================ gpu_check summary ================================"
printf '%-34s %4s %6s  %s\n' "step" "exit" "time" "result"
for row in "${ROWS[@]}"; do echo "${row}"; done
echo "-- facts reported by the GPU tests:"
sed 's/^/   /' "${PBT_GPU_REPORT}"
if [ "${status}" -eq 0 ]; then echo "gpu_check: all passed"; else echo "gpu_check: FAILED"; fi
rm -rf "${LOGS}"
exit "${status}"
