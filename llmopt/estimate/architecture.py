"""A model's architecture from its config.json (local, or fetched from the Hub alone), its tensors
and parameter count: exact arithmetic, no weights read."""

from __future__ import annotations

import difflib
import json
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field

from llmopt.errors import BackendUnavailableError, ModelError
from llmopt.source import HUB_ID

SUPPORTED_MODEL_TYPES = ("llama", "mistral", "qwen2", "qwen3", "gemma", "gemma2", "phi3")

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
        if HUB_ID.match(spec) and not spec.startswith((".", "/", "~")):
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
