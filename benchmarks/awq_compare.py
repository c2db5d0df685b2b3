#!/usr/bin/env python3
"""AWQ on SmolLM2 three ways, scored by one protocol: why did GPTQModel's AWQ look so much worse?

The earlier measurement (GPTQModel AWQ g64: +56% asym / +103% sym; llm-compressor AWQ: +27%) fed the
libraries differently. This script gives each the same 128 x 512 calibration token ids llmopt cuts
(``llmopt.data.calibration_set``) unless a case says otherwise, and scores every result on the same
evaluation ids and windows as ``llmopt eval`` (``llmopt.evaluate.perplexity``), on a CUDA GPU in fp16.

Cases (``--cases``, comma-separated):
  gptqmodel-equal   GPTQModel AWQ, 4-bit g64 with zero points, the equal-length samples (what llmopt does)
  gptqmodel-docs    the same, but calibration = paragraphs of their own lengths (<= 512 tokens), as a user
                    passing a list of documents would
  gptqmodel-sym     GPTQModel AWQ without zero points (symmetric), equal-length samples
  llmcompressor     llm-compressor's AWQModifier + QuantizationModifier (W4A16 asym, group 64, lm_head
                    left out), equal-length samples, in float32; its scales and zero points applied to the
                    weights in memory (checked to lie on a 4-bit grid), then scored
  rtn               round-to-nearest 4-bit g64 with zero points, no calibration: the floor to beat

Usage (GPU machine, repo root): python benchmarks/awq_compare.py --out OUT [--cases ...] [--samples 128]
Writes OUT/awq_compare.json and prints one line per case.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
import traceback
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "scripts"))  # prepare_assets.py
from prepare_assets import default_cache, prepare

GROUP = 64


def eval_ids(model_dir: str, text_path: str) -> list[int]:
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(model_dir)
    return list(tok(Path(text_path).read_text(encoding="utf-8"), add_special_tokens=False)["input_ids"])


def score_model(model: Any, ids: list[int], context: int) -> dict[str, float]:
    """llmopt's protocol: non-overlapping windows of ``context``, every token after the first scored."""
    import torch

    from llmopt.evaluate.perplexity import make_windows, score

    device = model.get_input_embeddings().weight.device
    windows = make_windows(ids, context, context)

    def nll(batch: list[list[int]], score_from: list[int]) -> list[list[float]]:
        x = torch.tensor(batch, dtype=torch.long, device=device)
        with torch.inference_mode():
            logits = model(input_ids=x, use_cache=False).logits
            logp = torch.log_softmax(logits[:, :-1, :].float(), dim=-1)
            tok = -logp.gather(-1, x[:, 1:].to(logp.device).unsqueeze(-1)).squeeze(-1)
        return [row[max(s, 1) - 1 :] for row, s in zip(tok.cpu().tolist(), score_from, strict=True)]

    r = score(windows, nll, batch_size=4)
    return {"perplexity": r.perplexity, "stderr": r.stderr, "tokens_scored": r.tokens_scored}


def equal_samples(model_dir: str, calib_path: str, samples: int, seq_len: int) -> list[list[int]]:
    from transformers import AutoTokenizer

    from llmopt.data import calibration_set

    tok = AutoTokenizer.from_pretrained(model_dir)
    return calibration_set(tok, calib_path, samples=samples, seq_len=seq_len, seed=0).samples


def document_samples(model_dir: str, calib_path: str, samples: int, max_len: int) -> list[list[int]]:
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(model_dir)
    paras = [p for p in Path(calib_path).read_text(encoding="utf-8").split("\n\n") if len(p) > 200]
    return [tok(p, add_special_tokens=False)["input_ids"][:max_len] for p in paras[:samples]]


def gptqmodel_awq(model_dir: str, out: Path, samples: list[list[int]], zero_point: bool) -> tuple[Any, float]:
    import torch
    from gptqmodel import BACKEND, GPTQModel
    from gptqmodel.quantization.config import FORMAT, METHOD, QuantizeConfig

    qcfg = QuantizeConfig(quant_method=METHOD.AWQ, format=FORMAT.GEMM, bits=4, group_size=GROUP, sym=not zero_point)
    start = time.perf_counter()
    model = GPTQModel.load(model_dir, qcfg, device="cuda:0", dtype=torch.float16)
    calib = [{"input_ids": s, "attention_mask": [1] * len(s)} for s in samples]
    model.quantize(calib, batch_size=1, calibration_sort=None)
    seconds = time.perf_counter() - start
    model.save(str(out))
    del model
    torch.cuda.empty_cache()
    loaded = GPTQModel.load(str(out), device="cuda:0", backend=BACKEND.AWQ_TORCH, dtype=torch.float16)
    return loaded.model.eval(), seconds


def llmcompressor_awq(model_dir: str, samples: list[list[int]]) -> tuple[Any, float]:
    import torch
    from compressed_tensors.quantization import QuantizationArgs, QuantizationScheme
    from datasets import Dataset
    from llmcompressor import oneshot
    from llmcompressor.modifiers.quantization import QuantizationModifier
    from llmcompressor.modifiers.transform.awq import AWQModifier
    from transformers import AutoModelForCausalLM, AutoTokenizer

    # fp32: in fp16 its grid search met non-finite losses on this model (seen on the GPU machine).
    model: Any = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    tok = AutoTokenizer.from_pretrained(model_dir)
    scheme = QuantizationScheme(
        targets=["Linear"],
        weights=QuantizationArgs(num_bits=4, type="int", symmetric=False, strategy="group", group_size=GROUP),
    )
    recipe = [AWQModifier(), QuantizationModifier(ignore=["lm_head"], config_groups={"group_0": scheme})]
    ds = Dataset.from_dict({"input_ids": samples, "attention_mask": [[1] * len(s) for s in samples]})
    start = time.perf_counter()
    oneshot(
        model=model,
        tokenizer=tok,
        dataset=ds,
        recipe=recipe,
        num_calibration_samples=len(samples),
        max_seq_length=max(len(s) for s in samples),
        shuffle_calibration_samples=False,
    )
    seconds = time.perf_counter() - start
    # Scored in memory, its model gave the FP16 perplexity (-0.002%, seen on the GPU machine): after
    # oneshot the forward does not fake-quantize the weights. Apply its own scales and zero points to the
    # weights (compressed-tensors' fake_quantize), and refuse to score weights that are not on a 4-bit grid.
    from compressed_tensors.quantization.lifecycle.forward import fake_quantize

    with torch.no_grad():
        for module in model.modules():
            scheme = getattr(module, "quantization_scheme", None)
            if scheme is None or getattr(scheme, "weights", None) is None or not hasattr(module, "weight_scale"):
                continue
            lin: Any = module
            zp = getattr(lin, "weight_zero_point", None)
            lin.weight.copy_(fake_quantize(lin.weight, lin.weight_scale, zp, scheme.weights))
    check_4bit_grid(model)
    return model.to("cuda:0").eval(), seconds


def check_4bit_grid(model: Any) -> None:
    """Every group of GROUP weights of the first decoder linear takes at most 16 distinct values."""
    w = model.model.layers[0].mlp.down_proj.weight.detach().float().reshape(-1, GROUP)
    levels = max(len(row.unique()) for row in w[:256])
    if levels > 16:
        raise RuntimeError(f"weights are not quantized in memory ({levels} distinct values in a group of {GROUP})")


def rtn(model_dir: str) -> tuple[Any, float]:
    import torch
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float16, device_map={"": "cuda:0"})
    start = time.perf_counter()
    with torch.no_grad():
        for layer in model.model.layers:
            for lin in (m for m in layer.modules() if isinstance(m, torch.nn.Linear)):
                w = lin.weight.float().reshape(-1, GROUP)
                mx, mn = w.amax(1, keepdim=True), w.amin(1, keepdim=True)
                scale = (mx - mn).clamp(min=1e-5) / 15
                zero = (-torch.round(mn / scale)).clamp(0, 15)
                q = (torch.clamp(torch.round(w / scale) + zero, 0, 15) - zero) * scale
                lin.weight.copy_(q.reshape(lin.weight.shape).to(lin.weight.dtype))
    return model.eval(), time.perf_counter() - start


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", type=Path, required=True)
    p.add_argument("--cases", default="rtn,gptqmodel-equal,gptqmodel-docs,gptqmodel-sym,llmcompressor")
    p.add_argument("--samples", type=int, default=128)
    p.add_argument("--seq-len", type=int, default=512)
    p.add_argument("--context", type=int, default=512)
    args = p.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)

    import torch
    from transformers import AutoModelForCausalLM

    assets = prepare(default_cache())
    model_dir = assets["model"]
    ids = eval_ids(model_dir, assets["eval_text"])
    results: dict[str, Any] = {"samples": args.samples, "seq_len": args.seq_len, "group_size": GROUP, "cases": {}}
    base = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float16, device_map={"": "cuda:0"}).eval()
    results["fp16"] = score_model(base, ids, args.context)
    del base
    print(json.dumps({"case": "fp16", **results["fp16"]}), flush=True)
    equal = equal_samples(model_dir, assets["calibration_text"], args.samples, args.seq_len)
    for case in [c for c in args.cases.split(",") if c]:
        row: dict[str, Any] = {}
        try:
            if case == "rtn":
                model, seconds = rtn(model_dir)
            elif case == "llmcompressor":
                model, seconds = llmcompressor_awq(model_dir, equal)
            elif case.startswith("gptqmodel-"):
                samples = equal
                if case == "gptqmodel-docs":
                    samples = document_samples(model_dir, assets["calibration_text"], args.samples, args.seq_len)
                    lengths = sorted(len(s) for s in samples)
                    row["calibration_lengths"] = {"min": lengths[0], "max": lengths[-1], "distinct": len(set(lengths))}
                    row["calibration_tokens"] = sum(len(s) for s in samples)
                model, seconds = gptqmodel_awq(model_dir, args.out / case, samples, case != "gptqmodel-sym")
            else:
                raise ValueError(f"unknown case {case}")
            row.update(score_model(model, ids, args.context), quantize_seconds=round(seconds, 1))
            row["delta_pct"] = 100 * (row["perplexity"] / results["fp16"]["perplexity"] - 1)
            del model
        except Exception as exc:
            traceback.print_exc()
            row["error"] = f"{type(exc).__name__}: {str(exc)[:400]}"
        torch.cuda.empty_cache()
        results["cases"][case] = row
        print(json.dumps({"case": case, **row}), flush=True)
        (args.out / "awq_compare.json").write_text(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
