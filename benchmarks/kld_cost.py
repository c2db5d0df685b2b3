"""What the KL divergence adds to an evaluation, and how close its top-K form is to the full-vocabulary KL.

Loads a model once and times, window by window and interleaved (so a busy machine slows both alike):
  nll       perplexity alone (what `llmopt eval --no-kld` does per window),
  reference FP16's side: the same pass writing the top-K reference (the baseline's pass with KLD),
  compare   an artifact's side: the same pass scored against the reference (the artifact's pass with KLD).
The model is scored against its own reference (KL = 0); the cost does not depend on the values.

With ``--artifact`` (a folder transformers/GPTQModel loads, e.g. a bnb or GPTQ artifact) it also computes, for
the first ``--gap-windows`` windows, the full-vocabulary KL from both models' log-probs next to llmopt's top-K
value: the gap the reference's truncation leaves.

  python benchmarks/kld_cost.py --model M --text T [--artifact A] [--max-tokens 4096] [--device cpu]
  python benchmarks/kld_cost.py --random-shape 8b --device cuda      # Llama-3-8B shape, random weights
  python benchmarks/kld_cost.py --random-shape SmolLM2/config.json --device cuda
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def _sync(device: str) -> None:
    if device.startswith("cuda"):
        import torch

        torch.cuda.synchronize()


def _timed(fn: Any, device: str) -> tuple[Any, float, float]:
    _sync(device)
    w0, c0 = time.perf_counter(), time.process_time()
    out = fn()
    _sync(device)
    return out, time.perf_counter() - w0, time.process_time() - c0


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--model", type=Path)
    parser.add_argument("--text", type=Path)
    parser.add_argument(
        "--random-shape",
        help="scripts/random_models.py shape, or a model's config.json (random fp16 weights, random ids)",
    )
    parser.add_argument("--artifact", type=Path)
    parser.add_argument("--max-tokens", type=int, default=4096)
    parser.add_argument("--context", type=int, default=512)
    parser.add_argument("--batch-size", type=int, default=1)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--gap-windows", type=int, default=4)
    parser.add_argument("--out", type=Path)
    args = parser.parse_args()

    import numpy as np
    import torch

    from llmopt.evaluate import kld
    from llmopt.evaluate.perplexity import make_windows
    from llmopt.runners.hf import HFRunner

    tmp = Path(tempfile.mkdtemp(prefix="kld-cost-"))
    if args.random_shape:
        sys.path.insert(0, str(ROOT / "scripts"))
        from random_models import build_fp16, llama_config, save_fp16

        if args.random_shape.endswith(".json"):  # a real model's shape (e.g. SmolLM2's config.json)
            from transformers import LlamaConfig

            config = LlamaConfig.from_json_file(args.random_shape)
        else:
            config = llama_config(args.random_shape)
        build_on = "cuda" if args.device.startswith("cuda") else "cpu"
        model_dir = save_fp16(build_fp16(config, build_on), tmp / "model")
        if build_on == "cuda":
            torch.cuda.empty_cache()
            torch.cuda.reset_peak_memory_stats()
        gen = torch.Generator().manual_seed(0)
        ids = torch.randint(0, config.vocab_size, (args.max_tokens,), generator=gen).tolist()
    else:
        from transformers import AutoTokenizer

        model_dir = args.model
        tok = AutoTokenizer.from_pretrained(model_dir)
        ids = tok(args.text.read_text(), add_special_tokens=False)["input_ids"][: args.max_tokens]
    windows = make_windows(ids, args.context, args.context)
    tokens = [len(w.ids) - w.score_from for w in windows]
    runner = HFRunner(model_dir, args.device)
    vocab = runner.n_vocab
    writer = kld.ReferenceWriter(tmp / "ref", "bench", tokens, vocab)
    times: dict[str, list[float]] = {"nll": [], "reference": [], "compare": []}
    cpu: dict[str, list[float]] = {k: [] for k in times}
    b = args.batch_size
    runner.nll([windows[0].ids], [windows[0].score_from])  # warm-up
    for i in range(0, len(windows), b):
        batch = windows[i : i + b]
        wins, starts = [w.ids for w in batch], [w.score_from for w in batch]
        _, wall, proc = _timed(lambda: runner.nll(wins, starts), args.device)  # noqa: B023
        times["nll"].append(wall)
        cpu["nll"].append(proc)
        rows, wall, proc = _timed(lambda: runner.kld_reference(wins, starts, writer.k), args.device)  # noqa: B023
        for j, row in enumerate(rows):
            writer.put(i + j, row)
        times["reference"].append(wall)
        cpu["reference"].append(proc)
    ref = writer.finish()
    for i in range(0, len(windows), b):
        batch = windows[i : i + b]
        wins, starts = [w.ids for w in batch], [w.score_from for w in batch]
        refs = [ref.window(i + j)[:3] for j in range(len(batch))]
        _, wall, proc = _timed(lambda: runner.kld_compare(wins, starts, refs), args.device)  # noqa: B023
        times["compare"].append(wall)
        cpu["compare"].append(proc)
    result: dict[str, Any] = {
        "model": str(args.random_shape or model_dir),
        "device": args.device,
        "vocab": vocab,
        "context": args.context,
        "batch_size": b,
        "windows": len(windows),
        "tokens_scored": sum(tokens),
        "reference_bytes": sum(p.stat().st_size for p in ref.path.iterdir()),
        "seconds": {k: round(sum(v), 3) for k, v in times.items()},
        "cpu_seconds": {k: round(sum(v), 3) for k, v in cpu.items()},
    }
    s = result["seconds"]
    # an evaluation = baseline pass + artifact pass; perplexity alone = two nll passes
    result["eval_overhead_pct"] = round(100 * ((s["reference"] + s["compare"]) / (2 * s["nll"]) - 1), 1)
    if args.device.startswith("cuda"):
        result["peak_memory_bytes"] = torch.cuda.max_memory_allocated()

    if args.artifact:
        from llmopt.runners import load_runner
        from llmopt.runners.hf import quant_method

        kind = "gptqmodel" if quant_method(args.artifact) in ("gptq", "awq") else "hf"
        art = load_runner(kind, args.artifact, args.device)
        full_kl, topk_kl, agree_full, agree_k = [], [], [], []
        for i, w in enumerate(windows[: args.gap_windows]):
            start = max(w.score_from, 1) - 1
            p = runner._log_probs([w.ids])[0][0, start:]
            q = art._log_probs([w.ids])[0][0, start:]
            full_kl.append((p.exp() * (p - q)).sum(-1).double().cpu().numpy())
            agree_full.append((p.argmax(-1) == q.argmax(-1)).cpu().numpy())
            kl, agree, _ = art.kld_compare([w.ids], [w.score_from], [ref.window(i)[:3]])[0]
            topk_kl.append(kl)
            agree_k.append(agree)
        full, topk = np.concatenate(full_kl), np.concatenate(topk_kl)
        result["gap"] = {
            "artifact": str(args.artifact),
            "tokens": len(full),
            "full_kl_mean": float(full.mean()),
            "topk_kl_mean": float(topk.mean()),
            "relative_gap_mean": float((full.mean() - topk.mean()) / full.mean()),
            "max_token_gap": float((full - topk).max()),
            "min_token_gap": float((full - topk).min()),
            "full_p99": float(np.percentile(full, 99)),
            "topk_p99": float(np.percentile(topk, 99)),
            "top1_full": float(np.concatenate(agree_full).mean()),
            "top1_topk": float(np.concatenate(agree_k).mean()),
        }
        art.close()
    runner.close()
    text = json.dumps(result, indent=2)
    print(text)
    if args.out:
        args.out.write_text(text + "\n")


if __name__ == "__main__":
    main()
