"""GPTQ-Marlin's split-K reduction through atomicAdd on the shapes where it is the fast path.

GPTQModel's AWQ-Marlin layers reduce split-K partial sums with atomicAdd when the output is narrow
and the input wide (``should_use_atomic_add_reduce``: n < 2048, k >= 2048 — a Llama's k/v projections);
its GPTQ-Marlin layers pass ``use_atomics=False`` always. Measured on an H200 (docs/BENCHMARKS.md,
run 5), the 8B shape's 4096 -> 1024 projections take 19.5 us each through GPTQ-Marlin and 4.2 us with
atomicAdd; batch-1 decode goes from 1.19x to 1.52x FP16. The price: those two projections' outputs are
summed in a different, unordered way (8e-4 relative difference to the ordered reduction, measured), so
results are not bit-for-bit repeatable. llmopt therefore uses it for speed measurements only
(``ThroughputSettings.marlin_atomics``), never while scoring perplexity.
"""

from __future__ import annotations

import functools
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any


def atomic_reduce_shape(in_features: int, out_features: int) -> bool:
    """GPTQModel's rule for atomicAdd reduction (its AWQ-Marlin path): narrow output, wide input."""
    return out_features < 2048 and in_features >= 2048


def _atomic_forward(module: Any, apply: Any, x: Any) -> Any:
    """MarlinLinear.forward with ``use_atomics=True``; anything unusual goes through the original."""
    if x.dtype != module.scales.dtype or getattr(module, "_marlin_tile_padding", None) is not None or module.adapter:
        return type(module).forward(module, x)
    return apply(
        input=x,
        weight=module.qweight,
        weight_scale=module.scales,
        weight_zp=module.qzeros,
        g_idx=module.g_idx,
        g_idx_sort_indices=module.g_idx_sort_indices,
        workspace=module.workspace,
        wtype=module.weight_type,
        output_size_per_partition=module.out_features,
        input_size_per_partition=module.in_features,
        is_k_full=module.is_k_full,
        bias=module.bias,
        use_fp32_reduce=module.fp32,
        use_atomics=True,  # GPTQModel still gates it by should_use_atomic_add_reduce (CUDA, dtype)
    )


@contextmanager
def marlin_atomic_reduce(model: Any, enabled: bool = True) -> Iterator[int]:
    """Within the block, GPTQ-Marlin layers of atomic-reduce shape reduce with atomicAdd.

    Yields how many layers were switched (0 when disabled, without GPTQModel, or without such
    layers); every switched layer gets its own forward back on exit.
    """
    if not enabled:
        yield 0
        return
    try:
        from gptqmodel.utils.marlin import apply_gptq_marlin_linear
    except ImportError:
        yield 0
        return
    switched: list[Any] = []
    for module in model.modules():
        if type(module).__name__ != "MarlinLinear" or "forward" in vars(module):
            continue
        if atomic_reduce_shape(int(module.in_features), int(module.out_features)):
            module.forward = functools.partial(_atomic_forward, module, apply_gptq_marlin_linear)
            switched.append(module)
    try:
        yield len(switched)
    finally:
        for module in switched:
            del module.forward
