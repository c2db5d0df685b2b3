#!/usr/bin/env bash
# SmolLM2-135M through llm-compressor on the GPU machine: each llmc method quantized by llmopt, scored against
# FP16 on the GPU and on the machine's CPU, and the same method through llm-compressor directly
# (benchmarks/llmc_compare.py). Results (eval reports, manifests, config.json of each artifact, direct.jsonl,
# the NVFP4 refusal on a pre-Blackwell GPU) go to OUT.
#
# Not run yet (no GPU time was left in the session that wrote it).
# Usage (repo root, SmolLM2 assets prepared, llmcompressor + compressed-tensors importable):
#   bash benchmarks/llmc_gpu.sh OUT [SAMPLES]
set -uo pipefail
out=$1
samples=${2:-64}
assets=${LLMOPT_ASSETS:-$HOME/.cache/llmopt/assets}
model=$assets/smollm2-135m-instruct
evaltext=$assets/text/britannica-eval.txt
calib=$assets/text/britannica-calib.txt
work=$(mktemp -d)
mkdir -p "$out"
calib_args=(--calibration "$calib" --samples "$samples" --seq-len 512)
eval_args=(--baseline "$model" --dataset "$evaltext" --max-tokens 6144)

quantize() {  # name method device [options...]
  local name=$1 method=$2 device=$3; shift 3
  local extra=()
  [ "$method" != llmc-fp8-dynamic ] && extra=("${calib_args[@]}")
  python3 -m llmopt quantize "$model" -m "$method" -o "$work/$name" --device "$device" "${extra[@]}" "$@" \
    --json >"$out/$name-manifest.json" 2>"$out/$name-quantize.log"
  echo "$name quantize rc=$?"
  cp "$work/$name/config.json" "$out/$name-config.json" 2>/dev/null
  du -sb "$work/$name" | cut -f1 >"$out/$name-bytes.txt"
}

quantize fp8-dynamic llmc-fp8-dynamic cuda:0
quantize w4a16-g64 llmc-w4a16 cuda:0 --group-size 64
quantize w8a8-int8 llmc-w8a8-int8 cuda:0
# NVFP4 has no kernel on Hopper: refused on the GPU (exit 4), made on the CPU instead.
quantize nvfp4-refused llmc-nvfp4 cuda:0
quantize nvfp4 llmc-nvfp4 cpu

for name in fp8-dynamic w4a16-g64 w8a8-int8 nvfp4; do
  for dev in cuda:0 cpu; do
    tag=${dev%%:*}
    python3 -m llmopt eval "$work/$name" "${eval_args[@]}" --device "$dev" --json "$out/$name-eval-$tag.json" \
      >"$out/$name-eval-$tag.log" 2>&1
    echo "$name eval $dev rc=$?"
  done
done

for pair in fp8-dynamic:fp8-dynamic w4a16-g64:w4a16 w8a8-int8:w8a8-int8; do
  name=${pair%%:*} method=${pair##*:}
  python3 benchmarks/llmc_compare.py --method "$method" --group-size 64 --samples "$samples" --seq-len 512 \
    --max-tokens 6144 --device cuda:0 --llmopt-report "$out/$name-eval-cuda.json" >>"$out/direct.jsonl" \
    2>"$out/$name-direct.log"
  echo "$name direct rc=$?"
done
rm -rf "$work"
