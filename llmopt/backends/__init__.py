"""Quantization backends: one module per method, found through a lazy registry (see ``base``)."""

from llmopt.backends.base import (
    Backend,
    BackendInfo,
    QuantizeInputs,
    Requirement,
    available_backends,
    describe_backend,
    format_card,
    get_backend,
)
from llmopt.backends.format_card import FormatCard, LoadSnippet, transformers_snippet, vllm_snippet
from llmopt.backends.options import OptionInfo

__all__ = [
    "Backend",
    "BackendInfo",
    "FormatCard",
    "LoadSnippet",
    "OptionInfo",
    "QuantizeInputs",
    "Requirement",
    "available_backends",
    "describe_backend",
    "format_card",
    "get_backend",
    "transformers_snippet",
    "vllm_snippet",
]
