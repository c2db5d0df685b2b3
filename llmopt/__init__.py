"""llmopt: quantize causal LMs, measure them against FP16, gate, publish.

Importing this package is cheap: torch and the quantization libraries are imported only inside the
functions that need them.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

__version__ = "0.1.0"

__all__ = ["Artifact", "LlmoptError", "__version__", "evaluate", "quantize"]

if TYPE_CHECKING:
    from llmopt.api import evaluate, quantize
    from llmopt.artifact import Artifact
    from llmopt.errors import LlmoptError


def __getattr__(name: str) -> Any:
    if name in ("quantize", "evaluate"):
        from llmopt import api

        return getattr(api, name)
    if name == "Artifact":
        from llmopt.artifact import Artifact

        return Artifact
    if name == "LlmoptError":
        from llmopt.errors import LlmoptError

        return LlmoptError
    raise AttributeError(f"module 'llmopt' has no attribute {name!r}")
