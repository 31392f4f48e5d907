#!/usr/bin/env bash
# The GPU checks of one device session, in one go: the CUDA tests, then the throughput
# benchmark. Results go to $OUT (or ./gpu_check_out): the logs and bench_gpu.json.
#     OUT=/tmp/out bash bench/gpu_check.sh
set -uo pipefail
out="${OUT:-gpu_check_out}"
mkdir -p "$out"
export PYTHONUNBUFFERED=1
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv | tee "$out/gpu.txt"
python3 -c "import torch, torchvision; print('torch', torch.__version__, 'torchvision', torchvision.__version__)" | tee -a "$out/gpu.txt"
timeout 120 python3 -m pytest -q -p no:cacheprovider tests/test_gpu.py tests/test_transferability.py -k "gpu" 2>&1 \
    | tee "$out/gpu_tests.log"
timeout "${BENCH_SECONDS:-430}" python3 bench/bench_gpu.py --json "$out/bench_gpu.json" 2>&1 | tee "$out/bench.log"
timeout 300 python3 bench/bench_estimators.py --device cuda 2>&1 | tee "$out/bench_estimators.log"
