#!/usr/bin/env python3
"""GGUF variants of one model through llmopt: perplexity vs FP16, size, quantize time, llama.cpp speed.

Every variant goes through the CLI as a user runs it:
    llmopt quantize MODEL --method gguf --quant-type T [--imatrix auto --calibration C] -o OUT/T --json
    llmopt eval OUT/T --baseline MODEL --dataset TEXT --context 512 --stride 512 --device cpu --json FILE
then llama.cpp's speed is measured with llmopt's llama.cpp runner (LlamaCppRunner.speed: one sequence,
wall-clock around llama.cpp's decode calls, median of 3 runs after a warm-up).

Prints a Markdown table (for docs/BENCHMARKS.md) and writes OUT/gguf_table.json with every number.
The FP16 baseline is scored once and cached under OUT/cache (LLMOPT_CACHE).

Usage:
    python benchmarks/gguf_table.py --model DIR --eval-text FILE --calibration FILE [--out DIR]
    python benchmarks/gguf_table.py --assets     # the test assets of scripts/prepare_assets.py
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import time
from datetime import date
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
VARIANTS: list[tuple[str, str, str]] = [  # (label, quant type, imatrix)
    ("f16", "f16", "none"),
    ("q8_0", "q8_0", "none"),
    ("q6_k", "q6_k", "none"),
    ("q5_k_m", "q5_k_m", "none"),
    ("q4_k_m", "q4_k_m", "none"),
    ("q4_k_m + imatrix", "q4_k_m", "auto"),
    ("q3_k_m", "q3_k_m", "none"),
]


def llmopt(*args: str, env: dict[str, str]) -> str:
    cmd = [sys.executable, "-m", "llmopt", *args]
    print("$ llmopt " + " ".join(args), file=sys.stderr, flush=True)
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True)
    if proc.returncode not in (0, 3):  # 3: a gate failed; none is set here
        sys.stderr.write(proc.stderr)
        raise SystemExit(f"llmopt {args[0]} failed with exit code {proc.returncode}")
    return proc.stdout


def cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", type=Path)
    parser.add_argument("--eval-text", type=Path)
    parser.add_argument("--calibration", type=Path)
    parser.add_argument("--assets", action="store_true", help="use scripts/prepare_assets.py's model and texts")
    parser.add_argument("--out", type=Path, default=ROOT / "out" / "gguf_table")
    parser.add_argument("--context", type=int, default=512)
    parser.add_argument("--samples", type=int, default=64, help="calibration samples for the imatrix")
    parser.add_argument("--seq-len", type=int, default=512, help="tokens per calibration sample")
    parser.add_argument("--prompt-len", type=int, default=128)
    parser.add_argument("--gen-len", type=int, default=64)
    parser.add_argument("--only", nargs="*", help="labels to run (default: all)")
    parser.add_argument("--render", type=Path, help="only print the table of an earlier gguf_table.json")
    args = parser.parse_args()
    if args.render:
        data = json.loads(args.render.read_text())
        print(render(data["rows"], data["meta"]))
        return

    if args.assets:
        out = subprocess.run(
            [sys.executable, str(ROOT / "scripts" / "prepare_assets.py")],
            check=True,
            capture_output=True,
            text=True,
        ).stdout
        paths = json.loads(out)
        args.model, args.eval_text = Path(paths["model"]), Path(paths["eval_text"])
        args.calibration = Path(paths["calibration_text"])
    if not (args.model and args.eval_text and args.calibration):
        parser.error("give --model, --eval-text and --calibration, or --assets")

    args.out.mkdir(parents=True, exist_ok=True)
    env = dict(os.environ, LLMOPT_CACHE=str(args.out / "cache"), OMP_WAIT_POLICY="passive")
    rows: list[dict[str, Any]] = []
    for label, qtype, imatrix in VARIANTS:
        if args.only and label not in args.only:
            continue
        slug = label.replace(" + ", "-").replace(" ", "-")
        art = args.out / slug
        qargs = ["quantize", str(args.model), "--method", "gguf", "--quant-type", qtype, "-o", str(art)]
        qargs += ["--overwrite", "--json", "--device", "cpu"]
        if imatrix != "none":
            qargs += ["--imatrix", imatrix, "--calibration", str(args.calibration)]
            qargs += ["--samples", str(args.samples), "--seq-len", str(args.seq_len)]
        manifest = json.loads(llmopt(*qargs, env=env))
        report_path = args.out / f"{slug}.eval.json"
        llmopt(
            "eval", str(art), "--baseline", str(args.model), "--dataset", str(args.eval_text),
            "--context", str(args.context), "--stride", str(args.context), "--device", "cpu", "-q",
            "--json", str(report_path), env=env,
        )  # fmt: skip
        report = json.loads(report_path.read_text())

        os.environ["OMP_WAIT_POLICY"] = "passive"
        from llmopt.runners.llamacpp import LlamaCppRunner

        runner = LlamaCppRunner(art, "cpu")
        try:
            bench = runner.speed(prompt_len=args.prompt_len, gen_len=args.gen_len, repeats=3)
        finally:
            runner.close()
        resolved = manifest["options"].get("_resolved", {})
        gguf_file = art / resolved["gguf_file"]
        rows.append(
            {
                "label": label,
                "quant_type": qtype,
                "imatrix": imatrix,
                "perplexity": report["artifact"]["perplexity"],
                "stderr": report["artifact"]["stderr"],
                "delta_pct": report["delta_pct"],
                "delta_pct_stderr": report.get("delta_pct_stderr"),
                "gguf_bytes": gguf_file.stat().st_size,
                "quantize_seconds": manifest["quantize_seconds"],
                "resolved": resolved,
                "baseline_perplexity": report["baseline"]["perplexity"],
                "baseline_stderr": report["baseline"]["stderr"],
                "tokens_scored": report["settings"]["tokens_scored"],
                "bench": bench,
            }
        )
        print(
            f"  {label}: ppl {rows[-1]['perplexity']:.4f}, {bench['gen_tokens_per_s']:.1f} tok/s",
            file=sys.stderr,
        )

    meta = {
        "date": date.today().isoformat(),
        "cpu": cpu_name(),
        "cores": len(os.sched_getaffinity(0)),
        "load_average_at_end": os.getloadavg(),
        "model": args.model.name,  # names, not paths: the JSON is meant to be shared
        "eval_text": args.eval_text.name,
        "calibration": f"{args.calibration.name} ({args.samples} x {args.seq_len} tokens, for the imatrix)",
        "speed": f"LlamaCppRunner.speed(prompt_len={args.prompt_len}, gen_len={args.gen_len}, repeats=3)",
        "context": args.context,
        "time": time.strftime("%H:%M"),
    }
    (args.out / "gguf_table.json").write_text(json.dumps({"meta": meta, "rows": rows}, indent=2) + "\n")
    print(render(rows, meta))


def render(rows: list[dict[str, Any]], meta: dict[str, Any]) -> str:
    if not rows:
        return ""
    b = rows[0]
    lines = [
        f"FP16 baseline (transformers, fp32 compute): perplexity {b['baseline_perplexity']:.4f} "
        f"± {b['baseline_stderr']:.4f} on {b['tokens_scored']:,} tokens (context {meta['context']}, "
        f"stride {meta['context']}).",
        "",
        "| variant | perplexity ± stderr | Δ vs FP16 (paired stderr) | GGUF size | llama.cpp quantize step "
        "| total quantize | prompt tok/s | gen tok/s |",
        "| --- | --- | --- | --- | --- | --- | --- | --- |",
    ]
    for r in rows:
        d_se = f" (± {r['delta_pct_stderr']:.2f})" if r.get("delta_pct_stderr") is not None else ""
        res = r["resolved"]
        step = res.get("quantize_seconds")
        step_text = f"{step:.1f} s" if step is not None else "- (written by the converter)"
        if (res.get("imatrix") or {}).get("seconds") is not None:
            step_text += f" + imatrix {res['imatrix']['seconds']:.0f} s"
        lines.append(
            f"| {r['label']} | {r['perplexity']:.3f} ± {r['stderr']:.3f} | {r['delta_pct']:+.2f}%{d_se} | "
            f"{r['gguf_bytes'] / 1e6:.1f} MB | {step_text} | {r['quantize_seconds']:.0f} s | "
            f"{r['bench']['prompt_tokens_per_s']:.0f} | {r['bench']['gen_tokens_per_s']:.1f} |"
        )
    return "\n".join(lines)


if __name__ == "__main__":
    main()
