#!/usr/bin/env python3
"""Multi-GPU check: the same perplexity on one GPU and with the layers split over several.

On a machine with two GPUs or more, with the SmolLM2-135M assets (scripts/prepare_assets.py) and
llmopt's library API (the code paths of `llmopt quantize` / `llmopt eval`):

1. FP16: scored on cuda:0 alone and split over every GPU (the split must really put layers on each).
2. bnb-int8 and GPTQ 4-bit g64 (128 x 512 calibration tokens, as benchmarks/smollm2_table.py): each
   quantized once on cuda:0 and once with every GPU allowed, and every artifact scored both ways.
3. A table: perplexity on 1 GPU vs N GPUs, the difference, the placement (layers per GPU), times and
   peak memory per GPU; written as JSON and markdown, printed.

Each case runs in its own try/except (an error is recorded, the next case runs); results are written
after every case, and cases that would start after ``--deadline-s`` are skipped, so one command stays
within the GPU machine's 10-minute limit.

  PYTHONPATH=. python benchmarks/multi_gpu_check.py --out out/multi-gpu [--samples 32] [--deadline-s 540]

Exit code: 0 when every comparison that ran matches within ``--tolerance`` and every split used
several GPUs; 1 otherwise; 2 when fewer than two GPUs are visible.
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

QUANTIZED: dict[str, tuple[str, dict[str, Any]]] = {
    "bnb-int8": ("bnb-int8", {}),
    "gptq-4bit-g64": ("gptq", {"bits": 4, "group_size": 64}),
}
# Rough seconds a case needs on an H100 with SmolLM2-135M: one is not started with less time left.
NEEDS_S = {"quantize-gptq": 150.0, "quantize": 30.0, "evaluate": 30.0}


class Check:
    def __init__(self, args: argparse.Namespace, gpus: list[int]) -> None:
        self.args = args
        self.gpus = gpus
        self.one = f"cuda:{gpus[0]}"
        self.split = "cuda:" + ",".join(str(g) for g in gpus)
        self.start = time.perf_counter()
        self.cases: list[dict[str, Any]] = []
        self.out: Path = args.out
        self.out.mkdir(parents=True, exist_ok=True)

    def left(self) -> float:
        return self.args.deadline_s - (time.perf_counter() - self.start)

    def run(self, name: str, kind: str, fn: Any) -> dict[str, Any]:
        """Run one case: its result or error, wall time and peak memory per GPU; written out right away."""
        import torch

        case: dict[str, Any] = {"name": name, "kind": kind, "status": "skipped"}
        if self.left() < NEEDS_S.get(kind, 30.0):
            case["error"] = (
                f"skipped: {self.left():.0f} s left before the deadline, the case needs ~{NEEDS_S[kind]:.0f}"
            )
            print(f"[skip] {name}: {case['error']}", flush=True)
            self.cases.append(case)
            self.write()
            return case
        print(f"[run ] {name} ({self.left():.0f} s left)", flush=True)
        for g in self.gpus:
            torch.cuda.synchronize(g)
            torch.cuda.reset_peak_memory_stats(g)
        t0 = time.perf_counter()
        try:
            case["result"] = fn()
            case["status"] = "ok"
        except Exception as exc:
            case["status"] = "error"
            case["error"] = f"{type(exc).__name__}: {str(exc).strip().splitlines()[0] if str(exc).strip() else ''}"
            case["traceback"] = traceback.format_exc()
            print(f"[fail] {name}: {case['error']}", flush=True)
        case["seconds"] = round(time.perf_counter() - t0, 2)
        case["peak_memory_bytes"] = {f"cuda:{g}": int(torch.cuda.max_memory_allocated(g)) for g in self.gpus}
        import gc

        gc.collect()
        torch.cuda.empty_cache()
        self.cases.append(case)
        self.write()
        return case

    def write(self) -> None:
        data = self.summary()
        (self.out / "multi_gpu_check.json").write_text(json.dumps(data, indent=2, default=str) + "\n")
        (self.out / "multi_gpu_check.md").write_text(render(data))

    def summary(self) -> dict[str, Any]:
        from llmopt.environment import environment

        return {
            "schema": "llmopt.multi_gpu_check/1",
            "one_gpu": self.one,
            "split": self.split,
            "settings": {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(self.args).items()},
            "environment": environment(self.split),
            "comparisons": comparisons(self.cases, self.args.tolerance),
            "cases": self.cases,
            "seconds": round(time.perf_counter() - self.start, 1),
        }


def _eval_case(art: Path, assets: dict[str, str], device: str, args: argparse.Namespace) -> dict[str, Any]:
    from llmopt.api import evaluate

    report = evaluate(
        art,
        assets["model"],
        assets["eval_text"],
        context_length=args.context,
        device=device,
        kernel=args.kernel,
        use_cache=False,  # the FP16 baseline is scored again, on this placement
        write_manifest=False,
    ).to_json()
    keep = ("perplexity", "stderr", "tokens_scored", "load_seconds", "eval_seconds", "placement", "kernel", "runner")
    return {
        "device": device,
        "settings": report["settings"],
        "baseline": {k: report["baseline"].get(k) for k in keep},
        "artifact": {k: report["artifact"].get(k) for k in keep},
        "delta_pct": report["delta_pct"],
    }


def _quantize_case(
    method: str, options: dict[str, Any], out: Path, assets: dict[str, str], device: str, args: argparse.Namespace
) -> dict[str, Any]:
    from llmopt.api import quantize
    from llmopt.artifact import files_digest

    art = quantize(
        assets["model"],
        method,
        out,
        options=options,
        calibration=assets["calibration_text"] if method == "gptq" else None,
        samples=args.samples,
        seq_len=args.seq_len,
        device=device,
        overwrite=True,
    )
    return {
        "path": str(out),
        "device": device,
        "quantize_seconds": art.manifest.quantize_seconds,
        "placement": art.manifest.environment.placement,
        "files_sha256": files_digest(art.manifest.files),
    }


def split_layers_evenly() -> None:
    """Make llmopt's planner deal decoder layers out evenly by count (``--split layers``).

    llmopt balances weight bytes, so with SmolLM2's 4-bit layers (~2 MB each) smaller than its tied
    embedding/head (56 MB) a balanced GPTQ plan puts the embedding and head on the first GPU and all 30
    layers on the second: a real split, but not one through the layers. This check harness forces one.
    Units before the first layer stay on the first GPU, units after the last on the last GPU.
    """
    import llmopt.placement as placement

    def even(units: list[Any], devices: list[str]) -> dict[str, str]:
        layers = [u for u in units if u.is_layer]
        out: dict[str, str] = {}
        seen = 0
        for u in units:
            if u.is_layer:
                out[u.name] = devices[min(len(devices) - 1, seen * len(devices) // len(layers))]
                seen += 1
            elif u.tied_to is None:
                out[u.name] = devices[0] if seen == 0 else devices[-1]
        for u in units:
            if u.tied_to is not None:
                out[u.name] = out.get(u.tied_to, devices[0])
        return {u.name: out[u.name] for u in units}

    placement.split_units = even


def split_ok(placement: dict[str, Any] | None) -> bool:
    """True when a loaded model's weights really are on more than one GPU.

    Not necessarily decoder layers on each: llmopt balances bytes, so a model whose embedding outweighs
    its quantized layers (SmolLM2 in 4 bits) gets the embedding and tied head on one GPU and every layer
    on the other. ``--split layers`` forces layers onto each GPU.
    """
    where = placement or {}
    nbytes = where.get("bytes_per_device") or {}
    return where.get("mode") == "split" and sum(1 for n in nbytes.values() if n > 0) >= 2


def comparisons(cases: list[dict[str, Any]], tolerance: float) -> list[dict[str, Any]]:
    """Rows of perplexity on 1 GPU vs split, from the evaluation cases that finished."""
    evals = {c["name"]: c["result"] for c in cases if c["status"] == "ok" and c["kind"] == "evaluate"}
    quants = {c["name"]: c for c in cases if c["kind"].startswith("quantize")}
    rows: list[dict[str, Any]] = []

    def row(model: str, quantized_on: str, one: dict[str, Any] | None, split: dict[str, Any] | None) -> None:
        r: dict[str, Any] = {"model": model, "quantized_on": quantized_on}
        r["ppl_1gpu"] = one["perplexity"] if one else None
        r["ppl_split"] = split["perplexity"] if split else None
        r["placement_1gpu"] = (one or {}).get("placement")
        r["placement_split"] = (split or {}).get("placement")
        r["eval_seconds"] = [(one or {}).get("eval_seconds"), (split or {}).get("eval_seconds")]
        r["load_seconds"] = [(one or {}).get("load_seconds"), (split or {}).get("load_seconds")]
        if one and split:
            diff = split["perplexity"] - one["perplexity"]
            r["diff"] = diff
            r["diff_rel"] = diff / one["perplexity"]
            r["split_used_several_gpus"] = split_ok(split.get("placement"))
            r["match"] = abs(r["diff_rel"]) <= tolerance and r["split_used_several_gpus"]
        rows.append(r)

    fp16_one = next((evals[n]["baseline"] for n in evals if n.endswith("@1gpu")), None)
    fp16_split = next((evals[n]["baseline"] for n in evals if n.endswith("@split")), None)
    row("fp16", "-", fp16_one, fp16_split)
    for variant in QUANTIZED:
        for where in ("1gpu", "split"):
            q = f"quantize {variant} on {where}"
            if q not in quants:
                continue
            one = evals.get(f"eval {variant} (quantized on {where}) @1gpu")
            split = evals.get(f"eval {variant} (quantized on {where}) @split")
            r_one = one["artifact"] if one else None
            r_split = split["artifact"] if split else None
            row(variant, where, r_one, r_split)
            rows[-1]["quantize"] = {
                "status": quants[q]["status"],
                "seconds": quants[q].get("seconds"),
                "peak_memory_bytes": quants[q].get("peak_memory_bytes"),
                "placement": (quants[q].get("result") or {}).get("placement"),
                "files_sha256": (quants[q].get("result") or {}).get("files_sha256"),
            }
        # Is the artifact the same whichever way it was quantized? (bnb: expected; GPTQ: summation order
        # over GPUs can change the Hessians in the last bits.)
        a = next((r for r in rows if r["model"] == variant and r["quantized_on"] == "1gpu"), None)
        b = next((r for r in rows if r["model"] == variant and r["quantized_on"] == "split"), None)
        if a and b and a.get("quantize", {}).get("files_sha256") and b.get("quantize", {}).get("files_sha256"):
            same = a["quantize"]["files_sha256"] == b["quantize"]["files_sha256"]
            a["quantize"]["same_files_as_split"] = b["quantize"]["same_files_as_1gpu"] = same
    return rows


def _layers(placement: dict[str, Any] | None) -> str:
    if not placement:
        return "-"
    layers = placement.get("layers_per_device") or {}
    if placement.get("mode") == "layerwise":
        return "layer by layer on " + ",".join(placement.get("devices") or [])
    if layers:
        return ", ".join(f"{d}: {n}" for d, n in layers.items())
    return ",".join(placement.get("devices") or [])


def _gb(n: Any) -> str:
    return f"{n / 1e9:.2f}" if isinstance(n, (int, float)) else "-"


def _num(x: Any, fmt: str = ".4f") -> str:
    return format(x, fmt) if isinstance(x, (int, float)) else "-"


def render(data: dict[str, Any]) -> str:
    lines = [
        f"# Perplexity on one GPU ({data['one_gpu']}) vs layers split over {data['split']}",
        "",
        f"Device: {data['environment'].get('device')}; torch {data['environment']['packages'].get('torch')}, "
        f"transformers {data['environment']['packages'].get('transformers')}, "
        f"gptqmodel {data['environment']['packages'].get('gptqmodel')}; "
        f"context {data['settings'].get('context')}, calibration {data['settings'].get('samples')} x "
        f"{data['settings'].get('seq_len')}; tolerance {data['settings'].get('tolerance')} (relative).",
        "",
        "| model | quantized on | ppl 1 GPU | ppl split | diff | diff % | match | layers per GPU (split) "
        "| eval s (1 / split) |",
        "| --- | --- | --- | --- | --- | --- | --- | --- | --- |",
    ]
    for r in data["comparisons"]:
        eval_s = " / ".join(_num(x, ".2f") for x in r["eval_seconds"])
        match = {True: "yes", False: "NO"}.get(r.get("match"), "-")
        diff_pct = 100 * r["diff_rel"] if isinstance(r.get("diff_rel"), float) else None
        lines.append(
            f"| {r['model']} | {r['quantized_on']} | {_num(r['ppl_1gpu'])} | {_num(r['ppl_split'])} "
            f"| {_num(r.get('diff'), '.2e')} | {_num(diff_pct, '.4f')} | {match} "
            f"| {_layers(r['placement_split'])} | {eval_s} |"
        )
    lines += [
        "",
        "| case | status | seconds | peak memory per GPU (GB) | placement | error |",
        "| --- | --- | --- | --- | --- | --- |",
    ]
    for c in data["cases"]:
        peaks = ", ".join(f"{d}: {_gb(v)}" for d, v in (c.get("peak_memory_bytes") or {}).items()) or "-"
        res = c.get("result") or {}
        where = res.get("placement") or (res.get("artifact") or {}).get("placement")
        err = (c.get("error") or "").replace("|", "/")[:160]
        lines.append(
            f"| {c['name']} | {c['status']} | {_num(c.get('seconds'), '.1f')} | {peaks} | {_layers(where)} | {err} |"
        )
    lines += ["", f"Total: {data['seconds']} s.", ""]
    return "\n".join(lines)


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", type=Path, required=True)
    p.add_argument("--samples", type=int, default=128, help="GPTQ calibration samples (default 128)")
    p.add_argument("--seq-len", type=int, default=512, help="tokens per calibration sample (default 512)")
    p.add_argument("--context", type=int, default=512, help="evaluation window (default 512)")
    p.add_argument("--kernel", default=None, help="GPTQ kernel for evaluation (default: llmopt's, Marlin on CUDA)")
    p.add_argument("--gpus", default=None, help="GPU ids to split over, e.g. 0,1 (default: every visible GPU)")
    p.add_argument("--deadline-s", type=float, default=540.0, help="start no case after this (default 540)")
    p.add_argument("--tolerance", type=float, default=1e-3, help="max relative perplexity difference")
    p.add_argument(
        "--quantize-on",
        choices=["both", "1gpu", "split"],
        default="both",
        help="where each variant is quantized: once on one GPU, once split, or both (default)",
    )
    p.add_argument(
        "--split",
        choices=["bytes", "layers"],
        default="bytes",
        help="bytes: llmopt's plan (balanced weight bytes); layers: decoder layers dealt out evenly (a check harness)",
    )
    p.add_argument("--only", nargs="*", default=None, choices=list(QUANTIZED), help="quantized variants to run")
    args = p.parse_args()

    import torch

    count = torch.cuda.device_count() if torch.cuda.is_available() else 0
    gpus = [int(g) for g in args.gpus.split(",")] if args.gpus else list(range(count))
    if count < 2 or len(gpus) < 2:
        msg = f"needs two GPUs or more; {count} visible"
        args.out.mkdir(parents=True, exist_ok=True)
        (args.out / "multi_gpu_check.json").write_text(json.dumps({"error": msg}) + "\n")
        print(f"error: {msg}", file=sys.stderr)
        return 2

    if args.split == "layers":
        split_layers_evenly()
    check = Check(args, gpus)
    assets = prepare(default_cache())
    arts = args.out / "artifacts"
    variants = [v for v in QUANTIZED if not args.only or v in args.only]

    # bnb first (quick), GPTQ last: if the deadline comes, the FP16 and bnb comparisons are complete.
    for variant in variants:
        method, options = QUANTIZED[variant]
        kind = "quantize-gptq" if method == "gptq" else "quantize"
        made: dict[str, Path] = {}
        for where, device in (("1gpu", check.one), ("split", check.split)):
            if args.quantize_on not in ("both", where):
                continue
            folder = arts / f"{variant}-{where}"
            case = check.run(
                f"quantize {variant} on {where}",
                kind,
                lambda m=method, o=options, f=folder, d=device: _quantize_case(m, o, f, assets, d, args),
            )
            if case["status"] == "ok":
                made[where] = folder
        for where, folder in made.items():
            for at, device in (("1gpu", check.one), ("split", check.split)):
                check.run(
                    f"eval {variant} (quantized on {where}) @{at}",
                    "evaluate",
                    lambda f=folder, d=device: _eval_case(f, assets, d, args),
                )

    data = check.summary()
    check.write()
    print(render(data))
    print(f"wrote {args.out / 'multi_gpu_check.json'} and {args.out / 'multi_gpu_check.md'}")
    ran = [r for r in data["comparisons"] if "match" in r]
    return 0 if ran and all(r["match"] for r in ran) else 1


if __name__ == "__main__":
    sys.exit(main())
