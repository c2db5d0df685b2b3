"""The decoder: one token at a time over a transformers ``StaticCache``, through a step captured as a
CUDA graph (after ``torch.compile`` where that works), or eagerly; the replay check that a captured graph
computes what the eager step does; the compiler's set-up and reset. engine.py measures with it.
"""

from __future__ import annotations

import contextlib
import inspect
import time
from collections.abc import Callable
from typing import Any

from llmopt.errors import BackendUnavailableError, InputError

MODE_NAMES = {"compile": "compile+cudagraph", "graph": "cudagraph", "eager": "eager-static"}


# ---------------------------------------------------------------------------------------------------
# Small helpers


def is_cuda(device: str) -> bool:
    return device.startswith("cuda")


def devices(device: str) -> list[str]:
    """``cuda:0,1`` (a model split over GPUs, llmopt/placement.py) -> ["cuda:0", "cuda:1"]; else [device]."""
    if is_cuda(device) and "," in device:
        return [f"cuda:{i.strip()}" for i in device.split(":", 1)[1].split(",")]
    return [device]


def sync(device: str) -> None:
    if is_cuda(device):
        import torch

        for dev in devices(device):
            torch.cuda.synchronize(dev)


def short_error(exc: BaseException) -> str:
    lines = str(exc).strip().splitlines()
    text = lines[0] if lines else ""
    return f"{type(exc).__name__}: {text[:300]}"


# ---------------------------------------------------------------------------------------------------
# The decode engine


def _forward_kwargs(model: Any) -> tuple[str, bool]:
    """Name of the cache argument (transformers renamed it) and whether ``logits_to_keep`` exists."""
    params = inspect.signature(model.forward).parameters
    cache_arg = "cache" if "cache" in params else "past_key_values"
    return cache_arg, "logits_to_keep" in params


def _set_position(cache: Any, position: int) -> None:
    """Rewind/advance a static cache to ``position`` in place (its tensors keep their addresses)."""
    for layer in cache.layers:
        length = getattr(layer, "cumulative_length", None)
        if length is None or not hasattr(length, "fill_"):
            raise BackendUnavailableError(
                "this transformers version's StaticCache keeps no position tensor, so decoding cannot be "
                "replayed in place.",
                "Use transformers >= 5.17 (pip install 'llmopt[core]').",
            )
        length.fill_(position)


class StaticDecoder:
    """Greedy decoding of a fixed batch over a transformers ``StaticCache``, one token per step."""

    def __init__(self, model: Any, device: str, batch: int, max_cache_len: int) -> None:
        from transformers import StaticCache

        self.model = model
        self.device = device
        self.batch = batch
        self.max_cache_len = max_cache_len
        self.cache = StaticCache(config=model.config, max_cache_len=max_cache_len)
        self._cache_arg, self._has_keep = _forward_kwargs(model)
        self.mode = "eager"
        self.verified: bool | None = None  # graph output checked against eager (None: not a graph)
        self._graph: Any = None
        self._ids: Any = None  # the graph's static input/output token buffer
        self._step_fn: Callable[[Any], Any] = self._step

    def _logits(self, ids: Any) -> Any:
        kwargs: dict[str, Any] = {self._cache_arg: self.cache, "use_cache": True}
        if self._has_keep:
            kwargs["logits_to_keep"] = 1
        return self.model(input_ids=ids, **kwargs).logits

    def _step_logits(self, ids: Any) -> tuple[Any, Any]:
        logits = self._logits(ids)[:, -1, :]
        return logits, logits.argmax(dim=-1, keepdim=True)

    def _step(self, ids: Any) -> Any:
        return self._step_logits(ids)[1]

    def prefill(self, ids: Any) -> Any:
        """Run the prompt through the model from position 0; returns the first generated token ids."""
        if self._initialized():
            _set_position(self.cache, 0)
        return self._step(ids)

    def _initialized(self) -> bool:
        return all(getattr(layer, "is_initialized", False) for layer in self.cache.layers)

    def prepare(self, mode: str, first: Any, position: int) -> None:
        """Set up decoding in ``mode`` (compile / graph / eager); raises if the mode cannot run here."""
        import torch

        self.mode = mode
        self._graph = None
        if mode == "eager":
            self._step_fn = self._step
            return
        fn: Callable[[Any], tuple[Any, Any]] = self._step_logits
        if mode == "compile":
            fn = torch.compile(self._step_logits, fullgraph=False)
        # What the step must compute, from plain eager kernels, to check the graph against.
        _set_position(self.cache, position)
        reference = self._step_logits(first)[0].float().clone()
        # The graph feeds itself: each replay reads the token buffer and writes the next token into it.
        ids = first.clone()
        stream = torch.cuda.Stream(device=self.device)
        stream.wait_stream(torch.cuda.current_stream(self.device))
        with torch.cuda.stream(stream):
            for _ in range(3):  # compiles (compile mode) and warms up allocations off the capture
                _set_position(self.cache, position)
                ids.copy_(fn(ids)[1])
        torch.cuda.current_stream(self.device).wait_stream(stream)
        torch.cuda.synchronize(self.device)
        graph = torch.cuda.CUDAGraph()
        _set_position(self.cache, position)
        with torch.cuda.graph(graph):
            logits, next_ids = fn(ids)
            ids.copy_(next_ids)
        # A kernel launched outside the capture stream, or an op the compiler dropped (an out-argument
        # its schema does not declare), leaves the graph fast and wrong: replay once and compare.
        _set_position(self.cache, position)
        ids.copy_(first)
        graph.replay()
        torch.cuda.synchronize(self.device)
        self.verified = check_replay(logits.float(), reference)
        self._graph, self._ids = graph, ids

    def run(self, first: Any, position: int, steps: int) -> list[float]:
        """Decode ``steps`` tokens after ``first`` from ``position``; per-step seconds."""
        import torch

        _set_position(self.cache, position)
        if self._graph is not None:
            self._ids.copy_(first)
            torch.cuda.synchronize(self.device)
            events = [torch.cuda.Event(enable_timing=True) for _ in range(steps + 1)]
            events[0].record()
            for i in range(steps):
                self._graph.replay()
                events[i + 1].record()
            torch.cuda.synchronize(self.device)
            return [events[i].elapsed_time(events[i + 1]) / 1e3 for i in range(steps)]
        ids = first
        # CUDA events time one device's stream; a model split over GPUs is timed on the host instead.
        if is_cuda(self.device) and len(devices(self.device)) == 1:
            events = [torch.cuda.Event(enable_timing=True) for _ in range(steps + 1)]
            torch.cuda.synchronize(self.device)
            events[0].record()
            for i in range(steps):
                ids = self._step_fn(ids)
                events[i + 1].record()
            torch.cuda.synchronize(self.device)
            return [events[i].elapsed_time(events[i + 1]) / 1e3 for i in range(steps)]
        times: list[float] = []
        sync(self.device)
        for _ in range(steps):
            t0 = time.perf_counter()
            ids = self._step_fn(ids)
            sync(self.device)  # every GPU of a split (no-op on CPU)
            times.append(time.perf_counter() - t0)
        return times

    def tokens(self, first: Any, position: int, steps: int) -> Any:
        """The ``steps`` tokens decoded after ``first`` (untimed; to check a mode against eager)."""
        import torch

        _set_position(self.cache, position)
        out = []
        if self._graph is not None:
            self._ids.copy_(first)
            for _ in range(steps):
                self._graph.replay()
                out.append(self._ids.clone())
        else:
            ids = first
            for _ in range(steps):
                ids = self._step_fn(ids)
                out.append(ids)
        return torch.cat(out, dim=1)

    def close(self) -> None:
        self._graph = None
        self._ids = None
        self.cache = None  # type: ignore[assignment]


class GraphMismatchError(RuntimeError):
    """A captured decode step computes something other than the eager step."""


def check_replay(got: Any, reference: Any, rtol: float = 0.05) -> bool:
    """True when graph logits match eager ones; False when it cannot tell (no finite logits).

    Raises GraphMismatchError when they differ beyond fp16 / kernel-order noise: relative L2 error over
    the finite logits above ``rtol``, or finite in one and not the other.
    """
    import torch

    if got.shape != reference.shape:
        raise GraphMismatchError(f"graph logits have shape {tuple(got.shape)}, eager {tuple(reference.shape)}")
    finite = torch.isfinite(reference)
    if not bool(finite.any()):
        return False
    if not torch.equal(finite, torch.isfinite(got)):
        raise GraphMismatchError("graph and eager logits are finite at different places")
    err = float((got[finite] - reference[finite]).norm() / reference[finite].norm().clamp_min(1e-12))
    if err > rtol:
        raise GraphMismatchError(
            f"graph logits differ from eager by {err:.2g} (relative): a kernel ran outside the captured "
            "stream or was dropped by the compiler"
        )
    return True


def mode_chain(requested: str, device: str) -> list[str]:
    if len(devices(device)) > 1:
        # A CUDA graph is captured on one device's stream; a model split over GPUs decodes eagerly.
        if requested in ("compile", "graph"):
            raise InputError(
                f"--decode-mode {requested} needs the model on one GPU (a CUDA graph is captured on one device), "
                f"but it is split over {device}.",
                "Use --decode-mode auto or eager (recipe: evaluation.throughput.decode_mode), or a --device that "
                "keeps it on one GPU (cuda:N).",
            )
        return ["eager"]
    if not is_cuda(device):
        if requested in ("compile", "graph"):
            raise InputError(
                f"--decode-mode {requested} needs a CUDA GPU (CUDA graphs).",
                "Use --decode-mode eager or auto on CPU (recipe: evaluation.throughput.decode_mode).",
            )
        return ["eager"]
    if requested == "auto":
        return ["compile", "graph", "eager"]
    return [requested]


def has_int8_outlier_path(model: Any) -> bool:
    """Whether the model has bitsandbytes LLM.int8() layers with an outlier threshold (not capturable)."""
    for module in model.modules():
        if type(module).__name__ == "Linear8bitLt":
            state = getattr(module, "state", None)
            if float(getattr(state, "threshold", 0.0) or 0.0) > 0:
                return True
    return False


def graph_breaks() -> int:
    try:
        from torch._dynamo.utils import counters

        return int(sum(counters["graph_break"].values()))
    except Exception:
        return 0


def teach_compiler_kernels() -> None:
    """Shape functions for GPTQModel's Marlin ops, which ship without them.

    torch.compile traces with fake tensors and stops at an op it cannot size. The Marlin GEMM returns
    ``[size_m, size_n]`` in the activation dtype (as vLLM declares for the same kernel). Registered only
    when that library is loaded and only once; anything unexpected leaves compile to fail and fall back.
    """
    import sys

    if "gptqmodel" not in sys.modules:
        return
    import torch

    for tag in ("fp16", "bf16"):
        name = f"gptqmodel_marlin_{tag}::gptq_marlin_gemm_{tag}"
        try:
            if torch._C._dispatch_has_kernel_for_dispatch_key(name, "Meta"):
                continue

            def fake(a: Any, *args: Any, **kwargs: Any) -> Any:
                # (a, c, b_q_weight, b_bias, b_scales, global_scale, b_zeros, g_idx, perm, workspace,
                #  b_q_type_id, size_m, size_n, ...): size_m and size_n are the 11th and 12th after a.
                return a.new_empty((args[10], args[11]))

            torch.library.register_fake(name)(fake)
        except Exception:
            continue


def reset_compiler() -> None:
    import torch

    with contextlib.suppress(Exception):
        torch._dynamo.reset()
        torch._dynamo.utils.counters.clear()
