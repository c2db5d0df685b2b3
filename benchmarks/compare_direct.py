#!/usr/bin/env python3
"""Does llmopt lose anything in the wrapping? Quantize and score through the libraries directly.

For each method, this script quantizes SmolLM2 with the library's own API (GPTQModel, or transformers +
bitsandbytes) using the same settings and the same calibration token ids llmopt uses, then scores
perplexity with an independent loop written here (the transformers-docs recipe: ``labels`` with -100 on
unscored positions, ``loss * n``), on the same evaluation tokens and windows (non-overlapping, first
token of each window unscored). It prints these numbers next to those of llmopt eval reports.

Usage:
  python benchmarks/compare_direct.py --method gptq --bits 4 --group-size 64 --samples 128 --seq-len 512 \
      --llmopt-report out/smollm2/gptq-4bit-g64/eval.json
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "scripts"))  # prepare_assets.py
from prepare_assets import default_cache, prepare


def perplexity(model, ids: list[int], context: int, device: str) -> tuple[float, int]:
    import torch

    nll_sum, n_scored = 0.0, 0
    prev_end = 0
    for begin in range(0, len(ids), context):
        end = min(begin + context, len(ids))
        begin = max(0, end - context)
        window = torch.tensor([ids[begin:end]], device=device)
        labels = window.clone()
        labels[:, : max(prev_end - begin, 1)] = -100
        n = int((labels[:, 1:] != -100).sum())
        if n:
            with torch.inference_mode():
                loss = model(input_ids=window, labels=labels).loss
            nll_sum += float(loss) * n
            n_scored += n
        prev_end = end
        if end == len(ids):
            break
    return math.exp(nll_sum / n_scored), n_scored


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--method", choices=["gptq", "bnb-int8", "bnb-nf4", "fp16"], required=True)
    p.add_argument("--bits", type=int, default=4)
    p.add_argument("--group-size", type=int, default=64)
    p.add_argument("--samples", type=int, default=128)
    p.add_argument("--seq-len", type=int, default=512)
    p.add_argument("--context", type=int, default=512)
    p.add_argument("--device", default="cpu")
    p.add_argument("--kernel", default=None, help="GPTQModel backend for loading the GPTQ result (e.g. torch)")
    p.add_argument("--llmopt-report", type=Path, help="an `llmopt eval --json` report to compare against")
    args = p.parse_args()

    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from llmopt.data import calibration_set

    paths = prepare(default_cache())
    model_dir = paths["model"]
    tok = AutoTokenizer.from_pretrained(model_dir)
    ids = tok(Path(paths["eval_text"]).read_text(), add_special_tokens=False)["input_ids"]
    dtype = torch.float32 if args.device == "cpu" else torch.float16
    start = time.perf_counter()
    if args.method == "gptq":
        os.environ.setdefault("GPTQMODEL_CPU_WORKERS", str(os.cpu_count() or 1))
        from gptqmodel import GPTQModel, QuantizeConfig

        calib = calibration_set(tok, paths["calibration_text"], samples=args.samples, seq_len=args.seq_len)
        qcfg = QuantizeConfig(bits=args.bits, group_size=args.group_size)
        qmodel = GPTQModel.load(model_dir, qcfg, device=args.device, dtype=dtype if args.device == "cpu" else "auto")
        calib_rows = [{"input_ids": s, "attention_mask": [1] * len(s)} for s in calib.samples]
        qmodel.quantize(calib_rows, calibration_sort=None)
        out = tempfile.mkdtemp(prefix="direct-gptq-")
        qmodel.save(out)
        quant_s = time.perf_counter() - start
        from gptqmodel import BACKEND

        backend = BACKEND(args.kernel) if args.kernel else BACKEND.AUTO
        model = GPTQModel.load(out, device=args.device, backend=backend, dtype=dtype).model
    elif args.method.startswith("bnb"):
        from transformers import BitsAndBytesConfig

        if args.method == "bnb-int8":
            qc = BitsAndBytesConfig(load_in_8bit=True)
        else:
            qc = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
                                    bnb_4bit_compute_dtype=dtype)
        model = AutoModelForCausalLM.from_pretrained(model_dir, quantization_config=qc, dtype=dtype,
                                                     device_map=args.device)
        quant_s = time.perf_counter() - start
    else:
        model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=dtype, device_map=args.device)
        quant_s = 0.0
    model.eval()
    ppl, n = perplexity(model, ids, args.context, args.device)
    row = {"method": args.method, "direct_perplexity": ppl, "tokens_scored": n, "quantize_seconds": round(quant_s, 1)}
    if args.llmopt_report:
        rep = json.loads(args.llmopt_report.read_text())
        row["llmopt_perplexity"] = rep["artifact"]["perplexity"]
        row["llmopt_stderr"] = rep["artifact"]["stderr"]
        row["llmopt_tokens_scored"] = rep["settings"]["tokens_scored"]
        row["difference_pct"] = 100 * (ppl / rep["artifact"]["perplexity"] - 1)
    print(json.dumps(row, indent=2))


if __name__ == "__main__":
    main()
