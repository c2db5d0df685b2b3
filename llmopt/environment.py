"""What a result was produced with: Python, packages, device."""

from __future__ import annotations

import importlib.metadata
import platform
import sys
from typing import Any

TRACKED_PACKAGES = (
    "llmopt", "torch", "transformers", "accelerate", "safetensors", "tokenizers", "gptqmodel", "optimum",
    "bitsandbytes", "gguf", "llama_cpp_python", "huggingface_hub",
)  # fmt: skip


def package_versions(names: tuple[str, ...] = TRACKED_PACKAGES) -> dict[str, str]:
    found = {}
    for name in names:
        try:
            found[name] = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            continue
    return found


def resolve_device(device: str) -> str:
    """'auto' becomes 'cuda:0' where a CUDA GPU is visible, else 'cpu'."""
    if device != "auto":
        if device.startswith("cuda"):
            import torch

            if not torch.cuda.is_available():
                from llmopt.errors import BackendUnavailableError

                raise BackendUnavailableError(
                    f"device '{device}' was asked for, but no CUDA GPU is visible.",
                    "Use --device cpu, or run on a machine with a GPU.",
                )
            return device if ":" in device else "cuda:0"
        return device
    import torch

    return "cuda:0" if torch.cuda.is_available() else "cpu"


def device_name(device: str) -> str:
    if device.startswith("cuda"):
        import torch

        return str(torch.cuda.get_device_name(torch.device(device)))
    return f"cpu ({platform.processor() or platform.machine()})"


def environment(device: str) -> dict[str, Any]:
    return {
        "python": sys.version.split()[0],
        "platform": platform.platform(),
        "packages": package_versions(),
        "device": device_name(device),
    }
