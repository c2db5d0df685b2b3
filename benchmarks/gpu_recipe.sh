#!/usr/bin/env bash
# The GPU recipe as a user runs it, timed, on a machine that has never built GPTQModel's kernels: first the
# one-time builds (Marlin kernels through a `llmopt bench` of a random 2-layer GPTQ model, the AWQ extension
# through a `llmopt quantize -m awq` of a random model; side by side), then
# `llmopt run recipes/smollm2-135m-gpu.yaml`. From the repo root, after `python scripts/prepare_assets.py`:
#   bash benchmarks/gpu_recipe.sh OUT_DIR
# Wheels the machine lacks are installed from ./.whl (or $LLMOPT_WHEELS) as benchmarks/bench_gpu.sh does.
# Writes OUT_DIR/builds.log, OUT_DIR/run.log (with `time`), and the run's folder OUT_DIR/run.
set -euo pipefail
out=$(realpath -m "${1:?usage: gpu_recipe.sh OUT_DIR}")
mkdir -p "$out"
source "$(dirname "$0")/gpu_env.sh"
assets=${LLMOPT_ASSETS:-$HOME/.cache/llmopt/assets}
rand="$out/random"
python3 - "$rand" <<'PY'
import sys
from pathlib import Path

sys.path.insert(0, "scripts")
import random_models as rm

root = Path(sys.argv[1])
shape = dict(hidden_size=576, intermediate_size=1536, num_hidden_layers=2, num_attention_heads=9,
             num_key_value_heads=3, vocab_size=49152)  # SmolLM2's layer shapes, 2 layers
model = rm.build_fp16(rm.llama_config("tiny", **shape), "cuda:0")
rm.save_fp16(model, root / "fp16")
rm.write_random_gptq(model, root / "gptq", group_size=64)
PY
start=$(date +%s)
{
  python3 -m llmopt bench "$rand/gptq" --device cuda:0 --batch-sizes 1 --prompt-lens 16 --gen-len 8 --warmup 1 \
    --repetitions 1 --decode-mode eager -q &
  python3 -m llmopt quantize "$rand/fp16" -m awq --group-size 64 --calibration "$assets/text/britannica-calib.txt" \
    --samples 8 --seq-len 128 -o "$rand/awq" --overwrite --device cuda:0 -q &
  wait
} > "$out/builds.log" 2>&1
echo "one-time builds: $(( $(date +%s) - start )) s" | tee -a "$out/builds.log"
( time python3 -m llmopt run recipes/smollm2-135m-gpu.yaml -o "$out/run" --overwrite ) > "$out/run.log" 2>&1 || true
tail -5 "$out/run.log"
