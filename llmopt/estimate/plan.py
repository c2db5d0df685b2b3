"""The plan (``estimate``): what fits where, at what speed and cost; built on architecture.py, formats.py
and gpus.py. Plan before you download: parameters, weight and KV-cache memory, GPU count and cost from config.json.

Everything here is arithmetic on a model's ``config.json``: no weights are read and nothing heavy is
imported (no torch). The numbers are exact where the architecture makes them exact (parameter count,
tensor bytes at a given format, KV-cache bytes), and labelled as ceilings or approximations where
they are not (decode speed from bandwidth, GGUF k-quant mixes).

The model families are written out tensor by tensor (``tensors()``), the way transformers builds
them, so that quantized sizes can be computed per tensor (group scales depend on each tensor's
shape) and a test can compare the list with a real checkpoint.
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field

from llmopt.errors import InputError
from llmopt.estimate.architecture import (
    Architecture,
    ParameterCount,
    architecture_from_config,
    load_config,
    parameter_count,
)
from llmopt.estimate.formats import (
    TABLE_FORMATS,
    WeightMemory,
    kv_bytes_per_token,
    kv_cache_bytes,
    kv_dtype_bytes,
    weight_format,
    weight_memory,
)
from llmopt.estimate.gpus import GPUSpec, find_gpu, load_gpu_catalog

TP_SIZES = (1, 2, 4, 8)
DEFAULT_UTILIZATION = 0.9


# --------------------------------------------------------------------------------------------
# Measured throughput from a report
# --------------------------------------------------------------------------------------------


class MeasuredDecode(BaseModel):
    model_config = ConfigDict(extra="forbid")
    tokens_per_s: float
    batch: int
    device: str | None = None
    report: str


def _decode_block(data: Any) -> tuple[dict[str, Any], str | None, str] | None:
    """The per-batch decode results of a report, where it was measured, and where in the file they are."""
    if not isinstance(data, dict):
        return None
    section = data.get("throughput")
    if isinstance(section, dict):  # `llmopt eval --throughput`: the artifact's side of the comparison
        device = section.get("device") if isinstance(section.get("device"), str) else None
        artifact = section.get("artifact")
        if isinstance(artifact, dict) and isinstance(artifact.get("decode"), dict):
            return artifact["decode"], device, "throughput.artifact.decode"
        if isinstance(section.get("decode"), dict):
            return section["decode"], device, "throughput.decode"
    runs = data.get("runs")
    if isinstance(runs, list) and runs and isinstance(runs[0], dict):  # `llmopt bench`: its first run
        model = runs[0].get("model")
        if isinstance(model, dict) and isinstance(model.get("decode"), dict):
            device = data.get("device") if isinstance(data.get("device"), str) else None
            return model["decode"], device, "runs[0].model.decode"
    return None


def _tokens_per_s(entry: Any) -> float | None:
    value = entry.get("tokens_per_s") if isinstance(entry, dict) else None
    if isinstance(value, dict):
        value = value.get("median")
    if isinstance(value, int | float) and not isinstance(value, bool) and value > 0:
        return float(value)
    return None


def read_measured_decode(report_path: str | Path, batch: int) -> tuple[MeasuredDecode | None, str | None]:
    """Measured decode tokens/s at ``batch`` from a report, or (None, why not).

    What is read (the ``llmopt.throughput/1`` layout):

    - a report of ``llmopt eval --throughput``: ``throughput.artifact.decode``, the artifact's speed;
    - a report of ``llmopt bench``: ``runs[0].model.decode``;
    - any JSON with ``throughput.decode``.

    ``decode`` maps a batch size (a string key) to ``{"tokens_per_s": X}`` where X is a number or
    ``{"median": number, ...}``; the device comes from ``throughput.device`` (or ``device``). Only
    the entry measured at exactly ``batch`` is used: tokens/s at another batch says little about this one.
    """
    p = Path(report_path).expanduser()
    if not p.is_file():
        raise InputError(f"report {p} does not exist.", "Pass the JSON written by `llmopt eval --throughput --json`.")
    try:
        data = json.loads(p.read_text())
    except ValueError as exc:
        raise InputError(
            f"report {p} is not valid JSON ({exc}).",
            "Pass the JSON written by `llmopt eval --throughput --json`.",
        ) from None
    from llmopt.results import newer_eval_schema

    if isinstance(data, dict) and newer_eval_schema(data.get("schema")):
        raise InputError(
            f"report {p} is an evaluation of schema {data.get('schema')}, written by a newer llmopt.",
            "Upgrade llmopt (pip install -U llmopt) to read it.",
        )
    found = _decode_block(data)
    if found is None:
        return None, f"{p.name} has no throughput section with decode results"
    block, device, where = found
    tps = _tokens_per_s(block.get(str(batch)))
    if tps is None:
        measured = sorted(
            int(b) for b, entry in block.items() if str(b).isascii() and str(b).isdigit() and _tokens_per_s(entry)
        )
        return (
            None,
            f"{p.name} ({where}) has decode throughput at batch {measured or 'none'}, not at batch {batch}",
        )
    return MeasuredDecode(tokens_per_s=tps, batch=batch, device=device, report=str(p)), None


# --------------------------------------------------------------------------------------------
# The plan
# --------------------------------------------------------------------------------------------


class KVCache(BaseModel):
    model_config = ConfigDict(extra="forbid")
    dtype: str
    bytes_per_token: int = Field(description="K+V of one token over every layer (full attention).")
    batch: int
    context: int
    bytes: int = Field(description="for batch x context; sliding-window layers capped at their window.")
    sliding_window_layers: int


class TensorParallelFit(BaseModel):
    model_config = ConfigDict(extra="forbid")
    tp: int
    valid: bool = Field(description="attention and KV heads split evenly (vLLM's rule).")
    weight_bytes_per_gpu: int
    kv_bytes_per_sequence_per_gpu: int
    max_batch: int = Field(description="sequences of `context` tokens whose KV cache fits beside the weights.")
    fits: bool = Field(description="valid, and max_batch >= the batch asked for.")


class DecodeCost(BaseModel):
    model_config = ConfigDict(extra="forbid")
    source: Literal["measured", "bandwidth-ceiling"]
    source_detail: str
    gpus: int
    batch: int
    tokens_per_s: float
    hourly_usd: float | None
    usd_per_million_tokens: float | None


class Estimate(BaseModel):
    """Everything `llmopt estimate` prints, for one model, GPU, context and batch."""

    model_config = ConfigDict(extra="forbid")
    source: str
    architecture: Architecture
    parameters: ParameterCount
    weights: list[WeightMemory]
    plan_format: str
    plan_weight_bytes: int
    kv_cache: KVCache
    gpu: GPUSpec
    utilization: float
    tensor_parallel: list[TensorParallelFit]
    min_gpus: int | None = Field(description="smallest tensor-parallel size that fits, or None.")
    decode_ceiling_batch1_tokens_per_s: float | None = Field(
        description="bandwidth / (weight bytes + KV bytes of one full-context sequence), on min_gpus GPUs."
    )
    cost: DecodeCost | None
    notes: list[str]


def _kv_heads_per_gpu(arch: Architecture, tp: int) -> tuple[int, bool]:
    heads_ok = arch.num_attention_heads % tp == 0
    if arch.num_kv_heads % tp == 0:
        return arch.num_kv_heads // tp, heads_ok
    if tp % arch.num_kv_heads == 0:  # fewer KV heads than GPUs: each GPU keeps a copy of one
        return 1, heads_ok
    return math.ceil(arch.num_kv_heads / tp), False


def tensor_parallel_fits(
    arch: Architecture,
    *,
    weight_bytes_total: int,
    gpu: GPUSpec,
    context: int,
    batch: int,
    kv_dtype: str,
    utilization: float = DEFAULT_UTILIZATION,
    sizes: tuple[int, ...] = TP_SIZES,
) -> list[TensorParallelFit]:
    """For each tensor-parallel size: weights and KV per GPU, and the largest batch that fits.

    Weights are split evenly over the GPUs (norms, replicated in practice, are a rounding error);
    activations, the CUDA context and the serving engine's own buffers are what the utilization
    fraction leaves room for.
    """
    if not 0 < utilization <= 1:
        raise InputError(f"memory utilization {utilization} is not in (0, 1].", "Pass e.g. --utilization 0.9.")
    usable = utilization * gpu.memory_bytes
    kv_seq = kv_cache_bytes(arch, batch=1, context=context, kv_dtype=kv_dtype)
    out = []
    for tp in sizes:
        heads, valid = _kv_heads_per_gpu(arch, tp)
        w = math.ceil(weight_bytes_total / tp)
        kv = math.ceil(kv_seq * heads / arch.num_kv_heads)
        max_batch = max(0, math.floor((usable - w) / kv)) if usable > w else 0
        out.append(
            TensorParallelFit(
                tp=tp,
                valid=valid,
                weight_bytes_per_gpu=w,
                kv_bytes_per_sequence_per_gpu=kv,
                max_batch=max_batch,
                fits=valid and max_batch >= batch,
            )
        )
    return out


def decode_tokens_per_s_ceiling(
    *,
    weight_bytes_total: int,
    kv_bytes_per_sequence: int,
    batch: int,
    gpus: int,
    bandwidth_bytes_per_s: float,
) -> float:
    """Upper bound on decode speed: each step reads every weight once and each sequence's KV cache."""
    step_bytes = weight_bytes_total + batch * kv_bytes_per_sequence
    return batch * gpus * bandwidth_bytes_per_s / step_bytes


def estimate(
    model: str | Path,
    *,
    gpu: str = "H100-80GB",
    context: int = 4096,
    batch: int = 1,
    kv_dtype: str = "fp16",
    weights: str | None = None,
    group_size: int = 128,
    utilization: float = DEFAULT_UTILIZATION,
    gpu_hourly_cost: float | None = None,
    report: str | Path | None = None,
    gpu_catalog: str | Path | None = None,
) -> Estimate:
    """Parameters, memory, GPUs needed and cost per million tokens, from config.json alone.

    ``weights``: the format the plan assumes (default: the config's dtype, else bf16); the weight
    table lists the common formats whatever it is. ``report``: a JSON report with a ``throughput``
    section (see ``read_measured_decode``); its decode speed at ``batch`` prices the tokens, else
    the bandwidth ceiling does, and ``cost.source`` says which.
    """
    if gpu_hourly_cost is not None and gpu_hourly_cost < 0:
        raise InputError("--gpu-hourly-cost cannot be negative.", "Pass the price of one GPU-hour in USD.")
    kv_dtype_bytes(kv_dtype)  # fail on a bad dtype before any file is read
    catalog = load_gpu_catalog(gpu_catalog)
    gpu_spec = find_gpu(gpu, catalog)
    config, source = load_config(model)
    arch = architecture_from_config(config, source)
    params = parameter_count(arch)
    plan_format = weight_format(weights or _dtype_format(arch.torch_dtype)).name
    table = [weight_memory(arch, f, group_size=group_size) for f in TABLE_FORMATS]
    if plan_format not in TABLE_FORMATS:
        table.append(weight_memory(arch, plan_format, group_size=group_size))
    w_bytes = next(t.bytes for t in table if t.format == plan_format)
    kv_total = kv_cache_bytes(arch, batch=batch, context=context, kv_dtype=kv_dtype)
    kv_seq = kv_cache_bytes(arch, batch=1, context=context, kv_dtype=kv_dtype)
    fits = tensor_parallel_fits(
        arch,
        weight_bytes_total=w_bytes,
        gpu=gpu_spec,
        context=context,
        batch=batch,
        kv_dtype=kv_dtype,
        utilization=utilization,
    )
    min_gpus = next((f.tp for f in fits if f.fits), None)
    notes: list[str] = []
    windows = [w for w in arch.layer_windows if w]
    if windows and context > min(windows):
        notes.append(
            f"{len(windows)} of {arch.num_layers} layers use a sliding window of {min(windows)} tokens: "
            "their KV cache is capped there."
        )
    if context > int(config.get("max_position_embeddings") or context):
        notes.append(
            f"context {context} is longer than the model's max_position_embeddings "
            f"({config['max_position_embeddings']})."
        )
    ceiling1 = None
    cost = None
    if min_gpus is not None:
        ceiling1 = decode_tokens_per_s_ceiling(
            weight_bytes_total=w_bytes,
            kv_bytes_per_sequence=kv_seq,
            batch=1,
            gpus=min_gpus,
            bandwidth_bytes_per_s=gpu_spec.bandwidth_bytes_per_s,
        )
        measured, why_not = read_measured_decode(report, batch) if report else (None, None)
        if measured is not None:
            tps = measured.tokens_per_s
            detail = f"measured decode throughput at batch {batch} from {measured.report}" + (
                f" (on {measured.device})" if measured.device else ""
            )
            kind: Literal["measured", "bandwidth-ceiling"] = "measured"
            if measured.device and gpu_spec.name.split("-")[0].lower() not in measured.device.lower():
                notes.append(
                    f"the report was measured on {measured.device}, not on a {gpu_spec.name}: the cost "
                    "is that speed at this GPU's price."
                )
        else:
            tps = decode_tokens_per_s_ceiling(
                weight_bytes_total=w_bytes,
                kv_bytes_per_sequence=kv_seq,
                batch=batch,
                gpus=min_gpus,
                bandwidth_bytes_per_s=gpu_spec.bandwidth_bytes_per_s,
            )
            detail = (
                f"memory-bandwidth ceiling at batch {batch} on {min_gpus} x {gpu_spec.name} "
                "(real serving reaches a fraction of it)"
            )
            if why_not:
                detail += f"; not measured because {why_not}"
            kind = "bandwidth-ceiling"
        usd = None
        if gpu_hourly_cost is not None:
            usd = gpu_hourly_cost * min_gpus / (tps * 3600) * 1e6
        cost = DecodeCost(
            source=kind,
            source_detail=detail,
            gpus=min_gpus,
            batch=batch,
            tokens_per_s=tps,
            hourly_usd=gpu_hourly_cost,
            usd_per_million_tokens=usd,
        )
    else:
        notes.append(
            f"{plan_format} weights plus the KV cache of {batch} x {context} tokens do not fit on "
            f"8 x {gpu_spec.name} at {utilization:.0%} memory: try a smaller format (--weights int4), "
            "--kv-dtype fp8, a shorter --context or a smaller --batch."
        )
    return Estimate(
        source=source,
        architecture=arch,
        parameters=params,
        weights=table,
        plan_format=plan_format,
        plan_weight_bytes=w_bytes,
        kv_cache=KVCache(
            dtype=kv_dtype,
            bytes_per_token=kv_bytes_per_token(arch, kv_dtype),
            batch=batch,
            context=context,
            bytes=kv_total,
            sliding_window_layers=len(windows),
        ),
        gpu=gpu_spec,
        utilization=utilization,
        tensor_parallel=fits,
        min_gpus=min_gpus,
        decode_ceiling_batch1_tokens_per_s=ceiling1,
        cost=cost,
        notes=notes,
    )


def _dtype_format(torch_dtype: str | None) -> str:
    return {"float32": "fp32", "float16": "fp16", "bfloat16": "bf16"}.get(str(torch_dtype), "bf16")
