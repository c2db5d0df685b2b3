"""Throughput measured the way a model is served: static KV cache, CUDA-graph decoding, against FP16.

Plain eager ``generate()`` on a GPU spends ~60 ms of Python per token whatever the model, so it cannot
tell a 4-bit kernel from FP16. Here decoding runs one token at a time over a transformers
``StaticCache``, through a step we capture as a CUDA graph (after ``torch.compile`` where that works),
so the numbers are set by the kernels and the memory system:

- ``compile``: ``torch.compile`` (Inductor fuses the small element-wise kernels) inside a CUDA graph;
- ``graph``: the eager kernels inside a CUDA graph (no launch overhead, no fusion);
- ``eager``: the same static-cache loop without graphs (CPU, and kernels that sync with the host).

``auto`` tries them in that order on CUDA (``eager`` on CPU) and records which one ran and why others
failed (``decode_mode``, ``decode_mode_note``), so a number is never silently from a slower path.

Each measured model gives: load time; prefill tokens/s and time to first token at several prompt
lengths; decode tokens/s at several batch sizes (median, min/max, quartiles over repetitions) with the
per-token latency p50/p95/p99; peak device memory; weight footprint; bytes of weights read per decode
step, and the fraction of the memory-bandwidth roofline reached at batch 1 (those bytes over the
device's copy bandwidth, measured once by a large device-to-device copy and cached). ``compare`` turns
an artifact's and its FP16 baseline's results, measured with the same settings, into speedups and cost
per million generated tokens. ``bench_model`` measures each model in a process of its own
(bench_child.py), so that one measurement's failure cannot change another's outcome.
"""

from __future__ import annotations

import contextlib
import gc
import inspect
import json
import statistics
import time
from collections.abc import Callable, Iterator
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator

from llmopt.errors import BackendUnavailableError, InputError, LlmoptError
from llmopt.progress import Reporter, SilentReporter
from llmopt.stats import percentile, summary

THROUGHPUT_SCHEMA = "llmopt.throughput/1"
DecodeMode = Literal["auto", "compile", "graph", "eager"]
MODE_NAMES = {"compile": "compile+cudagraph", "graph": "cudagraph", "eager": "eager-static"}

# Grids used when the caller leaves them unset: serving-sized on GPU, tiny on CPU (CI runs there).
GPU_DEFAULTS: dict[str, Any] = {"batch_sizes": [1, 8, 32], "prompt_lens": [128, 512, 2048], "gen_len": 128}
CPU_DEFAULTS: dict[str, Any] = {"batch_sizes": [1, 4], "prompt_lens": [32, 128], "gen_len": 16}
ATTN_IMPLEMENTATIONS = ("eager", "sdpa", "flash_attention_2", "flash_attention_3", "flex_attention")


class ThroughputSettings(BaseModel):
    """What to measure. Unset grids take the device's defaults (see ``resolved``)."""

    model_config = ConfigDict(extra="forbid")
    batch_sizes: list[int] | None = Field(default=None, description="Decode batch sizes (default GPU 1,8,32; CPU 1,4).")
    prompt_lens: list[int] | None = Field(
        default=None,
        description="Prefill prompt lengths; decoding starts after the first (default GPU 128,512,2048).",
    )
    gen_len: int | None = Field(
        default=None, ge=2, description="Tokens generated per timed decode run (GPU default 128)."
    )
    warmup: int = Field(default=2, ge=0, description="Untimed runs before timing each point.")
    repetitions: int = Field(default=5, ge=1, description="Timed runs per point; medians and spread are over these.")
    decode_mode: DecodeMode = Field(default="auto", description="compile, graph, eager, or auto (best that works).")
    gpu_hourly_cost: float | None = Field(
        default=None, gt=0, description="Price of the device per hour, for $/1M tokens."
    )
    seed: int = Field(default=0, description="Seed of the random prompt token ids.")
    marlin_atomics: bool = Field(
        default=True,
        description="GPTQ-Marlin: atomicAdd split-K reduction on narrow-output layers while measuring speed "
        "(as GPTQModel does for AWQ-Marlin); perplexity is always scored without it.",
    )

    @field_validator("batch_sizes", "prompt_lens")
    @classmethod
    def _positive_unique(cls, v: list[int] | None) -> list[int] | None:
        if v is None:
            return None
        if not v or any(x < 1 for x in v):
            raise ValueError("needs one or more positive integers")
        return sorted(set(v))

    def resolved(self, device: str) -> ThroughputSettings:
        """A copy with every unset grid filled from the device's defaults."""
        defaults = CPU_DEFAULTS if device == "cpu" else GPU_DEFAULTS
        update = {k: v for k, v in defaults.items() if getattr(self, k) is None}
        return self.model_copy(update=update)

    @property
    def context_len(self) -> int:
        """Prompt length decoding starts from: the first prompt length."""
        assert self.prompt_lens
        return self.prompt_lens[0]


def parse_int_list(text: str | None, option: str) -> list[int] | None:
    """'1,8,32' -> [1, 8, 32]; None stays None."""
    if text is None:
        return None
    try:
        values = [int(part) for part in text.replace(" ", "").split(",") if part]
    except ValueError:
        raise InputError(
            f"{option} '{text}' is not a comma-separated list of integers.", f"Write e.g. {option} 1,8,32."
        ) from None
    if not values or any(v < 1 for v in values):
        raise InputError(f"{option} '{text}' needs positive integers.", f"Write e.g. {option} 1,8,32.")
    return values


# ---------------------------------------------------------------------------------------------------
# Small helpers


def cost_per_million_tokens(tokens_per_s: float | None, hourly_cost: float | None) -> float | None:
    """Device cost of generating one million tokens at ``tokens_per_s``."""
    if not tokens_per_s or not hourly_cost:
        return None
    return hourly_cost / 3600.0 / tokens_per_s * 1e6


def _is_cuda(device: str) -> bool:
    return device.startswith("cuda")


def _devices(device: str) -> list[str]:
    """``cuda:0,1`` (a model split over GPUs, llmopt/placement.py) -> ["cuda:0", "cuda:1"]; else [device]."""
    if _is_cuda(device) and "," in device:
        return [f"cuda:{i.strip()}" for i in device.split(":", 1)[1].split(",")]
    return [device]


def _sync(device: str) -> None:
    if _is_cuda(device):
        import torch

        for dev in _devices(device):
            torch.cuda.synchronize(dev)


def _short(exc: BaseException) -> str:
    lines = str(exc).strip().splitlines()
    text = lines[0] if lines else ""
    return f"{type(exc).__name__}: {text[:300]}"


# ---------------------------------------------------------------------------------------------------
# The hardware limit


def copy_bandwidth(device: str, *, use_cache: bool = True) -> dict[str, Any]:
    """Device memory bandwidth, bytes/s, from a large device-to-device copy (bytes read + written).

    Measured once per (device name, torch, CUDA) and cached under llmopt's cache folder.
    """
    import torch

    from llmopt.artifact import write_json_atomic
    from llmopt.environment import device_name
    from llmopt.source import cache_dir

    name = device_name(device)
    ident = {"device": name, "torch": torch.__version__, "cuda": torch.version.cuda}
    slug = "".join(c if c.isalnum() else "-" for c in f"{name}-{torch.__version__}").strip("-").lower()
    path = cache_dir() / "devices" / f"{slug}.json"
    if use_cache and path.is_file():
        with contextlib.suppress(ValueError, OSError):
            data = json.loads(path.read_text())
            if isinstance(data, dict) and data.get("ident") == ident and data.get("bytes_per_s"):
                return {**data, "cached": True}
    if _is_cuda(device):
        free, _ = torch.cuda.mem_get_info(torch.device(device))
        nbytes = int(min(2 << 30, max(64 << 20, free // 8)))
        iters = 20
    else:
        nbytes, iters = 128 << 20, 5
    src = torch.empty(nbytes, dtype=torch.uint8, device=device)
    src.random_(0, 256)  # not zeros: never time on zeros
    dst = torch.empty_like(src)
    for _ in range(3):
        dst.copy_(src)
    _sync(device)
    times: list[float] = []
    for _ in range(iters):
        t0 = time.perf_counter()
        dst.copy_(src)
        _sync(device)
        times.append(time.perf_counter() - t0)
    best = statistics.median(times)
    del src, dst
    result = {
        "ident": ident,
        "bytes_per_s": 2 * nbytes / best,
        "method": f"median of {iters} copies of {nbytes >> 20} MiB, bytes read + written",
        "measured_at": datetime.now(UTC).isoformat(timespec="seconds"),
    }
    if use_cache:
        with contextlib.suppress(OSError):
            write_json_atomic(path, result)
    return {**result, "cached": False}


def weight_bytes_per_step(model: Any) -> int:
    """Bytes of weights a decode step reads: every parameter and buffer once, quantization state included.

    The input embedding is left out (a step reads one row of it) unless it is tied to the output head.
    """
    emb = model.get_input_embeddings() if hasattr(model, "get_input_embeddings") else None
    out = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    emb_w = getattr(emb, "weight", None)
    out_w = getattr(out, "weight", None)
    tied = emb_w is not None and out_w is not None and emb_w.data_ptr() == out_w.data_ptr()
    seen: set[tuple[int, int]] = set()
    total = 0

    def add(t: Any) -> None:
        nonlocal total
        if t is None or not hasattr(t, "data_ptr") or t.device.type == "meta":
            return
        key = (t.data_ptr(), t.numel() * t.element_size())
        if key in seen:
            return
        seen.add(key)
        total += key[1]

    for tensor in [*model.parameters(), *model.buffers()]:
        if emb_w is not None and not tied and tensor.data_ptr() == emb_w.data_ptr():
            continue
        add(tensor)
        # bitsandbytes keeps its scales beside the packed weight, not as parameters.
        state = getattr(tensor, "quant_state", None)
        while state is not None:
            add(getattr(state, "absmax", None))
            add(getattr(state, "code", None))
            state = getattr(state, "state2", None)
        add(getattr(tensor, "SCB", None))
    return total


def kv_cache_bytes(model: Any, batch: int, cache_len: int, bytes_per_value: int = 2) -> int:
    """Bytes of a full static KV cache (what attention reads per decode step with a static cache)."""
    cfg = model.config.get_text_config() if hasattr(model.config, "get_text_config") else model.config
    layers = int(cfg.num_hidden_layers)
    heads = int(getattr(cfg, "num_key_value_heads", None) or cfg.num_attention_heads)
    head_dim = int(getattr(cfg, "head_dim", None) or cfg.hidden_size // cfg.num_attention_heads)
    return 2 * layers * batch * heads * cache_len * head_dim * bytes_per_value


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
        if _is_cuda(self.device) and len(_devices(self.device)) == 1:
            events = [torch.cuda.Event(enable_timing=True) for _ in range(steps + 1)]
            torch.cuda.synchronize(self.device)
            events[0].record()
            for i in range(steps):
                ids = self._step_fn(ids)
                events[i + 1].record()
            torch.cuda.synchronize(self.device)
            return [events[i].elapsed_time(events[i + 1]) / 1e3 for i in range(steps)]
        times: list[float] = []
        _sync(self.device)
        for _ in range(steps):
            t0 = time.perf_counter()
            ids = self._step_fn(ids)
            _sync(self.device)  # every GPU of a split (no-op on CPU)
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


def _mode_chain(requested: str, device: str) -> list[str]:
    if len(_devices(device)) > 1:
        # A CUDA graph is captured on one device's stream; a model split over GPUs decodes eagerly.
        if requested in ("compile", "graph"):
            raise InputError(
                f"--decode-mode {requested} needs the model on one GPU (a CUDA graph is captured on one device), "
                f"but it is split over {device}.",
                "Use --decode-mode auto or eager, or a --device that keeps it on one GPU (cuda:N).",
            )
        return ["eager"]
    if not _is_cuda(device):
        if requested in ("compile", "graph"):
            raise InputError(
                f"--decode-mode {requested} needs a CUDA GPU (CUDA graphs).",
                "Use --decode-mode eager or auto on CPU.",
            )
        return ["eager"]
    if requested == "auto":
        return ["compile", "graph", "eager"]
    return [requested]


def _has_int8_outlier_path(model: Any) -> bool:
    """Whether the model has bitsandbytes LLM.int8() layers with an outlier threshold (not capturable)."""
    for module in model.modules():
        if type(module).__name__ == "Linear8bitLt":
            state = getattr(module, "state", None)
            if float(getattr(state, "threshold", 0.0) or 0.0) > 0:
                return True
    return False


def _graph_breaks() -> int:
    try:
        from torch._dynamo.utils import counters

        return int(sum(counters["graph_break"].values()))
    except Exception:
        return 0


def _teach_compiler_kernels() -> None:
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


def _reset_compiler() -> None:
    import torch

    with contextlib.suppress(Exception):
        torch._dynamo.reset()
        torch._dynamo.utils.counters.clear()


def _random_ids(vocab: int, batch: int, length: int, seed: int, device: str) -> Any:
    import torch

    gen = torch.Generator().manual_seed(seed)
    # Stay clear of special ids at the ends of the vocabulary.
    return torch.randint(10, max(11, vocab - 10), (batch, length), generator=gen).to(_devices(device)[0])


def _vocab_size(model: Any) -> int:
    cfg = model.config.get_text_config() if hasattr(model.config, "get_text_config") else model.config
    return int(cfg.vocab_size)


class _Peak:
    """Peak device memory over a block (CUDA only)."""

    def __init__(self, device: str) -> None:
        self.device = device
        self.bytes: int | None = None

    def __enter__(self) -> _Peak:
        if _is_cuda(self.device):
            import torch

            for dev in _devices(self.device):
                torch.cuda.synchronize(dev)
                torch.cuda.reset_peak_memory_stats(dev)
        return self

    def __exit__(self, *exc: object) -> None:
        if _is_cuda(self.device):
            import torch

            _sync(self.device)
            # a split model: the sum of every GPU's peak
            self.bytes = sum(int(torch.cuda.max_memory_allocated(dev)) for dev in _devices(self.device))


@contextlib.contextmanager
def _released(device: str) -> Iterator[None]:
    try:
        yield
    finally:
        gc.collect()
        if _is_cuda(device):
            import torch

            torch.cuda.empty_cache()


def measure_prefill(
    model: Any, device: str, settings: ThroughputSettings, reporter: Reporter | None = None
) -> dict[str, Any]:
    """Prefill tokens/s and time to first token (batch 1) at each prompt length."""
    import torch

    rep: Any = reporter or SilentReporter()
    assert settings.prompt_lens and settings.gen_len
    vocab = _vocab_size(model)
    out: dict[str, Any] = {}
    for plen in settings.prompt_lens:
        with _released(device), rep.step(f"prefill {plen} tokens"):
            try:
                with _Peak(device) as peak:
                    dec = StaticDecoder(model, device, 1, plen + settings.gen_len + 1)
                    ids = _random_ids(vocab, 1, plen, settings.seed + plen, device)
                    times = []
                    for i in range(settings.warmup + settings.repetitions):
                        _sync(device)
                        t0 = time.perf_counter()
                        tok = dec.prefill(ids)
                        int(tok[0, 0].item())  # the first token reaches the host
                        elapsed = time.perf_counter() - t0
                        if i >= settings.warmup:
                            times.append(elapsed)
                    dec.close()
                    del dec
            except torch.cuda.OutOfMemoryError as exc:
                out[str(plen)] = {"error": _short(exc)}
                continue
            out[str(plen)] = {
                "tokens_per_s": summary([plen / t for t in times]),
                "ttft_ms": summary([1e3 * t for t in times]),
                "peak_memory_bytes": peak.bytes,
            }
    return out


DecoderHook = Callable[[int, "StaticDecoder", Any, int], None]


def measure_decode(
    model: Any,
    device: str,
    settings: ThroughputSettings,
    reporter: Reporter | None = None,
    on_decoder: DecoderHook | None = None,
) -> dict[str, Any]:
    """Decode tokens/s and per-token latency at each batch size, after a prompt of ``context_len``.

    ``on_decoder(batch, decoder, first_tokens, position)`` is called after the timed runs of each
    batch size, with the decoder still set up (benchmarks profile it there).
    """
    import torch

    rep: Any = reporter or SilentReporter()
    assert settings.batch_sizes and settings.gen_len
    ctx, steps = settings.context_len, settings.gen_len
    vocab = _vocab_size(model)
    chain = _mode_chain(settings.decode_mode, device)
    results: dict[str, Any] = {}
    notes: list[str] = []
    failed: set[str] = set()
    if settings.decode_mode == "auto" and chain != ["eager"] and _has_int8_outlier_path(model):
        # Measured on an H200: the capture fails ("operation failed due to a previous error during capture")
        # after a compile that cost ~80 s of the measurement, every time.
        chain = ["eager"]
        notes.append(
            "bitsandbytes int8 with an outlier threshold finds outlier columns of data-dependent shape in every "
            "matmul (a host synchronization), so no CUDA graph can capture its step: measured eagerly"
        )
    if "compile" in chain:
        _reset_compiler()
        _teach_compiler_kernels()
    for batch in settings.batch_sizes:
        with _released(device), rep.step(f"decode at batch {batch}"):
            dec: StaticDecoder | None = None
            try:
                with _Peak(device) as peak:
                    dec = StaticDecoder(model, device, batch, ctx + steps + 1)
                    prompt = _random_ids(vocab, batch, ctx, settings.seed + batch, device)
                    first = dec.prefill(prompt)
                    mode_used = None
                    # A mode that failed at one batch size is not tried again at the next.
                    for mode in [m for m in chain if m not in failed or m == chain[-1]]:
                        try:
                            dec.prepare(mode, first, ctx)
                            mode_used = mode
                            break
                        except torch.cuda.OutOfMemoryError:
                            raise
                        except Exception as exc:
                            note = f"{MODE_NAMES[mode]} failed at batch {batch}: {_short(exc)}"
                            if mode == chain[-1]:
                                raise
                            notes.append(note)
                            rep.info(note)
                            failed.add(mode)
                            _sync(device)
                    assert mode_used is not None
                    if dec.verified is False:
                        notes.append(f"batch {batch}: graph not checked against eager (logits not finite)")
                    per_step: list[float] = []
                    rates: list[float] = []
                    for i in range(settings.warmup + settings.repetitions):
                        t = dec.run(first, ctx, steps)
                        if i >= settings.warmup:
                            per_step.extend(t)
                            rates.append(batch * steps / sum(t))
                    if on_decoder is not None:
                        on_decoder(batch, dec, first, ctx)
            except torch.cuda.OutOfMemoryError as exc:
                results[str(batch)] = {"error": _short(exc)}
                continue
            finally:
                if dec is not None:
                    dec.close()
                del dec
            ms = [1e3 * t for t in per_step]
            results[str(batch)] = {
                "tokens_per_s": summary(rates),
                "itl_ms": {"p50": percentile(ms, 50), "p95": percentile(ms, 95), "p99": percentile(ms, 99)},
                "peak_memory_bytes": peak.bytes,
                "decode_mode": MODE_NAMES[mode_used],
                "kv_cache_bytes": kv_cache_bytes(model, batch, ctx + steps + 1),
            }
    modes = sorted({r["decode_mode"] for r in results.values() if "decode_mode" in r})
    breaks = _graph_breaks() if "compile" in chain else 0
    if breaks:
        notes.append(f"torch.compile split the step at {breaks} graph break(s) (still one CUDA graph)")
    if len(_devices(device)) > 1:
        notes.append(f"layers split over {device}: no CUDA graph across devices, decoding ran eagerly (eager-static)")
    return {
        "decode": results,
        "decode_mode": "/".join(modes) if modes else None,
        "decode_mode_note": "; ".join(notes) or None,
    }


def measure_model(
    model: Any,
    device: str,
    settings: ThroughputSettings,
    reporter: Reporter | None = None,
    on_decoder: DecoderHook | None = None,
) -> dict[str, Any]:
    """Serving-speed measurement of a loaded transformers causal LM (the engine; no loading)."""
    import torch

    settings = settings.resolved(device)
    gpus = _devices(device)
    bw = copy_bandwidth(gpus[0])
    weight_bytes = weight_bytes_per_step(model)
    # no_grad rather than inference_mode: the static cache is updated in place across calls and graphs.
    with torch.no_grad():
        prefill = measure_prefill(model, device, settings, reporter)
        decode = measure_decode(model, device, settings, reporter, on_decoder)
    peaks = [r.get("peak_memory_bytes") for r in [*prefill.values(), *decode["decode"].values()]]
    peaks_known = [p for p in peaks if p is not None]
    result: dict[str, Any] = {
        "prefill": prefill,
        **decode,
        "ttft_ms": (prefill.get(str(settings.context_len)) or {}).get("ttft_ms", {}).get("median"),
        "peak_memory_bytes": max(peaks_known) if peaks_known else None,
        "weight_bytes_per_step": weight_bytes,
    }
    b1 = (decode["decode"].get("1") or {}).get("tokens_per_s", {}).get("median")
    roof = bw["bytes_per_s"] / weight_bytes if weight_bytes else None
    result["roofline"] = {
        "copy_bandwidth_bytes_per_s": bw["bytes_per_s"],
        "tokens_per_s_at_batch_1": roof,
        "fraction_at_batch_1": (b1 / roof) if (b1 and roof) else None,
    }
    if len(gpus) > 1:
        result["roofline"].update(_split_roofline(gpus, roof))
    if settings.gpu_hourly_cost:
        result["cost_per_million_tokens"] = {
            b: cost_per_million_tokens(r.get("tokens_per_s", {}).get("median"), settings.gpu_hourly_cost)
            for b, r in decode["decode"].items()
        }
    return result


def _split_roofline(gpus: list[str], roof: float | None) -> dict[str, Any]:
    """Roofline of a model split over GPUs (a pipeline: the GPUs read their layers one after another).

    A step still reads every weight byte once, at one GPU's bandwidth at a time, so with identical GPUs
    the bound is the same as on one GPU: all weight bytes over one GPU's copy bandwidth. With different
    GPUs that number would be wrong, so none is given.
    """
    from llmopt.environment import device_name

    names = {device_name(g) for g in gpus}
    if len(names) > 1:
        return {
            "tokens_per_s_at_batch_1": None,
            "fraction_at_batch_1": None,
            "note": f"not applicable: layers split over different GPUs ({', '.join(sorted(names))})",
        }
    note = (
        f"layers split over {len(gpus)} identical GPUs run one after another: bound = all weight bytes / "
        f"one GPU's copy bandwidth (measured on {gpus[0]}); hops between GPUs are not in it"
    )
    return {"note": note} if roof else {}


# ---------------------------------------------------------------------------------------------------
# Loading, comparing, the `llmopt bench` flow


def runner_kind_for(path: Path) -> str:
    """Which runner loads a model folder: an llmopt artifact says so; a GPTQ/AWQ folder needs GPTQModel."""
    from llmopt.artifact import Artifact
    from llmopt.runners.hf import quant_method

    if (path / "llmopt.json").is_file():
        return Artifact.open(path).manifest.runner
    return "gptqmodel" if (quant_method(path) or "").lower() in ("gptq", "awq") else "hf"


def weights_size(path: Path) -> int:
    """Bytes of the weight files in a model folder (what evaluate reports as size on disk)."""
    from llmopt.source import WEIGHT_SUFFIXES

    return sum(p.stat().st_size for p in path.iterdir() if p.is_file() and p.suffix in WEIGHT_SUFFIXES)


def bench_model(
    path: Path,
    device: str,
    settings: ThroughputSettings,
    *,
    runner_kind: str | None = None,
    kernel: str | None = None,
    attn_implementation: str | None = None,
    label: str = "model",
    reporter: Reporter | None = None,
    trust_remote_code: bool = False,
    isolate: bool = True,
) -> dict[str, Any]:
    """Load a model folder through its runner, then measure it.

    ``isolate`` (the default): in a process of its own (llmopt/evaluate/bench_child.py), so that a failed
    CUDA-graph capture, the compiler's state or a crash stays with this one measurement; the result, or
    the error with its real cause, comes back. ``isolate=False`` measures in this process.
    """
    if isolate:
        return _bench_in_child(
            path,
            device,
            settings,
            runner_kind=runner_kind,
            kernel=kernel,
            attn_implementation=attn_implementation,
            label=label,
            reporter=reporter,
            trust_remote_code=trust_remote_code,
        )
    from llmopt.runners import load_runner

    rep: Any = reporter or SilentReporter()
    kind = runner_kind or runner_kind_for(path)
    with rep.step(f"loading {label}"):
        runner = load_runner(kind, path, device, kernel=kernel, for_speed=True, trust_remote_code=trust_remote_code)
    try:
        if attn_implementation:
            _set_attention(runner.model, attn_implementation)  # type: ignore[attr-defined]
        bench = getattr(runner, "bench", None)
        if bench is None:
            raise BackendUnavailableError(
                f"the '{runner.name}' runner cannot measure throughput.",
                "Measure this format with its own engine.",
            )
        with rep.step(f"throughput of {label}"):
            result: dict[str, Any] = bench(settings, rep)
        result.update(
            {
                "load_seconds": round(runner.load_seconds, 3),
                "footprint_bytes": runner.footprint_bytes(),
                "size_bytes": weights_size(path),
                "runner": runner.name,
                "dtype": runner.dtype,
            }
        )
        if getattr(runner, "kernel", None):
            result["kernel"] = runner.kernel  # type: ignore[attr-defined]
        placement = getattr(runner, "placement", None)
        if placement is not None:
            result["placement"] = placement.record()
        if attn_implementation:
            result["attn_implementation"] = attn_implementation
        return result
    finally:
        runner.close()


class MeasurementError(LlmoptError):
    """A speed measurement's own process failed or died; ``exit_code`` says how (1 a bug, 4 a crash)."""

    def __init__(self, message: str, hint: str | None, exit_code: int, detail: str | None = None) -> None:
        super().__init__(message, hint)
        self.exit_code = exit_code
        self.detail = detail  # the child's traceback, for reports


def _child_env() -> dict[str, str]:
    """The child imports this very llmopt, and torch's compile cache persists under llmopt's cache folder."""
    import os

    import llmopt
    from llmopt.source import cache_dir

    env = dict(os.environ)
    root = str(Path(llmopt.__file__).resolve().parents[1])
    env["PYTHONPATH"] = os.pathsep.join(p for p in (root, env.get("PYTHONPATH", "")) if p)
    # Compiled kernels from one measurement serve the next (another batch size, variant or run) instead
    # of being rebuilt in every child; the user's own setting wins.
    env.setdefault("TORCHINDUCTOR_CACHE_DIR", str(cache_dir() / "torchinductor"))
    return env


def _stop_child(proc: Any) -> None:
    """Stop a measurement child (SIGTERM, then SIGKILL after 10 s) and reap it."""
    import subprocess

    if proc.poll() is None:
        proc.terminate()
        try:
            proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


def _tail(log: Path, lines: int = 6) -> str:
    try:
        text = log.read_text(errors="replace")
    except OSError:
        return ""
    kept = [ln.strip()[:300] for ln in text.splitlines() if ln.strip()]
    return " | ".join(kept[-lines:])


def _how_it_ended(returncode: int) -> str:
    import signal

    if returncode < 0:
        try:
            name = signal.Signals(-returncode).name
        except ValueError:
            name = f"signal {-returncode}"
        return f"was killed by {name} (signal {-returncode})"
    return f"exited with code {returncode} without a result"


# GPTQModel compiles its Marlin kernels on first use (measured: ~170 s on the H200 machine) and keeps them in
# its own cache; these are where it looks (GPTQModel's utils/cpp.py and utils/marlin.py).
_MARLIN_BUILD_ROOT_ENV = "GPTQMODEL_MARLIN_FP16_BUILD_ROOT"
_GPTQMODEL_EXT_ROOT_ENV = "GPTQMODEL_TORCH_EXTENSIONS_DIR"


def marlin_build_root() -> Path:
    """Where GPTQModel keeps its built fp16 Marlin kernels (its env overrides first, then its default)."""
    import os

    own = os.environ.get(_MARLIN_BUILD_ROOT_ENV)
    if own:
        return Path(own).expanduser()
    root = os.environ.get(_GPTQMODEL_EXT_ROOT_ENV)
    base = Path(root).expanduser() if root else Path.home() / ".cache" / "gptqmodel" / "torch_extensions"
    return base / "marlin_fp16"


def one_time_build_notice(runner_kind: str, device: str, kernel: str | None) -> str | None:
    """A line for the user when GPTQModel is about to compile its Marlin kernels (first use on a machine)."""
    if runner_kind != "gptqmodel" or not _is_cuda(device) or (kernel and "marlin" not in kernel.lower()):
        return None
    root = marlin_build_root()
    built = root.is_dir() and any(p.suffix in (".so", ".pyd") for p in root.rglob("*"))
    if built:
        return None
    return (
        f"GPTQModel builds its Marlin kernels once on this machine (about 3 minutes on an H200; GPTQModel's "
        f"progress is hidden), kept in {root} for later runs"
    )


def _bench_in_child(
    path: Path,
    device: str,
    settings: ThroughputSettings,
    *,
    runner_kind: str | None,
    kernel: str | None,
    attn_implementation: str | None,
    label: str,
    reporter: Reporter | None,
    trust_remote_code: bool = False,
) -> dict[str, Any]:
    import os
    import subprocess
    import sys
    import tempfile

    from llmopt import errors, interrupt

    rep: Any = reporter or SilentReporter()
    notice = one_time_build_notice(runner_kind or runner_kind_for(Path(path)), device, kernel)
    if notice:
        rep.info(notice)
    request = {
        "path": str(Path(path).resolve()),
        "device": device,
        "settings": settings.model_dump(mode="json"),
        "runner_kind": runner_kind,
        "kernel": kernel,
        "attn_implementation": attn_implementation,
        "label": label,
        "trust_remote_code": trust_remote_code,
    }
    # Everything the child prints (its progress, third-party logs) goes to a file whose last lines explain a
    # crash; with LLMOPT_DEBUG=1 it goes to the terminal as well as it happens.
    show = os.environ.get("LLMOPT_DEBUG") == "1"
    with tempfile.TemporaryDirectory(prefix="llmopt-bench-") as tmp:
        req, res, log = Path(tmp) / "request.json", Path(tmp) / "result.json", Path(tmp) / "output.log"
        req.write_text(json.dumps(request))
        with open(log, "w") as log_file, rep.step(f"throughput of {label} (own process)"):
            proc = subprocess.Popen(
                [sys.executable, "-m", "llmopt.evaluate.bench_child", str(req), str(res)],
                stdin=subprocess.DEVNULL,
                # never the parent's stdout: that carries --json output
                stdout=sys.__stderr__ if show else log_file,
                stderr=None if show else log_file,
                env=_child_env(),
            )
            try:
                returncode = proc.wait()
            except BaseException:  # Ctrl-C / SIGTERM (raised here by llmopt's handler): the child stops too
                _stop_child(proc)
                raise
        interrupt.check()
        data: dict[str, Any] | None = None
        if res.is_file():
            with contextlib.suppress(ValueError, OSError):
                data = json.loads(res.read_text())
        if data is not None and "result" in data:
            return dict(data["result"])
        if data is not None and isinstance(data.get("error"), dict):
            err = data["error"]
            if err.get("kind") == "llmopt":
                cls = getattr(errors, str(err.get("type")), None)
                if isinstance(cls, type) and issubclass(cls, LlmoptError) and cls is not LlmoptError:
                    try:
                        raise cls(err["message"], err.get("hint"))
                    except TypeError:
                        pass
                raise MeasurementError(err["message"], err.get("hint"), int(err.get("exit_code") or 1))
            raise MeasurementError(
                f"the speed measurement of {label} failed: {err.get('type')}: {err.get('message')}",
                "Unexpected: the traceback is in the report (run: report.json); please report it.",
                errors.EXIT_BUG,
                detail=err.get("traceback"),
            )
        if returncode == errors.EXIT_INTERRUPTED:
            raise errors.InterruptedRunError(
                "interrupted: nothing was written (partial output removed).", "Run the command again to redo the work."
            )
        last = "" if show else _tail(log)
        raise MeasurementError(
            f"the speed measurement of {label} {_how_it_ended(returncode)}"
            + (f"; its last output: {last}" if last else "")
            + ". It ran in its own process, so the rest of this run is not affected.",
            "Run it again; a crash in a kernel library or a CUDA error ends the process like this. "
            "LLMOPT_DEBUG=1 shows the measurement's whole output as it runs.",
            errors.EXIT_UNAVAILABLE,
        )


def _set_attention(model: Any, impl: str) -> None:
    try:
        model.set_attn_implementation(impl)
    except Exception as exc:
        raise BackendUnavailableError(
            f"attention '{impl}' cannot run with this model here: {_short(exc)}",
            f"Pick from the installed ones: {', '.join(available_attention())}.",
        ) from None


def available_attention() -> list[str]:
    """Attention implementations whose libraries are installed (flash_attn etc. are optional)."""
    import importlib.util

    found = ["eager", "sdpa"]
    if importlib.util.find_spec("flash_attn") is not None:
        found.append("flash_attention_2")
    if importlib.util.find_spec("flash_attn_interface") is not None:
        found.append("flash_attention_3")
    with contextlib.suppress(Exception):
        from torch.nn.attention import flex_attention  # noqa: F401

        found.append("flex_attention")
    return found


def compare(baseline: dict[str, Any], artifact: dict[str, Any], settings: ThroughputSettings) -> dict[str, Any]:
    """Speedups of ``artifact`` over ``baseline`` (ratios of medians measured one after the other)."""

    def ratio(a: float | None, b: float | None) -> float | None:
        return a / b if a and b else None

    def med(block: dict[str, Any], key: str) -> float | None:
        return (block.get(key) or {}).get("median")

    out: dict[str, Any] = {
        "decode_speedup": {
            b: ratio(med(r, "tokens_per_s"), med(baseline["decode"].get(b) or {}, "tokens_per_s"))
            for b, r in artifact["decode"].items()
        },
        "prefill_speedup": {
            p: ratio(med(r, "tokens_per_s"), med(baseline["prefill"].get(p) or {}, "tokens_per_s"))
            for p, r in artifact["prefill"].items()
        },
        "ttft_ratio": ratio(artifact.get("ttft_ms"), baseline.get("ttft_ms")),
        "memory_ratio": ratio(artifact.get("peak_memory_bytes"), baseline.get("peak_memory_bytes")),
        "size_ratio": ratio(artifact.get("size_bytes"), baseline.get("size_bytes")),
    }
    if settings.gpu_hourly_cost:
        out["gpu_hourly_cost"] = settings.gpu_hourly_cost
    return out


def throughput_section(
    baseline: dict[str, Any], artifact: dict[str, Any], settings: ThroughputSettings, device: str
) -> dict[str, Any]:
    """The ``throughput`` block of an evaluation report (read by the gate: ``decode_speedup``)."""
    from llmopt.environment import device_name

    return {
        "schema": THROUGHPUT_SCHEMA,
        "device": device_name(device),
        "settings": settings.resolved(device).model_dump(mode="json"),
        "baseline": baseline,
        "artifact": artifact,
        **compare(baseline, artifact, settings),
    }


def bench(
    model: str,
    *,
    baseline: str | None = None,
    settings: ThroughputSettings | None = None,
    attn: list[str] | None = None,
    device: str = "auto",
    kernel: str | None = None,
    reporter: Reporter | None = None,
    trust_remote_code: bool = False,
) -> dict[str, Any]:
    """``llmopt bench``: measure a model or artifact, optionally against a baseline, per attention kind.

    The measurements run one model at a time, each in a process of its own (``bench_model``).
    """
    from llmopt.environment import environment
    from llmopt.placement import resolve_target

    rep: Any = reporter or SilentReporter()
    settings = settings or ThroughputSettings()
    where = resolve_target(device)
    dev = where.primary
    resolved = settings.resolved(dev)
    target = _local_folder(model, trust_remote_code)
    base_path = _local_folder(baseline, trust_remote_code) if baseline else None
    attn_list: list[str | None] = list(attn) if attn else [None]
    installed = available_attention()
    skipped = {a: "not installed here" for a in attn_list if a is not None and a not in installed}
    for a in attn_list:
        if a is not None and a not in ATTN_IMPLEMENTATIONS:
            raise InputError(
                f"unknown attention implementation '{a}'.", f"Pick from: {', '.join(ATTN_IMPLEMENTATIONS)}."
            )
    runs: list[dict[str, Any]] = []
    for a in attn_list:
        if a in skipped:
            continue
        entry: dict[str, Any] = {"attn_implementation": a or "default"}
        if base_path is not None:
            entry["baseline"] = bench_model(
                base_path,
                where.spec,
                resolved,
                runner_kind="hf",
                attn_implementation=a,
                label="baseline",
                reporter=rep,
                trust_remote_code=trust_remote_code,
            )
        entry["model"] = bench_model(
            target,
            where.spec,
            resolved,
            kernel=kernel,
            attn_implementation=a,
            label=str(model),
            reporter=reporter,
            trust_remote_code=trust_remote_code,
        )
        if base_path is not None:
            entry.update(compare(entry["baseline"], entry["model"], resolved))
        runs.append(entry)
    return {
        "schema": THROUGHPUT_SCHEMA,
        "model": model,
        "baseline": baseline,
        "device": environment(dev)["device"],
        "placement": where.describe(),
        "settings": resolved.model_dump(mode="json"),
        "runs": runs,
        "skipped_attention": skipped,
        "environment": environment(dev),
    }


def _local_folder(spec: str, trust_remote_code: bool = False) -> Path:
    path = Path(spec).expanduser()
    if path.is_dir() and (path / "llmopt.json").is_file():
        return path
    from llmopt.source import resolve

    return resolve(spec, trust_remote_code=trust_remote_code).path
