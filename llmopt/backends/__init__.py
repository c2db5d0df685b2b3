"""Quantization backends: one module per method, found through a lazy registry (see ``base``)."""

from llmopt.backends.base import (
    Backend,
    BackendInfo,
    QuantizeInputs,
    Requirement,
    available_backends,
    get_backend,
)

__all__ = ["Backend", "BackendInfo", "QuantizeInputs", "Requirement", "available_backends", "get_backend"]
