#!/usr/bin/env bash
# The GPU measurements docs/BENCHMARKS.md still lacks, in priority order, each through the CLI a user runs, with
# a timeline (OUT/timeline.txt) so that a session cut short keeps what finished:
#   1. 8B shape (random weights): `llmopt bench` of FP16, llm-compressor W4A16 g128 (Marlin, after the fix that
#      gives it GPTQ-Marlin's atomicAdd setting) and a GPTQ 4-bit g128 checkpoint, one after the other;
#   2. SmolLM2: `llmopt run recipes/smollm2-135m-gpu.yaml` for the FP8-dynamic and W4A16 variants with ARC-Easy;
#   3. llama.cpp built for CUDA (with the system compiler, also as CUDA host compiler: the machine's default CXX
#      and CUDAHOSTCXX link libstdc++ statically),
#      then `recipes/smollm2-135m-gguf.yaml --device cuda:0` and `llmopt serve-bench` of its q4_k_m against f16
#      through llama-server on the GPU (16 slots) at four rates, and prefix caching on vs off;
#   4. `llmopt serve-bench` through transformers serve (continuous batching), FP16 vs nf4, four rates to saturation.
# GPTQModel's one-time Marlin build and the llama.cpp build run on the CPU beside steps 1-2.
#
# Run on 2026-12-03 (docs/results/gpu-pending-h200/README.md says what needed a hand there, fixed since: the CUDA
# host compiler, the tokenizer flag, imatrix artifact folders; transformers serve needs its serving extra).
# Usage (repo root, `python scripts/prepare_assets.py` and `python scripts/prepare_tasks.py` done, the wheels the
# machine lacks in ./.whl or $LLMOPT_WHEELS, llama-cpp-python's sdist reachable by pip or already in
# $LLMOPT_LLAMACPP_DIR/<version>/):
#   bash benchmarks/gpu_pending.sh OUT [STEP ...]      # steps: 8b smollm2 llamacpp serve (default: all)
set -uo pipefail
out=$(realpath -m "${1:?usage: gpu_pending.sh OUT [8b] [smollm2] [llamacpp] [serve]}"); shift
steps=${*:-8b smollm2 llamacpp serve}
mkdir -p "$out"
source "$(dirname "$0")/gpu_env.sh"
assets=${LLMOPT_ASSETS:-$HOME/.cache/llmopt/assets}
model=$assets/smollm2-135m-instruct
t0=$(date +%s)
t() { echo "[$(( $(date +%s) - t0 )) s] $*" | tee -a "$out/timeline.txt"; }
want() { [[ " $steps " == *" $1 "* ]]; }
L=(python3 -m llmopt)
t "start: $steps"
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv > "$out/gpu.txt" 2>&1

if want llamacpp; then
  ( CC=gcc CXX=g++ CUDAHOSTCXX=g++ CMAKE_ARGS="-DGGML_NATIVE=OFF -DGGML_CUDA=ON -DCMAKE_CUDA_ARCHITECTURES=90 -DGGML_METAL=OFF \
      -DGGML_VULKAN=OFF -DGGML_BLAS=OFF" python3 scripts/build_llamacpp.py -j "${LLAMACPP_JOBS:-10}" \
      > "$out/llamacpp-build.log" 2>&1
    echo $? > "$out/llamacpp-build.rc"; t "llama.cpp CUDA build rc=$(cat "$out/llamacpp-build.rc")" ) &
fi

# GPTQModel's one-time build of its Marlin kernels (a tiny random GPTQ model through `llmopt bench`); its AWQ
# extension is not built: no step below scores an AWQ artifact
rand=$out/random
python3 - "$rand" > "$out/random.log" 2>&1 <<'PY'
import random
import sys
from pathlib import Path

sys.path.insert(0, "scripts")
import random_models as rm

root = Path(sys.argv[1])
shape = dict(hidden_size=576, intermediate_size=1536, num_hidden_layers=2, num_attention_heads=9,
             num_key_value_heads=3, vocab_size=49152)
model = rm.build_fp16(rm.llama_config("tiny", **shape), "cuda:0")
rm.save_fp16(model, root / "fp16")
rm.write_random_gptq(model, root / "gptq", group_size=64)
random.seed(0)  # calibration text for the random 8B model: its tokenizer's made-up words
words = [" ".join(f"w{random.randrange(3, 128000)}" for _ in range(300)) for _ in range(200)]
(root / "words.txt").write_text("\n".join(words) + "\n")
PY
( "${L[@]}" bench "$rand/gptq" --device cuda:0 --batch-sizes 1 --prompt-lens 16 --gen-len 8 --warmup 1 \
    --repetitions 1 --decode-mode eager -q > "$out/build-marlin.log" 2>&1
  t "GPTQModel's Marlin build rc=$?" ) &
builds=$!

if want 8b; then  # the 8B model and its W4A16 artifact (GPU, no timing) beside step 2
  ( python3 - "$out/m8" > "$out/8b-model.log" 2>&1 <<'PY'
import sys
from pathlib import Path

sys.path.insert(0, "scripts")
import random_models as rm

root = Path(sys.argv[1])
model = rm.build_fp16(rm.llama_config("8b"), "cuda:0")
rm.save_fp16(model, root / "fp16")
rm.write_random_gptq(model, root / "gptq", group_size=128)
PY
    t "8B FP16 + GPTQ g128 checkpoint rc=$?"
    "${L[@]}" quantize "$out/m8/fp16" -m llmc-w4a16 --group-size 128 --calibration "$rand/words.txt" --samples 16 \
      --seq-len 256 -o "$out/m8/w4a16" --device cuda:0 > "$out/8b-w4a16-quantize.log" 2>&1
    t "8B W4A16 quantize rc=$?" ) &
  m8=$!
fi

if want smollm2; then
  "${L[@]}" run recipes/smollm2-135m-gpu.yaml --only llmc-fp8-dynamic --only llmc-w4a16-g64 \
    --tasks "$assets/tasks/arc_easy_local/arc_easy_local.yaml" --set evaluation.throughput=null \
    -o "$out/smollm2" --overwrite --json-file "$out/smollm2.json" > "$out/smollm2.log" 2>&1
  t "SmolLM2 FP8 + W4A16 with ARC-Easy rc=$?"
fi

wait "$builds"
if want 8b; then
  wait "$m8"
  for v in fp16 w4a16 gptq; do  # one after the other, nothing else on the GPU
    "${L[@]}" bench "$out/m8/$v" --device cuda:0 --batch-sizes 1,8,32 --prompt-lens 128,2048 --decode-mode graph \
      --json-file "$out/8b-bench-$v.json" > "$out/8b-bench-$v.log" 2>&1
    t "8B bench $v rc=$?"
  done
  rm -rf "$out/m8"
fi

if want llamacpp; then
  while [ ! -f "$out/llamacpp-build.rc" ]; do sleep 5; done
  if [ "$(cat "$out/llamacpp-build.rc")" = 0 ]; then
    "${L[@]}" run recipes/smollm2-135m-gguf.yaml --device cuda:0 -o "$out/gguf" --overwrite \
      --json-file "$out/gguf.json" > "$out/gguf.log" 2>&1
    t "GGUF recipe on cuda:0 rc=$?"
    "${L[@]}" quantize "$model" -m gguf --quant-type f16 -o "$out/gguf-f16" --overwrite -q > "$out/gguf-f16.log" 2>&1
    "${L[@]}" serve-bench "$out/gguf/artifacts/q4_k_m" --baseline "$out/gguf-f16" --device cuda:0 --parallel 16 \
      --rates 4,16,64,256 --requests 48 --out "$out/serve-llamacpp" > "$out/serve-llamacpp.log" 2>&1
    t "llama-server sweep on cuda:0 rc=$?"
    for pc in prefix-caching no-prefix-caching; do
      "${L[@]}" serve-bench "$out/gguf/artifacts/q4_k_m" --device cuda:0 --parallel 16 --rates 16 --requests 48 --prefix-len 512 \
        --prefix-share 1 "--$pc" --out "$out/serve-llamacpp-$pc" > "$out/serve-llamacpp-$pc.log" 2>&1
      t "llama-server --$pc rc=$?"
    done
  fi
fi

if want serve; then
  "${L[@]}" quantize "$model" -m bnb-nf4 -o "$out/nf4" --overwrite --device cuda:0 -q > "$out/nf4.log" 2>&1
  "${L[@]}" serve-bench "$out/nf4" --baseline "$model" --device cuda:0 --rates 4,16,64,256 --requests 48 \
    --out "$out/serve-transformers" > "$out/serve-transformers.log" 2>&1
  t "transformers serve sweep rc=$?"
fi
t end
