#!/usr/bin/env python3
"""Does llmopt lose anything wrapping llm-compressor? The same methods through llm-compressor directly.

For each method this script runs llm-compressor the way its own examples do (``oneshot`` with the modifier,
``save_pretrained(save_compressed=True)``), on the same calibration token ids llmopt cuts
(``llmopt.data.calibration_set``: same text, samples, length, seed), reloads the folder with transformers
(compressed-tensors decompresses it) and scores perplexity with the independent loop of
``compare_direct.py`` (transformers' ``labels`` recipe) on the first ``--max-tokens`` evaluation tokens.
It prints these numbers next to those of an ``llmopt eval --json`` report of llmopt's artifact.

Usage:
  python benchmarks/llmc_compare.py --method w4a16 --group-size 64 --samples 64 --seq-len 512 \
      --device cuda:0 --max-tokens 6144 --llmopt-report out/w4a16-eval.json
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "scripts"))
from compare_direct import perplexity
from prepare_assets import default_cache, prepare


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--method", choices=["fp8-dynamic", "w8a8-int8", "w4a16", "nvfp4"], required=True)
    p.add_argument("--group-size", type=int, default=128)
    p.add_argument("--samples", type=int, default=64)
    p.add_argument("--seq-len", type=int, default=512)
    p.add_argument("--context", type=int, default=512)
    p.add_argument("--max-tokens", type=int, default=None)
    p.add_argument("--device", default="cpu", help="where the folder is scored")
    p.add_argument("--llmopt-report", type=Path, help="an `llmopt eval --json` report to compare against")
    args = p.parse_args()

    import torch
    from datasets import Dataset
    from llmcompressor import oneshot
    from llmcompressor.modifiers.gptq import GPTQModifier
    from llmcompressor.modifiers.quantization import QuantizationModifier
    from llmcompressor.modifiers.transform.smoothquant import SmoothQuantModifier
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from llmopt.data import calibration_set

    paths = prepare(default_cache())
    model_dir = paths["model"]
    tok = AutoTokenizer.from_pretrained(model_dir)
    ids = tok(Path(paths["eval_text"]).read_text(), add_special_tokens=False)["input_ids"]
    if args.max_tokens:
        ids = ids[: args.max_tokens]
    # llm-compressor's examples load in the checkpoint's dtype; float32 on a CPU (as llmopt does there).
    on_cpu = not torch.cuda.is_available()
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32 if on_cpu else "auto")
    kwargs: dict = {}
    if args.method != "fp8-dynamic":
        calib = calibration_set(tok, paths["calibration_text"], samples=args.samples, seq_len=args.seq_len)
        ds = Dataset.from_dict({"input_ids": calib.samples, "attention_mask": [[1] * args.seq_len] * args.samples})
        kwargs = dict(dataset=ds, num_calibration_samples=args.samples, max_seq_length=args.seq_len,
                      shuffle_calibration_samples=False)
    if args.method == "fp8-dynamic":
        recipe = [QuantizationModifier(targets="Linear", scheme="FP8_DYNAMIC", ignore=["lm_head"])]
    elif args.method == "w8a8-int8":
        recipe = [SmoothQuantModifier(smoothing_strength=0.8),
                  GPTQModifier(targets="Linear", scheme="W8A8", ignore=["lm_head"])]
    elif args.method == "nvfp4":
        recipe = [QuantizationModifier(targets="Linear", scheme="NVFP4", ignore=["lm_head"])]
    else:
        from compressed_tensors.quantization import QuantizationArgs, QuantizationScheme

        scheme = QuantizationScheme(
            targets=["Linear"],
            weights=QuantizationArgs(num_bits=4, type="int", symmetric=True, strategy="group",
                                     group_size=args.group_size),
        )
        recipe = [GPTQModifier(ignore=["lm_head"], config_groups={"group_0": scheme})]
    start = time.perf_counter()
    oneshot(model=model, recipe=recipe, **kwargs)
    quant_s = time.perf_counter() - start
    out = tempfile.mkdtemp(prefix=f"direct-llmc-{args.method}-")
    if on_cpu:
        model.to(torch.float16)
    model.save_pretrained(out, save_compressed=True)
    del model
    dtype = torch.float32 if args.device == "cpu" else torch.float16
    model = AutoModelForCausalLM.from_pretrained(out, dtype=dtype, device_map=args.device).eval()
    ppl, n = perplexity(model, ids, args.context, args.device)
    row = {"method": args.method, "direct_perplexity": ppl, "tokens_scored": n, "quantize_seconds": round(quant_s, 1),
           "config": json.loads((Path(out) / "config.json").read_text())["quantization_config"]}
    if args.llmopt_report:
        rep = json.loads(args.llmopt_report.read_text())
        row["llmopt_perplexity"] = rep["artifact"]["perplexity"]
        row["llmopt_stderr"] = rep["artifact"]["stderr"]
        row["llmopt_tokens_scored"] = rep["settings"]["tokens_scored"]
        row["difference_pct"] = 100 * (ppl / rep["artifact"]["perplexity"] - 1)
    print(json.dumps(row))


if __name__ == "__main__":
    main()
