#!/usr/bin/env python3
"""GPU throughput benchmark: random-weight Llama in the 1B and 8B shapes, FP16 vs GPTQ 4-bit vs bitsandbytes.

Speed does not depend on weight values, so the models are built with random weights on the GPU machine
(nothing to download): FP16 is saved as a Hugging Face folder and loaded back through llmopt's runner;
GPTQ 4-bit g128 is written as a checkpoint with random packed weights (``random_models.write_random_gptq``)
and loaded through GPTQModel with the Marlin kernel; bitsandbytes nf4 / int8 are quantized from the FP16
folder at load, as transformers does. Every variant of a shape is measured in this one process with
llmopt's engine (static KV cache, torch.compile + CUDA graph where it works), so speedups are side by side.

Usage (on the GPU machine, from the repo root; benchmarks/bench_gpu.sh installs the carried wheels first):
    python3 benchmarks/bench_gpu.py --shapes 8b --variants fp16,gptq --out bench-out
Writes bench-out/bench.json (all numbers), bench-out/table.md (the summary table) and, with --profile,
bench-out/profile-<shape>-<variant>.txt (top kernels of one batch-1 decode run).
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "scripts"))

T0 = time.time()
# Rough seconds each variant needs (load + compile at two batch shapes + timing), to respect --deadline-s.
COST_S = {
    "8b": {"fp16": 180, "gptq": 150, "awq": 150, "nf4": 110, "int8": 70},
    "1b": {"fp16": 90, "gptq": 100, "awq": 100, "nf4": 60, "int8": 60},
}


def log(msg: str) -> None:
    print(f"[{time.time() - T0:6.1f}s] {msg}", flush=True)


# GPTQModel kernels that JIT-compile CUDA code at first use, and the extension object that builds them.
JIT_KERNELS = {
    "marlin": ("gptqmodel.utils.marlin", "_MARLIN_FP16_TORCH_OPS_EXTENSION"),
    "exllama_v2": ("gptqmodel.utils.exllamav2", "_EXLLAMAV2_GPTQ_TORCH_OPS_EXTENSION"),
}


def gptq_kernel(variant: str, default: str) -> str:
    """'gptq' uses --kernel; 'gptq-exllama_v2' names its kernel; 'awq' is AWQ through awq_marlin, 'awq-gemm'
    names its kernel. A '_fp16reduce' suffix runs Marlin with its fp16 (not fp32) split-K reduction, '_atomic'
    GPTQ-Marlin with atomicAdd reduction on the shapes where AWQ-Marlin uses it (llmopt.runners.marlin)."""
    method, _, named = variant.partition("-")
    kernel = named or (default if method == "gptq" else "marlin")
    return kernel.removesuffix("_fp16reduce").removesuffix("_atomic")


def fp16_reduce(variant: str) -> bool:
    return variant.endswith("_fp16reduce")


def prebuild_kernels(out: Path, kernels: list[str]) -> subprocess.Popen[bytes] | None:
    """Start GPTQModel's JIT builds (minutes for Marlin) in the background while FP16 is measured."""
    lines = ["import torch, importlib"]
    for k in kernels:
        if k in JIT_KERNELS:
            mod, attr = JIT_KERNELS[k]
            lines.append(f"e = getattr(importlib.import_module('{mod}'), '{attr}')")
            lines.append(f"print('{k} build:', e.load(), getattr(e, '_last_error', ''), flush=True)")
    if len(lines) == 1:
        return None
    code = "\n".join(lines) + "\n"
    try:
        logf = open(out / "kernel-build.log", "wb")  # noqa: SIM115 - lives as long as the process
        return subprocess.Popen([sys.executable, "-c", code], stdout=logf, stderr=subprocess.STDOUT)
    except OSError as exc:
        log(f"could not start the kernel builds: {exc}")
        return None


def gemv_probe(device: str, bandwidth: float) -> list[dict[str, Any]]:
    """How close cuBLAS gets to the copy bandwidth on the 8B shape's batch-1 matrix-vector products."""
    import torch
    import torch.nn.functional as F

    rows = []
    for k, n in ((4096, 4096), (4096, 1024), (4096, 14336), (14336, 4096), (4096, 128256)):
        w = torch.randn(n, k, device=device, dtype=torch.float16)
        x = torch.randn(1, k, device=device, dtype=torch.float16)
        for _ in range(5):
            F.linear(x, w)
        torch.cuda.synchronize()
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        iters = 50
        start.record()
        for _ in range(iters):
            F.linear(x, w)
        end.record()
        torch.cuda.synchronize()
        sec = start.elapsed_time(end) / 1e3 / iters
        rows.append({"k": k, "n": n, "us": sec * 1e6, "fraction_of_copy_bw": (w.numel() * 2 / sec) / bandwidth})
        del w, x
    torch.cuda.empty_cache()
    return rows


LINEARS = ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj", "mlp.gate_proj",
           "mlp.up_proj", "mlp.down_proj")  # fmt: skip


def _module_bytes(module: Any) -> int:
    seen: set[int] = set()
    total = 0
    for t in [*module.parameters(), *module.buffers()]:
        if t.data_ptr() not in seen and t.is_cuda:
            seen.add(t.data_ptr())
            total += t.numel() * t.element_size()
    return total


def layer_probe(model: Any, device: str, batches: tuple[int, ...] = (1, 8)) -> list[dict[str, Any]]:
    """Each linear of decoder layer 0 (and lm_head) alone: 20 calls captured in one CUDA graph, replayed,
    so launch overhead is out; bytes = the module's tensors on the GPU (weights, scales, zeros, indices).
    The graph's output is compared with an eager call: a kernel missing from the capture shows up."""
    import torch

    bandwidth = COPY_BW or 1.0
    layer = model.model.layers[0]
    modules = [(name, layer.get_submodule(name)) for name in LINEARS]
    modules.append(("lm_head", model.lm_head))
    rows = []
    for name, module in modules:
        k = getattr(module, "in_features", None)
        if k is None:
            continue
        nbytes = _module_bytes(module)
        for m in batches:
            x = torch.randn(m, k, device=device, dtype=torch.float16)
            row: dict[str, Any] = {"module": name, "kind": type(module).__name__, "m": m, "bytes": nbytes}
            try:
                with torch.no_grad():
                    ref = module(x).float()
                    stream = torch.cuda.Stream(device=device)
                    stream.wait_stream(torch.cuda.current_stream(device))
                    with torch.cuda.stream(stream):
                        for _ in range(3):
                            module(x)
                    torch.cuda.current_stream(device).wait_stream(stream)
                    graph, calls = torch.cuda.CUDAGraph(), 20
                    with torch.cuda.graph(graph):
                        for _ in range(calls):
                            y = module(x)
                    graph.replay()
                    torch.cuda.synchronize(device)
                    err = float((y.float() - ref).norm() / ref.norm().clamp_min(1e-12))
                    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
                    reps = 10
                    start.record()
                    for _ in range(reps):
                        graph.replay()
                    end.record()
                    torch.cuda.synchronize(device)
                sec = start.elapsed_time(end) / 1e3 / (reps * calls)
                row.update(us=round(sec * 1e6, 2), fraction_of_copy_bw=round(nbytes / sec / bandwidth, 3),
                           graph_vs_eager_rel_err=err)  # fmt: skip
                del graph
            except Exception as exc:
                row["error"] = f"{type(exc).__name__}: {str(exc)[:200]}"
            rows.append(row)
    total = {m: sum(r.get("us", 0.0) for r in rows if r["m"] == m and r["module"] != "lm_head") for m in batches}
    for m in batches:
        layer_rows = [r for r in rows if r["m"] == m and r["module"] != "lm_head"]
        nbytes = sum(r["bytes"] for r in layer_rows)
        log(f"  layer probe m={m}: {total[m]:.1f} us per decoder layer for {nbytes / 1e6:.1f} MB "
            f"({100 * nbytes / (total[m] / 1e6) / bandwidth if total[m] else 0:.0f}% of copy bw)")  # fmt: skip
    return rows


def profile_decoder(path: Path, label: str) -> Any:
    """A hook for measure_decode: profile 16 batch-1 steps with the decoder as measured."""

    def hook(batch: int, decoder: Any, first: Any, position: int) -> None:
        if batch != 1:
            return
        import torch
        from torch.profiler import ProfilerActivity, profile

        steps = 16
        decoder.run(first, position, 4)
        with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
            decoder.run(first, position, steps)
        torch.cuda.synchronize()
        events = prof.key_averages()
        key = "self_device_time_total" if hasattr(events[0], "self_device_time_total") else "self_cuda_time_total"
        kernels = [e for e in events if getattr(e, key, 0) > 0 and getattr(e, "device_type", None) is not None]
        total_us = sum(getattr(e, key) for e in kernels)
        launches = sum(e.count for e in kernels)
        lines = [
            f"{label}: batch-1 decode, {steps} steps, mode {decoder.mode}",
            f"device time {total_us / steps:.1f} us/step over {launches / steps:.0f} kernel launches/step",
            "",
        ]
        try:
            lines.append(events.table(sort_by=key, row_limit=30, max_name_column_width=90))
        except Exception as exc:  # the table format differs between torch versions
            lines.append(f"(no table: {exc})")
        path.write_text("\n".join(lines))
        log(lines[1])

    return hook


def measure_loaded(model: Any, device: str, settings: Any, profile_to: Path | None, label: str) -> dict[str, Any]:
    from llmopt.runners.engine import measure_model

    hook = profile_decoder(profile_to, label) if profile_to else None
    return measure_model(model, device, settings, None, hook)


def run_variant(
    shape: str, variant: str, dirs: dict[str, Path], device: str, settings: Any, args: argparse.Namespace
) -> dict[str, Any]:
    import torch

    from llmopt.evaluate.throughput import weights_size

    first_shape = args.shapes.split(",")[0]
    profiled = variant in args.profile and shape == first_shape
    profile_to = args.out / f"profile-{shape}-{variant}.txt" if profiled else None
    label = f"{shape} {variant}"
    if variant == "fp16" or variant.startswith(("gptq", "awq")):
        from llmopt.runners import load_runner
        from llmopt.runners.marlin import marlin_atomic_reduce

        method = variant.split("-")[0]
        kind, path = ("hf", dirs["fp16"]) if variant == "fp16" else ("gptqmodel", dirs[method])
        kernel = gptq_kernel(variant, args.kernel) if kind == "gptqmodel" else None
        # GPTQModel reads this when it builds each Marlin layer (default: fp32 reduction).
        if fp16_reduce(variant):
            os.environ["GPTQMODEL_MARLIN_USE_FP32"] = "0"
        try:
            runner = load_runner(kind, path, device, kernel=kernel)
        finally:
            os.environ.pop("GPTQMODEL_MARLIN_USE_FP32", None)
        try:
            # 'gptq' is GPTQModel's Marlin as it ships (ordered reduction); '_atomic' is what `llmopt bench`
            # uses by default (atomicAdd on narrow layers, llmopt/runners/marlin.py).
            with marlin_atomic_reduce(runner.model, variant.endswith("_atomic")) as switched:  # type: ignore[attr-defined]
                if switched:
                    log(f"{label}: atomicAdd reduction on {switched} Marlin layers")
                result = measure_loaded(runner.model, device, settings, profile_to, label)  # type: ignore[attr-defined]
                if args.layer_probe and device.startswith("cuda"):
                    result["layer_probe"] = layer_probe(runner.model, device)  # type: ignore[attr-defined]
            result.update(
                load_seconds=round(runner.load_seconds, 2),
                footprint_bytes=runner.footprint_bytes(),
                size_bytes=weights_size(path),
                kernel=getattr(runner, "kernel", None),
            )
        finally:
            runner.close()
        return result
    from transformers import AutoModelForCausalLM, BitsAndBytesConfig

    if variant == "nf4":
        qcfg = BitsAndBytesConfig(
            load_in_4bit=True,
            bnb_4bit_quant_type="nf4",
            bnb_4bit_use_double_quant=True,
            bnb_4bit_compute_dtype=torch.float16,
            llm_int8_skip_modules=["lm_head"],
        )
    else:
        qcfg = BitsAndBytesConfig(load_in_8bit=True, llm_int8_threshold=6.0, llm_int8_skip_modules=["lm_head"])
    start = time.perf_counter()
    model = AutoModelForCausalLM.from_pretrained(
        dirs["fp16"], quantization_config=qcfg, dtype=torch.float16, device_map={"": device}
    ).eval()
    torch.cuda.synchronize()
    load = time.perf_counter() - start
    try:
        result = measure_loaded(model, device, settings, profile_to, label)
        result.update(
            load_seconds=round(load, 2),
            footprint_bytes=int(model.get_memory_footprint()),
            size_bytes=None,
            kernel="bitsandbytes (quantized at load)",
        )
    finally:
        del model
        gc.collect()
        torch.cuda.empty_cache()
    return result


def prepare_shape(shape: str, variants: list[str], work: Path, device: str) -> dict[str, Path]:
    from random_models import build_fp16, llama_config, save_fp16, write_random_awq, write_random_gptq

    dirs = {
        "fp16": work / f"{shape}-fp16",
        "gptq": work / f"{shape}-gptq",
        "gptqhead": work / f"{shape}-gptqhead",  # the lm_head quantized too (--quantize-lm-head)
        "awq": work / f"{shape}-awq",
    }
    methods = {v.split("-")[0] for v in variants}
    need_fp16 = any(v in variants for v in ("fp16", "nf4", "int8"))
    need_gptq = "gptq" in methods
    need_head = "gptqhead" in methods
    need_awq = "awq" in methods
    missing = lambda key: not (dirs[key] / "config.json").is_file()  # noqa: E731
    if (
        (need_fp16 and missing("fp16"))
        or (need_gptq and missing("gptq"))
        or (need_head and missing("gptqhead"))
        or (need_awq and missing("awq"))
    ):
        model = build_fp16(llama_config(shape), device)
        n = sum(p.numel() for p in model.parameters())
        log(f"{shape}: built random fp16 model, {n / 1e9:.2f}B parameters")
        if need_fp16 and missing("fp16"):
            save_fp16(model, dirs["fp16"])
            log(f"{shape}: saved fp16 folder")
        if need_gptq and missing("gptq"):
            write_random_gptq(model, dirs["gptq"], group_size=128)
            log(f"{shape}: wrote random GPTQ 4-bit g128 checkpoint")
        if need_head and missing("gptqhead"):
            write_random_gptq(model, dirs["gptqhead"], group_size=128, lm_head=True)
            log(f"{shape}: wrote random GPTQ 4-bit g128 checkpoint with a 4-bit g128 lm_head")
        if need_awq and missing("awq"):
            write_random_awq(model, dirs["awq"], group_size=128)
            log(f"{shape}: wrote random AWQ 4-bit g128 checkpoint")
        del model
        gc.collect()
    return dirs


def speedups(results: dict[str, Any]) -> None:
    from llmopt.evaluate.throughput import compare

    base = results.get("fp16")
    for r in results.values():
        if base is not None and "error" not in r and "error" not in base:
            r["vs_fp16"] = compare(base, r, SETTINGS)


def table(report: dict[str, Any]) -> str:
    batches = [str(b) for b in SETTINGS.batch_sizes or []]
    prompts = [str(p) for p in SETTINGS.prompt_lens or []]
    head = (
        ["shape", "variant", "decode mode"]
        + [f"decode tok/s b{b}" for b in batches]
        + ["% roofline b1", "ITL p50/p99 ms b1"]
        + [f"speedup b{b}" for b in batches]
        + [f"prefill tok/s {p}" for p in prompts]
        + ["TTFT ms", "peak mem GB", "weights/step GB", "load s"]
    )
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for shape, variants in report["shapes"].items():
        for name, r in variants.items():
            if "error" in r:
                lines.append(f"| {shape} | {name} | failed: {r['error'][:120]} |")
                continue
            dec, pre = r["decode"], r["prefill"]

            def med(block: dict[str, Any] | None) -> str:
                if not block or "tokens_per_s" not in block:
                    return "-"
                t = block["tokens_per_s"]
                return f"{t['median']:,.0f} ({t['min']:,.0f}-{t['max']:,.0f})"

            itl = (dec.get("1") or {}).get("itl_ms") or {}
            frac = (r.get("roofline") or {}).get("fraction_at_batch_1")
            sp = (r.get("vs_fp16") or {}).get("decode_speedup") or {}
            row = (
                [shape, name, str(r.get("decode_mode"))]
                + [med(dec.get(b)) for b in batches]
                + [f"{100 * frac:.1f}%" if frac else "-", f"{itl.get('p50', 0):.2f}/{itl.get('p99', 0):.2f}"]
                + [f"{sp[b]:.2f}x" if sp.get(b) else "-" for b in batches]
                + [
                    f"{pre[p]['tokens_per_s']['median']:,.0f}" if "tokens_per_s" in pre.get(p, {}) else "-"
                    for p in prompts
                ]
                + [
                    f"{r.get('ttft_ms') or 0:.1f}",
                    f"{(r.get('peak_memory_bytes') or 0) / 1e9:.2f}",
                    f"{r['weight_bytes_per_step'] / 1e9:.2f}",
                    f"{r.get('load_seconds', 0):.1f}",
                ]
            )
            lines.append("| " + " | ".join(row) + " |")
    return "\n".join(lines)


def main() -> None:
    global SETTINGS, ARGS
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--shapes", default="8b,1b")
    parser.add_argument("--variants", default="fp16,gptq,nf4,int8")
    parser.add_argument("--batch-sizes", default="1,8,32")
    parser.add_argument("--prompt-lens", default="128,512,2048")
    parser.add_argument("--gen-len", type=int, default=128)
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--repetitions", type=int, default=5)
    parser.add_argument("--decode-mode", default="auto")
    parser.add_argument("--kernel", default="marlin", help="GPTQModel kernel for GPTQ")
    parser.add_argument("--gpu-hourly-cost", type=float, default=None)
    parser.add_argument("--profile", default="", help="variants to profile at batch 1 (first shape), e.g. fp16,gptq")
    parser.add_argument("--gemv-probe", action="store_true", help="time cuBLAS GEMV on the 8B shapes")
    parser.add_argument(
        "--layer-probe", action="store_true", help="time each linear of layer 0 alone (graph-captured), per variant"
    )
    parser.add_argument("--attn", default="", help="compare attention implementations on FP16, e.g. eager,sdpa")
    parser.add_argument("--attn-shape", default="1b", help="shape for --attn")
    parser.add_argument("--attn-prompt-lens", default="512,2048,8192", help="prompt lengths for --attn")
    parser.add_argument("--attn-batch-sizes", default="1,8", help="decode batch sizes for --attn")
    parser.add_argument(
        "--short-variants",
        default="int8",
        help="variants timed with 32 new tokens x 3 runs (eager decoding is slow; the table says so)",
    )
    parser.add_argument("--modes", default="", help="per-variant decode mode, e.g. int8=eager (default auto)")
    parser.add_argument("--deadline-s", type=float, default=1e9, help="skip variants that would end past this")
    parser.add_argument("--device", default="cuda:0", help="cuda:0; cpu only to smoke-test this script")
    parser.add_argument("--work", type=Path, default=Path("/tmp/llmopt-bench"))
    parser.add_argument("--out", type=Path, default=Path("bench-out"))
    args = parser.parse_args()
    args.profile = [p for p in args.profile.split(",") if p]
    args.out.mkdir(parents=True, exist_ok=True)
    ARGS = args

    os.environ.setdefault("GPTQMODEL_CPU_WORKERS", "4")
    variants = [v for v in args.variants.split(",") if v]
    kernels = sorted({gptq_kernel(v, args.kernel) for v in variants if v.startswith(("gptq", "awq"))})
    builder = prebuild_kernels(args.out, kernels)
    modes = dict(pair.split("=", 1) for pair in args.modes.split(",") if pair)

    import torch

    from llmopt.environment import environment
    from llmopt.evaluate.throughput import ThroughputSettings, parse_int_list
    from llmopt.runners.decoder import reset_compiler
    from llmopt.runners.engine import copy_bandwidth

    device = args.device
    SETTINGS = ThroughputSettings(
        batch_sizes=parse_int_list(args.batch_sizes, "--batch-sizes"),
        prompt_lens=parse_int_list(args.prompt_lens, "--prompt-lens"),
        gen_len=args.gen_len,
        warmup=args.warmup,
        repetitions=args.repetitions,
        decode_mode=args.decode_mode,
        gpu_hourly_cost=args.gpu_hourly_cost,
    ).resolved(device)
    bw = copy_bandwidth(device, use_cache=False)
    global COPY_BW
    COPY_BW = bw["bytes_per_s"]
    env = environment(device)
    log(f"{env['device']}: copy bandwidth {bw['bytes_per_s'] / 1e12:.2f} TB/s; torch {torch.__version__}")
    report: dict[str, Any] = {
        "date": time.strftime("%Y-%m-%d"),
        "environment": env,
        "copy_bandwidth": bw,
        "settings": SETTINGS.model_dump(mode="json"),
        "argv": sys.argv[1:],
        "shapes": {},
    }
    if args.gemv_probe and device.startswith("cuda"):
        report["gemv_probe"] = gemv_probe(device, bw["bytes_per_s"])
        for row in report["gemv_probe"]:
            log(f"GEMV {row['k']}x{row['n']}: {row['us']:.1f} us, {100 * row['fraction_of_copy_bw']:.0f}% of copy bw")

    def save() -> None:
        (args.out / "bench.json").write_text(json.dumps(report, indent=1, default=str))
        (args.out / "table.md").write_text(table(report) + "\n")

    for shape in [s for s in args.shapes.split(",") if s]:
        results: dict[str, Any] = {}
        report["shapes"][shape] = results
        dirs = prepare_shape(shape, variants, args.work, device)
        for variant in variants:
            elapsed = time.time() - T0
            if elapsed + COST_S.get(shape, {}).get(variant.split("-")[0], 60) > args.deadline_s:
                results[variant] = {"error": f"skipped: {elapsed:.0f} s used of the {args.deadline_s:.0f} s deadline"}
                log(f"{shape} {variant}: skipped (deadline)")
                continue
            if variant.startswith(("gptq", "awq")) and builder is not None:
                log("waiting for the GPTQ kernel builds")
                builder.wait()
                log((args.out / "kernel-build.log").read_text()[-400:])
                builder = None
            log(f"{shape} {variant}: start")
            settings = SETTINGS
            if variant in args.short_variants.split(","):
                settings = SETTINGS.model_copy(update={"gen_len": 32, "repetitions": 3, "warmup": 1})
            if variant in modes:
                settings = settings.model_copy(update={"decode_mode": modes[variant]})
            try:
                results[variant] = run_variant(shape, variant, dirs, device, settings, args)
                results[variant]["settings"] = settings.model_dump(mode="json")
                if variant in modes:
                    results[variant]["decode_mode_note"] = (
                        f"decode mode set to {modes[variant]} for this run (not auto); "
                        + (results[variant].get("decode_mode_note") or "")
                    ).strip("; ")
            except Exception as exc:
                import traceback

                traceback.print_exc()
                results[variant] = {"error": f"{type(exc).__name__}: {str(exc)[:500]}"}
            finally:
                reset_compiler()
                gc.collect()
                if device.startswith("cuda"):
                    torch.cuda.empty_cache()
            r = results[variant]
            if "error" not in r:
                d1 = (r["decode"].get("1") or {}).get("tokens_per_s", {}).get("median")
                frac = r["roofline"]["fraction_at_batch_1"]
                log(
                    f"{shape} {variant}: decode b1 {d1} tok/s, roofline {frac}, mode {r['decode_mode']}"
                    f" ({r.get('decode_mode_note')})"
                )
            speedups(results)
            save()
    if args.attn:
        report["attention"] = attention_comparison(args, device)
        (args.out / "attention.md").write_text(attention_table(report["attention"]) + "\n")
        save()
    save()
    print(table(report), flush=True)
    if args.attn:
        print(attention_table(report["attention"]), flush=True)
    log("done")


def attention_comparison(args: argparse.Namespace, device: str) -> dict[str, Any]:
    """`llmopt bench --attn ...` on the FP16 model of --attn-shape: prefill speed and peak memory per
    prompt length, decode speed per batch, for each attention implementation installed."""
    from llmopt.evaluate.throughput import ThroughputSettings, bench, parse_int_list

    attn = [a for a in args.attn.split(",") if a]
    elapsed = time.time() - T0
    if elapsed + 60 * len(attn) > args.deadline_s:
        log("attention comparison: skipped (deadline)")
        return {"error": f"skipped: {elapsed:.0f} s used of the {args.deadline_s:.0f} s deadline"}
    dirs = prepare_shape(args.attn_shape, ["fp16"], args.work, device)
    settings = ThroughputSettings(
        batch_sizes=parse_int_list(args.attn_batch_sizes, "--attn-batch-sizes"),
        prompt_lens=parse_int_list(args.attn_prompt_lens, "--attn-prompt-lens"),
        gen_len=64,
        warmup=1,
        repetitions=3,
        decode_mode=args.decode_mode,
    )
    log(f"attention comparison on {args.attn_shape}: {attn}")
    try:
        result = bench(str(dirs["fp16"]), settings=settings, attn=attn, device=device)
    except Exception as exc:
        import traceback

        traceback.print_exc()
        return {"error": f"{type(exc).__name__}: {str(exc)[:500]}"}
    result["shape"] = args.attn_shape
    return result


def attention_table(result: dict[str, Any]) -> str:
    if "error" in result:
        return f"attention comparison: {result['error']}"
    s = result["settings"]
    prompts, batches = [str(p) for p in s["prompt_lens"]], [str(b) for b in s["batch_sizes"]]
    head = (
        ["attention", "decode mode"]
        + [f"prefill tok/s {p}" for p in prompts]
        + [f"prefill peak GB {p}" for p in prompts]
        + [f"decode tok/s b{b}" for b in batches]
    )
    lines = [f"{result['shape']} FP16, {result['device']}", ""]
    lines += ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for run in result["runs"]:
        m = run["model"]
        if "error" in m:
            lines.append(f"| {run['attn_implementation']} | failed: {m['error'][:120]} |")
            continue
        pre, dec = m.get("prefill", {}), m.get("decode", {})

        def rate(block: dict[str, Any] | None) -> str:
            t = (block or {}).get("tokens_per_s") or {}
            return f"{t['median']:,.0f}" if "median" in t else (block or {}).get("error", "-")[:40]

        row = (
            [run["attn_implementation"], str(m.get("decode_mode"))]
            + [rate(pre.get(p)) for p in prompts]
            + [f"{((pre.get(p) or {}).get('peak_memory_bytes') or 0) / 1e9:.2f}" for p in prompts]
            + [rate(dec.get(b)) for b in batches]
        )
        lines.append("| " + " | ".join(row) + " |")
    for a, why in result.get("skipped_attention", {}).items():
        lines.append(f"\n{a}: skipped ({why})")
    return "\n".join(lines)


SETTINGS: Any = None
ARGS: Any = None
COPY_BW: float | None = None

if __name__ == "__main__":
    main()
