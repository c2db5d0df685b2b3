#!/usr/bin/env python3
"""The whole matrix through the commands a user runs, on a random-weight model: wall time per stage.

Builds a random-weight Llama of a shape from ``scripts/random_models.py`` (``8b`` on the GPU machine, ``tiny``
for a check on a CPU), a text of its made-up words for calibration and scoring, and a recipe with GPTQ 4-bit,
AWQ 4-bit, bitsandbytes nf4 and int8 (the FP16 baseline comes with every run), perplexity, throughput and a
gate; then runs ``llmopt run RECIPE -o OUT`` and, for each artifact, ``llmopt publish ARTIFACT ORG/NAME
--dry-run`` as child processes, and reports the wall time of each, with the per-stage "done in" lines of the
run. The weights are random: the perplexities mean nothing (they are reported only as the run computed them);
the times are what the issue asks.

Usage (GPU machine, repo root, wheels installed as benchmarks/bench_gpu.sh does):
    python3 benchmarks/matrix_run.py --shape 8b --device cuda:0 --work /root/matrix
    python3 benchmarks/matrix_run.py --shape tiny --device cpu --work /tmp/matrix   # a check of the script
Rerunning with the same --work resumes: `llmopt run` reuses the artifacts that are finished.
Writes WORK/matrix.json (times, exit codes, the run's stage lines) and prints a table.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import re
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "scripts"))

# CUDA graphs without torch.compile (the GPU recipe's mode): set-up under a second a point instead of ~100 s of
# compiling per model; --decode-mode compile for numbers to quote. bnb-int8 decodes eagerly (its outlier path
# cannot be captured): 10 s a point keeps its three batch sizes from taking minutes.
GPU_THROUGHPUT = {
    "batch_sizes": [1, 8, 32],
    "prompt_lens": [128, 2048],
    "decode_mode": "graph",
    "max_seconds_per_point": 10,
}
CPU_THROUGHPUT = {"batch_sizes": [1], "prompt_lens": [16], "gen_len": 8, "decode_mode": "eager"}


def build_model(shape: str, folder: Path, device: str) -> Path:
    import random_models as rm

    if (folder / "config.json").is_file():
        return folder
    tied = {"tie_word_embeddings": False}
    model = rm.build_fp16(rm.llama_config(shape, **tied), device if device.startswith("cuda") else "cpu")
    rm.save_fp16(model, folder)
    return folder


def write_text(path: Path, words: int, vocab: int, seed: int) -> Path:
    """Made-up words of the random model's tokenizer (w3 ... w4095), one long line per 500 words."""
    if not path.is_file():
        rng = random.Random(seed)
        top = min(vocab, 4096)
        lines = [" ".join(f"w{rng.randrange(3, top)}" for _ in range(500)) for _ in range(max(1, words // 500))]
        path.write_text("\n".join(lines) + "\n")
    return path


def write_recipe(
    work: Path, model: Path, shape: str, device: str, samples: int, seq_len: int, decode_mode: str | None = None
) -> Path:
    gpu = device.startswith("cuda")
    group = 128 if shape != "tiny" else 64
    throughput = dict(GPU_THROUGHPUT if gpu else CPU_THROUGHPUT)
    if decode_mode:
        throughput["decode_mode"] = decode_mode
    recipe = {
        "name": f"matrix-{shape}",
        "description": f"Random-weight Llama ({shape} shape): wall time per stage of the whole matrix.",
        "model": {"source": str(model)},
        "calibration": {"dataset": str(work / "calib.txt"), "samples": samples, "seq_len": seq_len, "seed": 0},
        "evaluation": {
            "dataset": str(work / "eval.txt"),
            "context_length": 2048 if gpu else 128,
            "stride": 2048 if gpu else 128,
            "max_tokens": 16384 if gpu else 512,
            "add_bos": False,
            "batch_size": 4 if gpu else 1,
            "device": device,
            "throughput": throughput,
        },
        # random weights: the perplexity gate is only there so that the gate stage runs; it cannot fail here
        "gates": {"max_ppl_increase_pct": 1000},
        "variants": [
            {"name": f"gptq-4bit-g{group}", "method": "gptq", "options": {"bits": 4, "group_size": group}},
            {"name": f"awq-4bit-g{group}", "method": "awq", "options": {"group_size": group}},
            {"name": "bnb-nf4", "method": "bnb-nf4"},
            {"name": "bnb-int8", "method": "bnb-int8"},
        ],
        "publish": {"repo_id": "{org}/{model_name}-{variant}", "license": "apache-2.0"},
    }
    import yaml

    path = work / "recipe.yaml"
    path.write_text(yaml.safe_dump(recipe, sort_keys=False))
    return path


def timed(argv: list[str], log: Path, env: dict[str, str]) -> tuple[int, float]:
    start = time.perf_counter()
    with open(log, "w") as out:
        proc = subprocess.run(argv, stdout=out, stderr=subprocess.STDOUT, env=env, check=False)
    return proc.returncode, time.perf_counter() - start


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--shape", default="8b", help="a shape of scripts/random_models.py (8b, 1b, tiny)")
    ap.add_argument("--device", default="cuda:0")
    ap.add_argument("--work", type=Path, required=True, help="folder for the model, texts, recipe, run")
    ap.add_argument("--samples", type=int, default=32, help="calibration samples (GPTQ, AWQ)")
    ap.add_argument("--seq-len", type=int, default=512, help="tokens per calibration sample")
    ap.add_argument("--decode-mode", default=None, help="speed's decode mode (default: graph on a GPU, eager on CPU)")
    args = ap.parse_args()

    work = args.work.resolve()
    work.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    model = build_model(args.shape, work / f"random-{args.shape}", args.device)
    vocab = json.loads((model / "config.json").read_text())["vocab_size"]
    write_text(work / "calib.txt", 2 * args.samples * args.seq_len, vocab, seed=1)
    write_text(work / "eval.txt", 40000 if args.device.startswith("cuda") else 2000, vocab, seed=2)
    recipe = write_recipe(work, model, args.shape, args.device, args.samples, args.seq_len, args.decode_mode)
    build_s = time.perf_counter() - t0

    env = dict(os.environ, PYTHONPATH=os.pathsep.join(p for p in (str(ROOT), os.environ.get("PYTHONPATH")) if p))
    py = [sys.executable, "-m", "llmopt"]
    run_rc, run_s = timed([*py, "run", str(recipe), "-o", str(work / "run")], work / "run.log", env)
    pub_rc, pub_s = 0, 0.0
    for art in sorted(p for p in (work / "run" / "artifacts").glob("*") if (p / "llmopt.json").is_file()):
        rc, sec = timed([*py, "publish", str(art), f"my-org/random-{args.shape}-{art.name}", "--dry-run"],
                        work / f"publish-{art.name}.log", env)  # fmt: skip
        pub_rc, pub_s = max(pub_rc, rc), pub_s + sec
    stages = [
        line.strip()
        for line in (work / "run.log").read_text(errors="replace").splitlines()
        if re.search(r"done in [0-9.]+ s|^\[llmopt\] \[\d+/\d+\]|: load [0-9.]+ s, prefill", line)
    ]
    result: dict[str, Any] = {
        "shape": args.shape,
        "device": args.device,
        "calibration": {"samples": args.samples, "seq_len": args.seq_len},
        "seconds": {
            "build_model_and_texts": round(build_s, 1),
            "run": round(run_s, 1),
            "publish_dry_run": round(pub_s, 1),
        },
        "exit_codes": {"run": run_rc, "publish_dry_run": pub_rc},
        "stages": stages,
    }
    (work / "matrix.json").write_text(json.dumps(result, indent=2) + "\n")
    print(f"shape {args.shape} on {args.device}: build {build_s:.0f} s, run {run_s:.0f} s (exit {run_rc}), "
          f"publish --dry-run {pub_s:.0f} s (exit {pub_rc})")  # fmt: skip
    for line in stages:
        print("  " + line)
    return 0 if run_rc in (0, 3) and pub_rc in (0, 3, 5) else 1


if __name__ == "__main__":
    raise SystemExit(main())
