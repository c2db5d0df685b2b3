#!/usr/bin/env python3
"""The SmolLM2-135M table: FP16 vs bnb-int8, bnb-nf4, GPTQ 4-bit g64, GPTQ 8-bit g64, AWQ 4-bit g64.

Quantizes with llmopt's library API and evaluates each artifact against FP16 on the held-out
Britannica text (context 512, every token). Works on CPU and on a CUDA GPU (``--device``).

  python benchmarks/smollm2_table.py --out out/table-cpu --device cpu
  python benchmarks/smollm2_table.py --out out/table-gpu --device cuda --kernel torch

Writes ``OUT/<variant>/`` artifacts, ``OUT/<variant>.eval.json`` and ``OUT/table.md``; prints the table.
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

VARIANTS: dict[str, tuple[str, dict[str, Any]]] = {
    "bnb-int8": ("bnb-int8", {}),
    "bnb-nf4": ("bnb-nf4", {"double_quant": True}),
    "gptq-4bit-g64": ("gptq", {"bits": 4, "group_size": 64}),
    "gptq-8bit-g64": ("gptq", {"bits": 8, "group_size": 64}),
    "awq-4bit-g64": ("awq", {"bits": 4, "group_size": 64}),
}


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--out", type=Path, required=True)
    p.add_argument("--device", default="auto")
    p.add_argument("--samples", type=int, default=128)
    p.add_argument("--seq-len", type=int, default=512)
    p.add_argument("--context", type=int, default=512)
    p.add_argument("--kernel", default=None, help="GPTQ kernel for evaluation (GPTQModel backend name)")
    p.add_argument("--only", nargs="*", default=None)
    p.add_argument("--reuse-reports", action="store_true", help="use OUT/<variant>.eval.json where present")
    args = p.parse_args()

    from llmopt.api import evaluate, quantize
    from llmopt.artifact import Artifact
    from llmopt.progress import default_reporter

    assets = prepare(default_cache())
    reporter = default_reporter()
    rows = []
    for name, (method, options) in VARIANTS.items():
        if args.only and name not in args.only:
            continue
        out = args.out / name
        try:
            art = Artifact.open(out)
            reporter.info(f"{name}: reusing {out}")
        except Exception:
            start = time.perf_counter()
            art = quantize(assets["model"], method, out, options=options, calibration=assets["calibration_text"],
                           samples=args.samples, seq_len=args.seq_len, device=args.device, overwrite=True,
                           reporter=reporter)  # fmt: skip
            reporter.info(f"{name}: quantized in {time.perf_counter() - start:.1f} s")
        report_path = args.out / f"{name}.eval.json"
        if args.reuse_reports and report_path.is_file():
            report = json.loads(report_path.read_text())
        else:
            report = evaluate(out, assets["model"], assets["eval_text"], context_length=args.context,
                              device=args.device, kernel=args.kernel, reporter=reporter).to_json()  # fmt: skip
            report_path.write_text(json.dumps(report, indent=2))
        rows.append((name, art.manifest.quantize_seconds, report))

    if not rows:
        return
    s = rows[0][2]["settings"]
    base = rows[0][2]["baseline"]
    lines = [
        f"SmolLM2-135M-Instruct on {s['device']} ({s['dtype']}), {s['tokens_scored']:,} tokens of held-out "
        f"Britannica text, context {s['context_length']}, stride {s['stride']}; calibration {args.samples} x "
        f"{args.seq_len} tokens (GPTQ, AWQ).",
        "",
        "| variant | perplexity ± stderr | Δ vs FP16 (paired stderr) | size on disk | quantize time | eval kernel |",
        "| --- | --- | --- | --- | --- | --- |",
        f"| FP16 | {base['perplexity']:.3f} ± {base['stderr']:.3f} | - | {base['size_bytes'] / 1e6:.1f} MB | - | - |",
    ]
    for name, qsec, rep in rows:
        a = rep["artifact"]
        lines.append(
            f"| {name} | {a['perplexity']:.3f} ± {a['stderr']:.3f} | {rep['delta_pct']:+.2f}% "
            f"(± {rep['delta_pct_stderr']:.2f}) | {a['size_bytes'] / 1e6:.1f} MB | {qsec:.1f} s | "
            f"{a.get('kernel', a['runner'])} |"
        )
    table = "\n".join(lines) + "\n"
    (args.out / "table.md").write_text(table)
    print(table)


if __name__ == "__main__":
    main()
