#!/usr/bin/env python3
"""HQQ 4-bit on SmolLM2 through llmopt and through the hqq library directly, scored by one protocol.

Does llmopt's HQQ (hqq's solver, zero points kept integer for the AWQ GEMM container) lose anything against hqq's
own quantization (float zero points, its default ``BaseQuantizeConfig(nbits=4, group_size=64)``)?

Cases, each scored on the same evaluation ids and windows as ``llmopt eval`` (llmopt.evaluate.perplexity), with the
perplexity change paired against FP16 window by window:
  fp16         the baseline folder as it is (float32 on CPU, as llmopt scores FP16 there)
  llmopt-hqq   ``llmopt.api.quantize(method="hqq")``: its time and size here; scored by ``llmopt eval`` (the same
               protocol: this script's FP16 row equals llmopt eval's FP16)
  hqq-direct   every linear layer llmopt quantizes, through hqq's ``HQQLinear`` with its defaults (float zero
               points; scales and zeros in float16, its compute dtype), dequantized by hqq
  rtn          round-to-nearest 4-bit g64 with integer zero points (min-max scale): the floor, no solver

Usage (repo root): python benchmarks/hqq_compare.py --out OUT [--device cpu] [--context 512] [--max-tokens 6144]
Writes OUT/hqq_compare.json and prints one line per case.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "scripts"))  # prepare_assets.py
from prepare_assets import default_cache, prepare

GROUP = 64


def eval_ids(model_dir: str, text_path: str) -> list[int]:
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(model_dir)
    return list(tok(Path(text_path).read_text(encoding="utf-8"), add_special_tokens=False)["input_ids"])


def window_scores(model: Any, ids: list[int], context: int) -> Any:
    """llmopt's protocol: non-overlapping windows of ``context``, every token after the first scored."""
    import torch

    from llmopt.evaluate.perplexity import make_windows, score

    windows = make_windows(ids, context, context)

    def nll(batch: list[list[int]], score_from: list[int]) -> list[list[float]]:
        x = torch.tensor(batch, dtype=torch.long)
        with torch.inference_mode():
            logits = model(input_ids=x, use_cache=False).logits
            logp = torch.log_softmax(logits[:, :-1, :].float(), dim=-1)
            tok = -logp.gather(-1, x[:, 1:].unsqueeze(-1)).squeeze(-1)
        return [row[max(s, 1) - 1 :] for row, s in zip(tok.tolist(), score_from, strict=True)]

    return score(windows, nll, batch_size=1)


def fp32_model(model_dir: str) -> Any:
    import torch
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()


def targets(model: Any, model_dir: str) -> list[tuple[str, Any]]:
    from llmopt.backends.hqq import quantized_linears
    from llmopt.source import resolve

    return quantized_linears(model, resolve(model_dir))


def hqq_direct(model_dir: str) -> tuple[Any, float]:
    """hqq's own layer (HQQLinear, default config) on each linear llmopt quantizes; weights = hqq's dequantization."""
    import torch
    from hqq.core.quantize import BaseQuantizeConfig, HQQLinear

    model = fp32_model(model_dir)
    config = BaseQuantizeConfig(nbits=4, group_size=GROUP)
    start = time.perf_counter()
    for _, linear in targets(model, model_dir):
        layer = HQQLinear(linear, quant_config=config, compute_dtype=torch.float16, device="cpu", del_orig=False)
        with torch.no_grad():
            linear.weight.copy_(layer.dequantize().float().reshape(linear.weight.shape))
    return model, time.perf_counter() - start


def rtn(model_dir: str) -> Any:
    import torch

    model = fp32_model(model_dir)
    for _, linear in targets(model, model_dir):
        w = linear.weight.detach().reshape(-1, GROUP)
        lo, hi = w.min(1, keepdim=True).values, w.max(1, keepdim=True).values
        scale = ((hi - lo) / 15).clamp(min=1e-8).half().float()
        zero = (-lo / scale).round().clamp(0, 15)
        q = (w / scale + zero).round().clamp(0, 15)
        with torch.no_grad():
            linear.weight.copy_(((q - zero) * scale).reshape(linear.weight.shape))
    return model


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--context", type=int, default=512)
    parser.add_argument("--max-tokens", type=int, default=6144)
    args = parser.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)

    from llmopt.api import quantize
    from llmopt.evaluate.perplexity import paired_delta

    assets = prepare(default_cache())
    model_dir, text = str(assets["model"]), str(assets["eval_text"])
    ids = eval_ids(model_dir, text)[: args.max_tokens]
    results: dict[str, Any] = {"settings": {"context": args.context, "tokens": len(ids), "group_size": GROUP}}

    base = window_scores(fp32_model(model_dir), ids, args.context)

    def record(name: str, scored: Any, **extra: Any) -> None:
        delta, delta_se = paired_delta(scored.window_nll, base.window_nll, scored.window_tokens)
        row = {"perplexity": scored.perplexity, "stderr": scored.stderr, "delta_pct": delta, "delta_se": delta_se}
        results[name] = {**row, **extra}
        print(
            f"{name:12s} ppl {scored.perplexity:.4f} ± {scored.stderr:.4f}  Δ {delta:+.2f}% ± {delta_se:.2f}  {extra}"
        )

    record("fp16", base)
    cpu = time.process_time()
    art = quantize(model_dir, "hqq", args.out / "llmopt-hqq", options={"group_size": GROUP}, device="cpu",
                   overwrite=True)  # fmt: skip
    # scored by `llmopt eval` (its report next to this one), not here: this row is the quantization's cost
    results["llmopt-hqq"] = {
        "quantize_seconds": art.manifest.quantize_seconds,
        "quantize_cpu_seconds": round(time.process_time() - cpu, 1),
        "size_bytes": art.size_bytes(),
        "solver": art.manifest.options.get("_resolved"),
    }
    print("llmopt-hqq", results["llmopt-hqq"], flush=True)
    cpu = time.process_time()
    direct, seconds = hqq_direct(model_dir)
    cpu_seconds = round(time.process_time() - cpu, 1)
    record("hqq-direct", window_scores(direct, ids, args.context), quantize_seconds=round(seconds, 2),
           quantize_cpu_seconds=cpu_seconds)  # fmt: skip
    del direct
    record("rtn", window_scores(rtn(model_dir), ids, args.context))
    (args.out / "hqq_compare.json").write_text(json.dumps(results, indent=2) + "\n")


if __name__ == "__main__":
    main()
