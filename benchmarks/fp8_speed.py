#!/usr/bin/env python3
"""FP8 dynamic decode on a CUDA GPU, three ways side by side in one process: the input quantized per token with
torch's element-wise ops and each linear layer multiplied alone (llmopt before 0.2), the quantization as one
Triton launch, and the Triton launch with q/k/v and gate/up merged (what `llmopt bench` runs now). Plus the memory
the loaded model holds after the FP8 layers replace transformers' own (the stored weights and what else stays).

    python benchmarks/fp8_speed.py FP8_ARTIFACT --device cuda:0 [--batch-sizes 1,8,32] [--decode-mode graph]

Prints one JSON line per configuration: decode tokens/s at each batch size, peak memory, allocated after load.
"""

from __future__ import annotations

import argparse
import functools
import gc
import json
import sys
import time
from pathlib import Path
from typing import Any


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("artifact", type=Path)
    parser.add_argument("--device", default="cuda:0")
    parser.add_argument("--batch-sizes", default="1,8,32")
    parser.add_argument("--prompt-len", type=int, default=128)
    parser.add_argument("--decode-mode", default="graph")
    parser.add_argument("--configs", default="torch-ops,triton,triton-merged")
    args = parser.parse_args()

    import torch

    import llmopt.runners.compressed as compressed
    from llmopt.evaluate.throughput import bench_model
    from llmopt.specs import ThroughputSpec

    settings = ThroughputSpec(
        batch_sizes=[int(b) for b in args.batch_sizes.split(",")],
        prompt_lens=[args.prompt_len],
        decode_mode=args.decode_mode,
    ).resolved(args.device)
    original = compressed.install_fp8
    kernel = compressed._quant_kernel()
    for config in args.configs.split(","):
        compressed._QUANT_KERNEL[:] = [None if config == "torch-ops" else kernel]
        memory: dict[str, Any] = {}

        def install(
            model: Any, path: Path, merge: bool = True, config: str = config, memory: dict[str, Any] = memory
        ) -> Any:
            before = torch.cuda.memory_allocated()
            done = original(model, path, merge=config == "triton-merged")
            gc.collect()
            torch.cuda.empty_cache()
            held = sum(t.numel() * t.element_size() for t in [*model.parameters(), *model.buffers()])
            memory.update(
                allocated_before_install=before,
                allocated_after_install=torch.cuda.memory_allocated(),
                model_tensors_bytes=held,
            )
            return done

        compressed.install_fp8 = functools.partial(install)  # type: ignore[assignment]
        t0 = time.perf_counter()
        try:
            result = bench_model(args.artifact, args.device, settings, isolate=False, label=config)
        except Exception as exc:  # report and go on with the next configuration
            print(json.dumps({"config": config, "error": f"{type(exc).__name__}: {exc}"[:500]}), flush=True)
            continue
        finally:
            compressed.install_fp8 = original
        decode = {
            b: {
                "tokens_per_s": r.get("tokens_per_s", {}).get("median"),
                "peak_memory_bytes": r.get("peak_memory_bytes"),
                "mode": r.get("decode_mode"),
            }
            for b, r in (result.get("decode") or {}).items()
        }
        print(
            json.dumps(
                {
                    "config": config,
                    "kernel": result.get("kernel"),
                    "decode": decode,
                    "memory": memory,
                    "seconds": round(time.perf_counter() - t0, 1),
                }
            ),
            flush=True,
        )
        gc.collect()
        torch.cuda.empty_cache()
    return 0


if __name__ == "__main__":
    sys.exit(main())
