"""Plan before you download: parameters, weight and KV-cache memory, GPU count and cost from config.json.

Everything here is arithmetic on a model's ``config.json``: no weights are read and nothing heavy is
imported (no torch). The numbers are exact where the architecture makes them exact (parameter count,
tensor bytes at a given format, KV-cache bytes), and labelled as ceilings or approximations where
they are not (decode speed from bandwidth, GGUF k-quant mixes).

The model families are written out tensor by tensor (``tensors()``), the way transformers builds
them, so that quantized sizes can be computed per tensor (group scales depend on each tensor's
shape) and a test can compare the list with a real checkpoint.
"""

from __future__ import annotations

import difflib
import json
import math
import os
import re
from dataclasses import dataclass
from importlib import resources
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError

from llmopt.errors import BackendUnavailableError, InputError, ModelError

SUPPORTED_MODEL_TYPES = ("llama", "mistral", "qwen2", "qwen3", "gemma", "gemma2", "phi3")
TP_SIZES = (1, 2, 4, 8)
DEFAULT_UTILIZATION = 0.9
GPU_CATALOG_ENV = "LLMOPT_GPU_CATALOG"

KV_DTYPE_BYTES: dict[str, int] = {"fp32": 4, "fp16": 2, "bf16": 2, "fp8": 1}

_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")

Role = Literal["embedding", "lm_head", "linear", "norm", "bias"]


# --------------------------------------------------------------------------------------------
# Architecture
# --------------------------------------------------------------------------------------------


class Architecture(BaseModel):
    """The shape of a decoder-only model, read from its config.json."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    model_type: str
    architecture: str | None = None
    vocab_size: int
    hidden_size: int
    num_layers: int
    num_attention_heads: int
    num_kv_heads: int
    head_dim: int
    intermediate_size: int
    tie_word_embeddings: bool
    qkv_bias: bool = Field(description="q/k/v projections carry a bias (Qwen2: always).")
    o_bias: bool
    mlp_bias: bool
    qk_norm: bool = Field(description="RMSNorm over head_dim on queries and keys (Qwen3).")
    norms_per_layer: int = Field(description="hidden-size norms per decoder layer (Gemma2: 4).")
    fused_qkv: bool = Field(description="one qkv_proj / gate_up_proj matrix (Phi3).")
    layer_windows: list[int | None] = Field(
        description="per layer: the sliding-window length, or None for full attention."
    )
    torch_dtype: str | None = None


def _int(config: dict[str, Any], key: str, source: str) -> int:
    value = config.get(key)
    if not isinstance(value, int) or isinstance(value, bool) or value <= 0:
        raise ModelError(
            f"{source}: config.json has no positive integer '{key}' (found {value!r}).",
            "Check that the file is a model's config.json and is complete.",
        )
    return value


def _layer_windows(config: dict[str, Any], model_type: str, num_layers: int) -> list[int | None]:
    """Which layers attend over a sliding window, following transformers' own rules per family."""
    window = config.get("sliding_window")
    types = config.get("layer_types")
    if model_type in ("qwen2", "qwen3"):
        # Qwen's config.json always carries a sliding_window; it is used only with use_sliding_window.
        if not config.get("use_sliding_window", False):
            window = None
        if types is None:
            first = config.get("max_window_layers", num_layers)
            types = ["sliding_attention" if window and i >= first else "full_attention" for i in range(num_layers)]
    if types is None and model_type == "gemma2":
        window = window or 4096
        types = ["sliding_attention" if (i + 1) % 2 else "full_attention" for i in range(num_layers)]
    if types is None:
        types = ["sliding_attention" if window else "full_attention"] * num_layers
    if len(types) != num_layers:
        raise ModelError(
            f"config.json lists {len(types)} layer_types for {num_layers} layers.",
            "Fix layer_types or num_hidden_layers in config.json.",
        )
    return [int(window) if t == "sliding_attention" and window else None for t in types]


def architecture_from_config(config: dict[str, Any], source: str = "config.json") -> Architecture:
    """Read the shape of a supported model family from a config.json dictionary."""
    model_type = config.get("model_type")
    if model_type not in SUPPORTED_MODEL_TYPES:
        close = difflib.get_close_matches(str(model_type), SUPPORTED_MODEL_TYPES, n=3)
        raise ModelError(
            f"{source}: model_type {model_type!r} is not one llmopt can estimate"
            + (f" (did you mean {', '.join(close)}?)." if close else "."),
            f"Supported: {', '.join(SUPPORTED_MODEL_TYPES)}. For another family, count parameters from the "
            "weights (safetensors headers) instead, or open an issue with its config.json.",
        )
    hidden = _int(config, "hidden_size", source)
    heads = _int(config, "num_attention_heads", source)
    layers = _int(config, "num_hidden_layers", source)
    kv_heads = config.get("num_key_value_heads") or heads
    head_dim = config.get("head_dim") or hidden // heads
    archs = config.get("architectures") or []
    attention_bias = bool(config.get("attention_bias", False))
    tied_default = model_type in ("gemma", "gemma2")
    return Architecture(
        model_type=model_type,
        architecture=archs[0] if archs else None,
        vocab_size=_int(config, "vocab_size", source),
        hidden_size=hidden,
        num_layers=layers,
        num_attention_heads=heads,
        num_kv_heads=int(kv_heads),
        head_dim=int(head_dim),
        intermediate_size=_int(config, "intermediate_size", source),
        tie_word_embeddings=bool(config.get("tie_word_embeddings", tied_default)),
        # Qwen2 hard-codes bias=True on q/k/v and none on o; Llama/Qwen3/Gemma read attention_bias for all
        # four; Mistral and Phi3 have none.
        qkv_bias=True
        if model_type == "qwen2"
        else attention_bias and model_type in ("llama", "qwen3", "gemma", "gemma2"),
        o_bias=attention_bias and model_type in ("llama", "qwen3", "gemma", "gemma2"),
        mlp_bias=bool(config.get("mlp_bias", False)) and model_type == "llama",
        qk_norm=model_type == "qwen3",
        norms_per_layer=4 if model_type == "gemma2" else 2,
        fused_qkv=model_type == "phi3",
        layer_windows=_layer_windows(config, model_type, layers),
        torch_dtype=config.get("torch_dtype") or config.get("dtype"),
    )


# --------------------------------------------------------------------------------------------
# Tensors and parameter count
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class TensorGroup:
    """``count`` tensors of one shape (one per layer, or 1), as transformers names them."""

    name: str
    shape: tuple[int, ...]
    count: int
    role: Role
    part: Literal["embedding", "attention", "mlp", "norm", "lm_head"]

    @property
    def numel(self) -> int:
        return math.prod(self.shape) * self.count


def tensors(arch: Architecture) -> list[TensorGroup]:
    """Every weight tensor of the model (linear weights as [out_features, in_features])."""
    h, n_l = arch.hidden_size, arch.num_layers
    q_out = arch.num_attention_heads * arch.head_dim
    kv_out = arch.num_kv_heads * arch.head_dim
    inter = arch.intermediate_size
    layer = "model.layers.*."
    out: list[TensorGroup] = [
        TensorGroup("model.embed_tokens.weight", (arch.vocab_size, h), 1, "embedding", "embedding")
    ]
    if arch.fused_qkv:
        out.append(
            TensorGroup(layer + "self_attn.qkv_proj.weight", (q_out + 2 * kv_out, h), n_l, "linear", "attention")
        )
    else:
        for name, rows in (("q_proj", q_out), ("k_proj", kv_out), ("v_proj", kv_out)):
            out.append(TensorGroup(f"{layer}self_attn.{name}.weight", (rows, h), n_l, "linear", "attention"))
            if arch.qkv_bias:
                out.append(TensorGroup(f"{layer}self_attn.{name}.bias", (rows,), n_l, "bias", "attention"))
    out.append(TensorGroup(layer + "self_attn.o_proj.weight", (h, q_out), n_l, "linear", "attention"))
    if arch.o_bias:
        out.append(TensorGroup(layer + "self_attn.o_proj.bias", (h,), n_l, "bias", "attention"))
    if arch.qk_norm:
        out.append(TensorGroup(layer + "self_attn.q_norm.weight", (arch.head_dim,), n_l, "norm", "attention"))
        out.append(TensorGroup(layer + "self_attn.k_norm.weight", (arch.head_dim,), n_l, "norm", "attention"))
    if arch.fused_qkv:
        out.append(TensorGroup(layer + "mlp.gate_up_proj.weight", (2 * inter, h), n_l, "linear", "mlp"))
    else:
        out.append(TensorGroup(layer + "mlp.gate_proj.weight", (inter, h), n_l, "linear", "mlp"))
        out.append(TensorGroup(layer + "mlp.up_proj.weight", (inter, h), n_l, "linear", "mlp"))
        if arch.mlp_bias:
            out.append(TensorGroup(layer + "mlp.gate_proj.bias", (inter,), n_l, "bias", "mlp"))
            out.append(TensorGroup(layer + "mlp.up_proj.bias", (inter,), n_l, "bias", "mlp"))
    out.append(TensorGroup(layer + "mlp.down_proj.weight", (h, inter), n_l, "linear", "mlp"))
    if arch.mlp_bias:
        out.append(TensorGroup(layer + "mlp.down_proj.bias", (h,), n_l, "bias", "mlp"))
    norm_names = ["input_layernorm", "post_attention_layernorm"]
    if arch.norms_per_layer == 4:
        norm_names += ["pre_feedforward_layernorm", "post_feedforward_layernorm"]
    out.extend(TensorGroup(f"{layer}{n}.weight", (h,), n_l, "norm", "norm") for n in norm_names)
    out.append(TensorGroup("model.norm.weight", (h,), 1, "norm", "norm"))
    if not arch.tie_word_embeddings:
        out.append(TensorGroup("lm_head.weight", (arch.vocab_size, h), 1, "lm_head", "lm_head"))
    return out


class ParameterCount(BaseModel):
    model_config = ConfigDict(extra="forbid")
    total: int
    embedding: int
    lm_head: int = Field(description="0 when the output layer shares the embedding matrix.")
    attention: int
    mlp: int
    norms: int
    per_layer: int
    tied: bool


def parameter_count(arch: Architecture) -> ParameterCount:
    """Exact number of parameters (each tied matrix counted once, as safetensors stores it)."""
    groups = tensors(arch)
    by_part = {
        p: sum(g.numel for g in groups if g.part == p) for p in ("embedding", "attention", "mlp", "norm", "lm_head")
    }
    per_layer = sum(
        math.prod(g.shape) for g in groups if g.count == arch.num_layers and g.name.startswith("model.layers.")
    )
    return ParameterCount(
        total=sum(by_part.values()),
        embedding=by_part["embedding"],
        lm_head=by_part["lm_head"],
        attention=by_part["attention"],
        mlp=by_part["mlp"],
        norms=by_part["norm"],
        per_layer=per_layer,
        tied=arch.tie_word_embeddings,
    )


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


def _format(name: str) -> WeightFormat:
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
    spec = _format(fmt)
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
    spec = _format(fmt)
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


def _kv_dtype_bytes(kv_dtype: str) -> int:
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
    return 2 * arch.num_layers * arch.num_kv_heads * arch.head_dim * _kv_dtype_bytes(kv_dtype)


def kv_cache_bytes(arch: Architecture, *, batch: int, context: int, kv_dtype: str = "fp16") -> int:
    """KV cache of ``batch`` x ``context`` tokens; sliding-window layers keep at most their window."""
    if batch < 1 or context < 1:
        raise InputError("batch and context must be at least 1.", "Pass --batch N and --context N with N >= 1.")
    per_layer_token = 2 * arch.num_kv_heads * arch.head_dim * _kv_dtype_bytes(kv_dtype)
    tokens = sum(min(context, w) if w else context for w in arch.layer_windows)
    return batch * tokens * per_layer_token


# --------------------------------------------------------------------------------------------
# GPU catalog
# --------------------------------------------------------------------------------------------


class GPUSpec(BaseModel):
    model_config = ConfigDict(extra="forbid")
    name: str
    aliases: list[str] = Field(default_factory=list)
    memory_bytes: int = Field(gt=0)
    bandwidth_bytes_per_s: int = Field(gt=0)
    source: str | None = None


class _CatalogFile(BaseModel):
    model_config = ConfigDict(extra="forbid")
    gpus: list[GPUSpec]


def _read_catalog(text: str, origin: str) -> list[GPUSpec]:
    import yaml

    try:
        data = yaml.safe_load(text)
        return _CatalogFile.model_validate(data).gpus
    except yaml.YAMLError as exc:
        raise InputError(f"GPU catalog {origin} is not valid YAML ({exc}).", "Fix the file's syntax.") from None
    except ValidationError as exc:
        first = exc.errors()[0]
        where = ".".join(str(p) for p in first["loc"])
        raise InputError(
            f"GPU catalog {origin}: {where}: {first['msg']}.",
            "Each entry needs name, memory_bytes and bandwidth_bytes_per_s (integers); aliases and "
            "source are optional. See llmopt/data/gpus.yaml.",
        ) from None


def load_gpu_catalog(extra: str | Path | None = None) -> dict[str, GPUSpec]:
    """The built-in catalog, then ``$LLMOPT_GPU_CATALOG``, then ``extra``; later entries win."""
    builtin = resources.files("llmopt").joinpath("data/gpus.yaml").read_text()
    specs = _read_catalog(builtin, "llmopt/data/gpus.yaml")
    for path in (os.environ.get(GPU_CATALOG_ENV), extra):
        if not path:
            continue
        p = Path(path).expanduser()
        if not p.is_file():
            raise InputError(f"GPU catalog {p} does not exist.", f"Fix --gpu-catalog or ${GPU_CATALOG_ENV}.")
        specs.extend(_read_catalog(p.read_text(), str(p)))
    return {spec.name: spec for spec in specs}


def _norm(name: str) -> str:
    return re.sub(r"[\s_]+", "-", name.strip().lower())


def find_gpu(name: str, catalog: dict[str, GPUSpec]) -> GPUSpec:
    """Look a GPU up by name or alias (case-insensitive); a miss names the close matches."""
    wanted = _norm(name)
    for spec in catalog.values():
        if wanted == _norm(spec.name) or wanted in {_norm(a) for a in spec.aliases}:
            return spec
    names = {_norm(s.name): s.name for s in catalog.values()}
    for s in catalog.values():
        names.update({_norm(a): s.name for a in s.aliases})
    close = list(dict.fromkeys(names[c] for c in difflib.get_close_matches(wanted, names, n=3, cutoff=0.5)))
    raise InputError(
        f"unknown GPU '{name}'" + (f" (did you mean {', '.join(close)}?)." if close else "."),
        f"Known: {', '.join(catalog)}. Add one with --gpu-catalog FILE (YAML, like llmopt/data/gpus.yaml).",
    )


# --------------------------------------------------------------------------------------------
# Reading a model's config
# --------------------------------------------------------------------------------------------


def load_config(model: str | Path) -> tuple[dict[str, Any], str]:
    """config.json of a local folder, a config.json path or a Hub id, and where it was read."""
    spec = str(model)
    path = Path(spec).expanduser()
    if path.is_dir():
        path = path / "config.json"
        if not path.is_file():
            raise ModelError(
                f"{spec} has no config.json.",
                "Give a Hugging Face model folder, the path of a config.json, or a Hub id like org/name.",
            )
    elif not path.exists():
        if _HUB_ID.match(spec) and not spec.startswith((".", "/", "~")):
            path = _hub_config(spec)
        else:
            raise ModelError(
                f"{spec} does not exist.",
                "Give a Hugging Face model folder, the path of a config.json, or a Hub id like org/name.",
            )
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError) as exc:
        raise ModelError(f"{path} is not a readable JSON file ({exc}).", "Fix or re-download config.json.") from None
    if not isinstance(data, dict):
        raise ModelError(f"{path} does not hold a JSON object.", "Give the model's config.json.")
    return data, str(path)


def _download_config(repo_id: str) -> str:
    """The network seam: fetch a Hub repo's config.json into the local HF cache (tests replace this)."""
    try:
        from huggingface_hub import hf_hub_download
    except ImportError:
        raise BackendUnavailableError(
            f"'{repo_id}' looks like a Hub id, and reading it needs huggingface_hub.",
            "pip install 'llmopt[hub]', or download config.json and give its path.",
        ) from None
    return str(hf_hub_download(repo_id, "config.json"))


def _hub_config(repo_id: str) -> Path:
    try:
        return Path(_download_config(repo_id))
    except BackendUnavailableError:
        raise
    except Exception as exc:
        first = (str(exc).strip().splitlines() or [type(exc).__name__])[0]
        raise ModelError(
            f"could not fetch config.json of '{repo_id}' from the Hugging Face Hub: {type(exc).__name__}: {first}",
            "Check the id, the network (HF_HUB_OFFLINE) and HF_TOKEN for gated models; or download "
            "config.json and pass its path.",
        ) from None


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
    found = _decode_block(data)
    if found is None:
        return None, f"{p.name} has no throughput section with decode results"
    block, device, where = found
    tps = _tokens_per_s(block.get(str(batch)))
    if tps is None:
        measured = sorted(int(b) for b, entry in block.items() if str(b).isdigit() and _tokens_per_s(entry))
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
    _kv_dtype_bytes(kv_dtype)  # fail on a bad dtype before any file is read
    catalog = load_gpu_catalog(gpu_catalog)
    gpu_spec = find_gpu(gpu, catalog)
    config, source = load_config(model)
    arch = architecture_from_config(config, source)
    params = parameter_count(arch)
    plan_format = _format(weights or _dtype_format(arch.torch_dtype)).name
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
