"""Runner protocol: load a model once, then score token windows with it."""

from __future__ import annotations

from pathlib import Path
from typing import Protocol

from llmopt.errors import InputError


class Runner(Protocol):
    name: str
    device: str
    dtype: str
    load_seconds: float

    def nll(self, windows: list[list[int]], score_from: list[int]) -> list[list[float]]:
        """Per-token negative log-likelihood (nats) of ``w[t]`` given ``w[:t]``, for t >= score_from.

        All windows in one call have the same length.
        """
        ...

    def footprint_bytes(self) -> int:
        """Bytes the loaded weights and buffers take in memory."""
        ...

    def close(self) -> None: ...


def load_runner(
    kind: str,
    path: Path,
    device: str,
    *,
    kernel: str | None = None,
    for_speed: bool = False,
    trust_remote_code: bool = False,
) -> Runner:
    """Load ``path`` with runner ``kind`` on ``device``, any ``--device`` value (llmopt/placement.py).

    The transformers runners split a model over several GPUs when the device allows it; llama.cpp
    runs on the first device. ``for_speed``: the model will be timed, so it runs through its real kernels
    (scoring on CPU may swap GPTQModel's float16 kernels for dense float32 weights, runners/hf.py).
    ``trust_remote_code``: the folder's own Python code (auto_map) may run; otherwise such a folder is refused.
    """
    if kind in ("hf", "gptqmodel"):
        from llmopt.runners.hf import HFRunner

        return HFRunner(
            path, device, loader=kind, kernel=kernel, dense_on_cpu=not for_speed, trust_remote_code=trust_remote_code
        )
    if kind == "llamacpp":
        from llmopt.placement import resolve_target
        from llmopt.runners.llamacpp import LlamaCppRunner

        return LlamaCppRunner(path, resolve_target(device).primary)
    raise InputError(f"unknown runner '{kind}'.", "This artifact needs a newer llmopt; upgrade it.")
