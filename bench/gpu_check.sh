#!/usr/bin/env bash
# GPU checks for pbt on one CUDA GPU; at most about 5 minutes, nothing is downloaded.
#
#   1. resnet50 at 224x224, batch 64, training throughput through pbt's engine
#      (bench/ddp_scaling.py, synthetic images): fp32 vs mixed_precision bf16
#   2. the classification recipe for one epoch on GPU 0 (python ... --gpu_id 0, no launcher)
#   3. the test suite's GPU-marked tests (pytest -m gpu; the 2-GPU DDP test skips on 1 GPU)
#
# Usage: bash bench/gpu_check.sh          (exit status 0 only if every step passed)
set -uo pipefail
cd "$(dirname "$0")/.."
status=0
step() {  # step LIMIT_S TITLE COMMAND...: run one check under a time limit, note a failure
    local limit=$1 title=$2
    shift 2
    echo
    echo "== ${title}"
    local start=$SECONDS
    timeout --kill-after=10 "${limit}" "$@"
    local rc=$?
    echo "-- ${title}: exit ${rc} after $((SECONDS - start)) s"
    if [ "${rc}" -ne 0 ]; then status=1; fi
}

if ! python -c "import sys, torch; sys.exit(0 if torch.cuda.is_available() else 1)"; then
    echo "gpu_check: no CUDA GPU is visible to torch" >&2
    exit 1
fi
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader || true
python -c "import torch; print('torch', torch.__version__, 'CUDA', torch.version.cuda, \
'bf16', torch.cuda.is_bf16_supported())"

BENCH=(python bench/ddp_scaling.py --device cuda --processes 1 --net_type resnet50
       --input_size 224 224 --batch_size 64 --steps 30 --warmup 10 --repeats 1)
step 100 "resnet50 224x224 batch 64, fp32" "${BENCH[@]}" --mixed_precision no
step 100 "resnet50 224x224 batch 64, bf16" "${BENCH[@]}" --mixed_precision bf16

WORK=$(mktemp -d /tmp/pbt-gpu-check.XXXXXX)
step 100 "recipe, 1 epoch of digits on --gpu_id 0" \
    python recipes/classification.py --gpu_id 0 --num_epochs 1 --input_size 32 32 \
    --progress false --work_dir "${WORK}" --run_name gpu
python - "${WORK}/gpu/summary.json" <<'EOF' || status=1
import json, sys
summary = json.load(open(sys.argv[1]))
print(f"recipe: world_size {summary['world_size']}, test top1 {summary['best_top1']:.2f}%, "
      f"{summary['seconds']} s")
EOF
rm -rf "${WORK}"

step 90 "pytest -m gpu" python -m pytest -q -m gpu tests/

echo
if [ "${status}" -eq 0 ]; then echo "gpu_check: all passed"; else echo "gpu_check: FAILED"; fi
exit "${status}"
