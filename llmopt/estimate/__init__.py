"""Plan before you download: parameters, weight and KV-cache memory, GPU count and cost from config.json.

Arithmetic on a model's ``config.json`` only (no weights read, no torch imported), in four rooms:
architecture.py (the config, the model's tensors, parameter count), formats.py (bytes per storage format
and of the KV cache), gpus.py (the GPU catalog) and plan.py (``estimate``: what fits where, how fast).
The names below are the ones the CLI, the pipeline and the tests use.
"""

from llmopt.estimate.architecture import (
    SUPPORTED_MODEL_TYPES,
    Architecture,
    ParameterCount,
    TensorGroup,
    architecture_from_config,
    load_config,
    parameter_count,
    tensors,
)
from llmopt.estimate.formats import (
    _GGUF_BPW,
    KV_DTYPE_BYTES,
    TABLE_FORMATS,
    WeightFormat,
    WeightMemory,
    kv_bytes_per_token,
    kv_cache_bytes,
    weight_bytes,
    weight_memory,
)
from llmopt.estimate.gpus import GPU_CATALOG_ENV, GPUSpec, find_gpu, load_gpu_catalog
from llmopt.estimate.plan import (
    Estimate,
    decode_tokens_per_s_ceiling,
    estimate,
    read_measured_decode,
    tensor_parallel_fits,
)

__all__ = [
    "GPU_CATALOG_ENV",
    "KV_DTYPE_BYTES",
    "SUPPORTED_MODEL_TYPES",
    "TABLE_FORMATS",
    "_GGUF_BPW",
    "Architecture",
    "Estimate",
    "GPUSpec",
    "ParameterCount",
    "TensorGroup",
    "WeightFormat",
    "WeightMemory",
    "architecture_from_config",
    "decode_tokens_per_s_ceiling",
    "estimate",
    "find_gpu",
    "kv_bytes_per_token",
    "kv_cache_bytes",
    "load_config",
    "load_gpu_catalog",
    "parameter_count",
    "read_measured_decode",
    "tensor_parallel_fits",
    "tensors",
    "weight_bytes",
    "weight_memory",
]
