"""Runner protocol and registry: load a model once, then score token windows (and time decoding) with it.

A runner is a ``BaseRunner`` subclass named by a ``"module:attr"`` string, found like the backends
(backends/base.py, llmopt/plugins.py): built-in ones in ``BUILTIN``, other packages' through the entry-point
group ``llmopt.runners``. A backend names the runner that loads its output (``Backend.runner``), which the
artifact's manifest records; a plugin backend can so bring its own runner. Nothing heavy is imported until a
runner is loaded.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol

from llmopt.errors import BackendUnavailableError, InputError
from llmopt.plugins import load_target, registered

if TYPE_CHECKING:
    from llmopt.placement import Placement

ENTRY_POINT_GROUP = "llmopt.runners"

BUILTIN: dict[str, str] = {
    "hf": "llmopt.runners.hf:HFRunner",
    "gptqmodel": "llmopt.runners.hf:GPTQModelRunner",
    "llamacpp": "llmopt.runners.llamacpp:LlamaCppRunner",
}


@dataclass(frozen=True)
class LoadRequest:
    """What a runner is asked to load, and for what (a dataclass, so new fields do not break plugins)."""

    path: Path
    # any ``--device`` value (llmopt/placement.py); a runner that uses one device takes the first
    device: str
    kernel: str | None = None
    # the model will be timed: run it through its real kernels (scoring on CPU may use dense float32 weights)
    for_speed: bool = False
    # the folder's own Python code (auto_map) may run; otherwise such a folder is refused
    trust_remote_code: bool = False


class Runner(Protocol):
    """What callers use of a loaded model. The last four are optional facts: None, or for ``bench`` an error
    saying the runner cannot time decoding, where a runner has none (``BaseRunner`` gives those defaults)."""

    name: str
    device: str
    dtype: str
    load_seconds: float
    kernel: str | None  # the kernel that runs the quantized layers, where the runner picks one
    compute: dict[str, str] | None  # the arithmetic, where ``dtype`` does not say it all (bitsandbytes)
    placement: Placement | None  # where the weights are, for runners that place them on devices

    def nll(self, windows: list[list[int]], score_from: list[int]) -> list[list[float]]:
        """Per-token negative log-likelihood (nats) of ``w[t]`` given ``w[:t]``, for t >= score_from.

        All windows in one call have the same length.
        """
        ...

    def footprint_bytes(self) -> int:
        """Bytes the loaded weights and buffers take in memory."""
        ...

    def bench(self, settings: Any, reporter: Any = None) -> dict[str, Any]:
        """``llmopt bench``'s measurement (evaluate/throughput.py's result shape)."""
        ...

    @property
    def n_vocab(self) -> int:
        """Width of the model's logits (the KL divergence compares two models over one vocabulary)."""
        ...

    def kld_reference(self, windows: list[list[int]], score_from: list[int], k: int) -> list[tuple[Any, ...]]:
        """FP16's side of the KL divergence per window: top-k ids, their log-probs, the rest's log-mass, the NLLs
        of the scored tokens (evaluate/kld.py)."""
        ...

    def kld_compare(
        self, windows: list[list[int]], score_from: list[int], refs: list[tuple[Any, ...]]
    ) -> list[tuple[Any, Any, Any]]:
        """Per-token (KL, top-1 agreement, NLL) of each window's scored tokens against FP16's reference rows."""
        ...

    def causal_lm(self) -> Any:
        """The loaded transformers model lm-eval tasks run on, or None."""
        ...

    def close(self) -> None: ...


class BaseRunner(ABC):
    """Base class of every runner, built-in or plugin: ``open`` loads, the optional facts default to none."""

    name: str
    device: str
    dtype: str
    load_seconds: float = 0.0
    kernel: str | None = None
    compute: dict[str, str] | None = None
    placement: Placement | None = None
    # whether ``causal_lm`` gives a model lm-eval can run (``--tasks``), known before loading
    runs_tasks: bool = False

    @classmethod
    @abstractmethod
    def open(cls, request: LoadRequest) -> BaseRunner:
        """Load ``request.path``; errors are llmopt errors (exit 4 for a missing library or a crashed engine)."""

    @abstractmethod
    def nll(self, windows: list[list[int]], score_from: list[int]) -> list[list[float]]: ...

    @abstractmethod
    def footprint_bytes(self) -> int: ...

    def bench(self, settings: Any, reporter: Any = None) -> dict[str, Any]:
        raise BackendUnavailableError(
            f"the '{self.name}' runner cannot measure throughput.",
            "Measure this format with its own engine.",
        )

    @property
    def n_vocab(self) -> int:
        raise self._no_kld()

    def kld_reference(self, windows: list[list[int]], score_from: list[int], k: int) -> list[tuple[Any, ...]]:
        raise self._no_kld()

    def kld_compare(
        self, windows: list[list[int]], score_from: list[int], refs: list[tuple[Any, ...]]
    ) -> list[tuple[Any, Any, Any]]:
        raise self._no_kld()

    def causal_lm(self) -> Any:
        """The loaded transformers model (an ``nn.Module``) that lm-eval tasks run on; None where the runner holds
        none (GGUF through llama.cpp): docs/tasks.md."""
        return None

    def _no_kld(self) -> BackendUnavailableError:
        return BackendUnavailableError(
            f"the '{self.name}' runner cannot compute the KL divergence against FP16.",
            "Pass --no-kld (recipe evaluation.kld: false) to score perplexity alone.",
        )

    @abstractmethod
    def close(self) -> None: ...


def _registry() -> dict[str, tuple[str, str]]:
    return registered(ENTRY_POINT_GROUP, BUILTIN)


def available_runners() -> dict[str, str]:
    """Every registered runner name -> where it comes from ("builtin" or the distribution); nothing is imported."""
    return {name: origin for name, (_, origin) in sorted(_registry().items())}


def runner_class(kind: str) -> type[BaseRunner]:
    """The runner registered as ``kind``; unknown: exit 2 (the artifact is newer than this llmopt, or its plugin is
    not installed); failing to import: exit 4."""
    reg = _registry()
    if kind not in reg:
        raise InputError(f"unknown runner '{kind}'.", "This artifact needs a newer llmopt; upgrade it.")
    target, origin = reg[kind]
    try:
        cls: type[BaseRunner] = load_target(target, BaseRunner)
    except Exception as exc:  # a plugin's own bug: reported, never a traceback
        raise BackendUnavailableError(
            f"runner '{kind}' ({target}, from {origin}) failed to load: {type(exc).__name__}: {exc}",
            "Reinstall or fix the package that provides it.",
        ) from None
    return cls


def load_runner(
    kind: str,
    path: Path,
    device: str,
    *,
    kernel: str | None = None,
    for_speed: bool = False,
    trust_remote_code: bool = False,
) -> Runner:
    """Load ``path`` with the runner registered as ``kind`` on ``device``, any ``--device`` value.

    The transformers runners split a model over several GPUs when the device allows it; llama.cpp
    runs on the first device. ``for_speed``: the model will be timed, so it runs through its real kernels
    (scoring on CPU may swap GPTQModel's float16 kernels for dense float32 weights, runners/hf.py).
    ``trust_remote_code``: the folder's own Python code (auto_map) may run; otherwise such a folder is refused.
    """
    request = LoadRequest(
        path=Path(path), device=device, kernel=kernel, for_speed=for_speed, trust_remote_code=trust_remote_code
    )
    return runner_class(kind).open(request)
