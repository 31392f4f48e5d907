#!/usr/bin/env bash
# The GPU checks of one device session, in one go and under one deadline: the CUDA tests, the
# throughput benchmark (the configurations with targets first), then the estimators on the GPU.
# Results go to $OUT (or ./gpu_check_out): the logs, bench_gpu.json (written after each
# configuration) and gpu.txt (the card).
#     OUT=/tmp/out TOTAL_SECONDS=540 bash bench/gpu_check.sh
# TOTAL_SECONDS (default 540) bounds the whole script; each step gets at most what is left.
set -uo pipefail
out="${OUT:-gpu_check_out}"
mkdir -p "$out"
export PYTHONUNBUFFERED=1
deadline=$((SECONDS + ${TOTAL_SECONDS:-540}))
left() {  # seconds left for a step that wants $1 (at least 1)
    local rest=$((deadline - SECONDS))
    ((rest < 1)) && rest=1
    echo $(($1 < rest ? $1 : rest))
}
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv | tee "$out/gpu.txt"
python3 -c "import torch, torchvision; print('torch', torch.__version__, 'torchvision', torchvision.__version__)" | tee -a "$out/gpu.txt"
timeout "$(left 150)" python3 -m pytest -q -p no:cacheprovider tests/test_gpu.py tests/test_transferability.py -k "gpu" 2>&1 \
    | tee "$out/gpu_tests.log"
timeout "$(left 450)" python3 bench/bench_gpu.py --configs jpeg,cifar,embedded --json "$out/bench_gpu.json" 2>&1 \
    | tee "$out/bench.log"
timeout "$(left 90)" python3 bench/bench_estimators.py --device cuda 2>&1 | tee "$out/bench_estimators.log"
echo "gpu_check: $((SECONDS))s of ${TOTAL_SECONDS:-540}s" | tee -a "$out/gpu.txt"
