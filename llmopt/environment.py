"""What a result was produced with: Python, packages, device."""

from __future__ import annotations

import importlib.metadata
import os
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


def cpu_count() -> int:
    """CPU cores this process may run on (its affinity mask, where the OS has one)."""
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except AttributeError:  # not on Linux
        return max(1, os.cpu_count() or 1)


def resolve_device(device: str) -> str:
    """The first device ``device`` resolves to: 'cpu' or 'cuda:N' (see llmopt/placement.py for the rest).

    'auto' becomes 'cuda:0' where a CUDA GPU is visible, else 'cpu'; 'cuda' and 'cuda:N,M' give their first
    GPU. A malformed value or a GPU that does not exist raises InputError; a GPU asked for where none is
    visible raises BackendUnavailableError.
    """
    from llmopt.placement import resolve_target

    return resolve_target(device).primary


def device_name(device: str) -> str:
    """Name of a device; for a split over GPUs (``cuda:0,1``) the names of every GPU, counted."""
    if device.startswith("cuda"):
        import torch

        ids = device.split(":", 1)[1].split(",") if ":" in device else ["0"]
        names = [str(torch.cuda.get_device_name(torch.device(f"cuda:{i.strip()}"))) for i in ids]
        if len(names) == 1:
            return names[0]
        if len(set(names)) == 1:
            return f"{len(names)} x {names[0]}"
        return " + ".join(names)
    return f"cpu ({platform.processor() or platform.machine()})"


def environment(device: str) -> dict[str, Any]:
    return {
        "python": sys.version.split()[0],
        "platform": platform.platform(),
        "packages": package_versions(),
        "device": device_name(device),
    }
