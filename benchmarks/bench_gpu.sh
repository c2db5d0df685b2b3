#!/usr/bin/env bash
# Runs benchmarks/bench_gpu.py on the GPU machine, from the repo root: installs the Python wheels that machine
# lacks (built here by the team's wheels script into ./.whl, or $LLMOPT_WHEELS), then the benchmark.
#   bash benchmarks/bench_gpu.sh OUT_DIR [bench_gpu.py options...]
set -euo pipefail
out=${1:?usage: bench_gpu.sh OUT_DIR [options]}; shift
mkdir -p "$out"
wheels=${LLMOPT_WHEELS:-.whl}
if compgen -G "$wheels/*.whl" >/dev/null; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --target /tmp/llmopt-site "$wheels"/*.whl
  export PYTHONPATH=/tmp/llmopt-site:$PWD
else
  export PYTHONPATH=$PWD
fi
export PYTHONUNBUFFERED=1 MAX_JOBS=${MAX_JOBS:-16} TOKENIZERS_PARALLELISM=false HF_HUB_OFFLINE=1
nvidia-smi --query-gpu=name,memory.total,clocks.max.sm,clocks.max.mem,driver_version --format=csv | tee "$out/gpu.txt"
python3 benchmarks/bench_gpu.py --out "$out" "$@" 2>&1 | tee "$out/bench.log"
