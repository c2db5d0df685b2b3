#!/usr/bin/env bash
# Runs benchmarks/bench_gpu.py on the GPU machine, from the repo root: installs the Python wheels that machine
# lacks (built here by the team's wheels script into ./.whl, or $LLMOPT_WHEELS), then the benchmark.
#   bash benchmarks/bench_gpu.sh OUT_DIR [bench_gpu.py options...]
set -euo pipefail
out=${1:?usage: bench_gpu.sh OUT_DIR [options]}; shift
mkdir -p "$out"
source "$(dirname "$0")/gpu_env.sh"
nvidia-smi --query-gpu=name,memory.total,clocks.max.sm,clocks.max.mem,driver_version --format=csv | tee "$out/gpu.txt"
python3 benchmarks/bench_gpu.py --out "$out" "$@" 2>&1 | tee "$out/bench.log"
