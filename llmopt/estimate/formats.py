"""Bytes of weights per storage format (fp16, GPTQ/AWQ group scales, bitsandbytes, GGUF block sizes) and
of the KV cache."""

from __future__ import annotations

import difflib
import math
from dataclasses import dataclass
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field

from llmopt.errors import InputError
from llmopt.estimate.architecture import Architecture, parameter_count, tensors

KV_DTYPE_BYTES: dict[str, int] = {"fp32": 4, "fp16": 2, "bf16": 2, "fp8": 1}


# --------------------------------------------------------------------------------------------
# Weight memory per format
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class WeightFormat:
    name: str
    kind: Literal["float", "int", "gguf"]
    bits: float  # bits per weight of the stored value (GGUF: per weight including block scales)
    exact: bool  # False for GGUF mixes whose per-tensor choice depends on the model
    description: str


# GGUF bits per weight, from the block structs in llama.cpp's ggml/src/ggml-common.h
# (QK4_0 = QK8_0 = 32, QK_K = 256; ggml_half = 2 bytes):
#   block_q8_0 { half d; int8 qs[32]; }                                     34 B / 32  = 8.5
#   block_q4_0 { half d; uint8 qs[16]; }                                    18 B / 32  = 4.5
#   block_q4_1 { half d, m; uint8 qs[16]; }                                 20 B / 32  = 5.0
#   block_q5_0 { half d; uint8 qh[4]; uint8 qs[16]; }                       22 B / 32  = 5.5
#   block_q5_1 { half d, m; uint8 qh[4]; uint8 qs[16]; }                    24 B / 32  = 6.0
#   block_q2_K { uint8 scales[16]; uint8 qs[64]; half d, dmin; }            84 B / 256 = 2.625
#   block_q3_K { uint8 hmask[32]; uint8 qs[64]; uint8 scales[12]; half d; } 110 B / 256 = 3.4375
#   block_q4_K { half d, dmin; uint8 scales[12]; uint8 qs[128]; }           144 B / 256 = 4.5
#   block_q5_K { half d, dmin; uint8 scales[12]; uint8 qh[32]; uint8 qs[128]; } 176 B / 256 = 5.5
#   block_q6_K { uint8 ql[128]; uint8 qh[64]; int8 scales[16]; half d; }    210 B / 256 = 6.5625
# The *_K_S/_M/_L names are mixes that llama-quantize picks per tensor (attention V and FFN down get
# more bits, ...); their file-level averages below are those llama.cpp's tools/quantize/README.md
# reports for Llama 2 7B, so they are approximations for other models. llama.cpp keeps 1-D tensors
# (norms, biases) in F32, and so does this estimate.
_GGUF_BPW: dict[str, tuple[float, bool]] = {
    "f32": (32.0, True),
    "f16": (16.0, True),
    "bf16": (16.0, True),
    "q8_0": (8.5, True),
    "q6_k": (6.5625, True),
    "q5_1": (6.0, True),
    "q5_0": (5.5, True),
    "q5_k_m": (5.68, False),
    "q5_k_s": (5.52, False),
    "q4_1": (5.0, True),
    "q4_k_m": (4.84, False),
    "q4_k_s": (4.58, False),
    "q4_0": (4.5, True),
    "q3_k_l": (4.27, False),
    "q3_k_m": (3.91, False),
    "q3_k_s": (3.50, False),
    "q2_k": (3.35, False),  # the mix (q2_k block alone: 2.625; other tensors get q3_k/q4_k)
}

WEIGHT_FORMATS: dict[str, WeightFormat] = {
    "fp32": WeightFormat("fp32", "float", 32, True, "every tensor in float32"),
    "bf16": WeightFormat("bf16", "float", 16, True, "every tensor in bfloat16"),
    "fp16": WeightFormat("fp16", "float", 16, True, "every tensor in float16"),
    "int8": WeightFormat(
        "int8", "int", 8, True,
        "decoder linears int8 + one fp16 scale per output row; embeddings, lm_head, norms fp16",
    ),
    "int4": WeightFormat(
        "int4", "int", 4, True,
        "decoder linears int4 + per group an fp16 scale and a 4-bit zero (GPTQ/AWQ layout); the rest fp16",
    ),
    **{
        f"gguf-{name}": WeightFormat(
            f"gguf-{name}", "gguf", bpw, exact,
            f"GGUF {name.upper()}: 2-D tensors at {bpw:g} bits/weight"
            f"{'' if exact else ' (file average of the mix)'}, 1-D tensors F32",
        )
        for name, (bpw, exact) in _GGUF_BPW.items()
    },
}  # fmt: skip


def weight_format(name: str) -> WeightFormat:
    key = name.lower().strip()
    if key in ("float16", "half"):
        key = "fp16"
    elif key in ("bfloat16",):
        key = "bf16"
    elif key in ("float32", "float"):
        key = "fp32"
    elif key in _GGUF_BPW and key not in WEIGHT_FORMATS:
        key = f"gguf-{key}"
    elif key.startswith("gguf:"):
        key = "gguf-" + key[5:]
    fmt = WEIGHT_FORMATS.get(key)
    if fmt is None:
        close = difflib.get_close_matches(key, WEIGHT_FORMATS, n=3)
        raise InputError(
            f"unknown weight format '{name}'" + (f" (did you mean {', '.join(close)}?)." if close else "."),
            f"Use one of: {', '.join(WEIGHT_FORMATS)}.",
        )
    return fmt


class WeightMemory(BaseModel):
    model_config = ConfigDict(extra="forbid")
    format: str
    bytes: int
    bits_per_weight: float = Field(description="bytes * 8 / parameters: the effective average, overhead included.")
    exact: bool
    description: str


def weight_bytes(
    arch: Architecture, fmt: str, *, group_size: int = 128, scale_bits: int = 16, zero_point: bool = True
) -> int:
    """Bytes of the model's weights stored at ``fmt`` (see ``WEIGHT_FORMATS``).

    int4: each decoder linear [out, in] holds out*in 4-bit values and, per group of ``group_size``
    input columns (-1: one group per row), one ``scale_bits`` scale and, with ``zero_point``, one
    4-bit zero (GPTQ's and AWQ's packed qzeros). GPTQ's act-order index (g_idx, one int32 per input
    column) is not counted. int8: one scale per output row, no zero (LLM.int8 / W8A16 layout).
    Embedding, lm_head, norms and biases stay 16-bit, as GPTQ, AWQ and bitsandbytes leave them.
    """
    spec = weight_format(fmt)
    if group_size == 0 or group_size < -1:
        raise InputError(f"group size {group_size} is not valid.", "Use a positive group size, or -1 for one per row.")
    total_bits = 0.0
    for g in tensors(arch):
        n = math.prod(g.shape) * g.count
        if spec.kind == "float":
            total_bits += n * spec.bits
        elif spec.kind == "gguf":
            total_bits += n * (spec.bits if len(g.shape) == 2 else 32)
        elif g.role == "linear":
            rows, cols = g.shape
            if spec.name == "int8":
                per_row_groups, zero_bits = 1, 0
            else:
                per_row_groups = 1 if group_size == -1 else math.ceil(cols / group_size)
                zero_bits = int(spec.bits) if zero_point else 0
            total_bits += g.count * (rows * cols * spec.bits + rows * per_row_groups * (scale_bits + zero_bits))
        else:
            total_bits += n * 16
    return math.ceil(total_bits / 8)


def weight_memory(arch: Architecture, fmt: str, *, group_size: int = 128) -> WeightMemory:
    spec = weight_format(fmt)
    nbytes = weight_bytes(arch, spec.name, group_size=group_size)
    params = parameter_count(arch).total
    description = spec.description
    if spec.name == "int4":
        description += f" (group size {group_size})"
    return WeightMemory(
        format=spec.name,
        bytes=nbytes,
        bits_per_weight=round(nbytes * 8 / params, 4),
        exact=spec.exact,
        description=description,
    )


TABLE_FORMATS = (
    "fp32",
    "bf16",
    "fp16",
    "int8",
    "int4",
    "gguf-q8_0",
    "gguf-q6_k",
    "gguf-q5_k_m",
    "gguf-q4_k_m",
    "gguf-q4_0",
)


# --------------------------------------------------------------------------------------------
# KV cache
# --------------------------------------------------------------------------------------------


def kv_dtype_bytes(kv_dtype: str) -> int:
    key = kv_dtype.lower()
    key = {
        "float16": "fp16",
        "bfloat16": "bf16",
        "float32": "fp32",
        "fp8_e4m3": "fp8",
        "fp8_e5m2": "fp8",
    }.get(key, key)
    if key not in KV_DTYPE_BYTES:
        raise InputError(f"unknown KV-cache dtype '{kv_dtype}'.", f"Use one of: {', '.join(KV_DTYPE_BYTES)}.")
    return KV_DTYPE_BYTES[key]


def kv_bytes_per_token(arch: Architecture, kv_dtype: str = "fp16") -> int:
    """K and V of one token over all layers: 2 * layers * kv_heads * head_dim * dtype bytes."""
    return 2 * arch.num_layers * arch.num_kv_heads * arch.head_dim * kv_dtype_bytes(kv_dtype)


def kv_cache_bytes(arch: Architecture, *, batch: int, context: int, kv_dtype: str = "fp16") -> int:
    """KV cache of ``batch`` x ``context`` tokens; sliding-window layers keep at most their window."""
    if batch < 1 or context < 1:
        raise InputError("batch and context must be at least 1.", "Pass --batch N and --context N with N >= 1.")
    per_layer_token = 2 * arch.num_kv_heads * arch.head_dim * kv_dtype_bytes(kv_dtype)
    tokens = sum(min(context, w) if w else context for w in arch.layer_windows)
    return batch * tokens * per_layer_token
