"""The decode engine: throughput measured the way a model is served (static KV cache, CUDA graphs).

Plain eager ``generate()`` on a GPU spends ~60 ms of Python per token whatever the model, so it cannot
tell a 4-bit kernel from FP16. Here decoding runs one token at a time over a transformers
``StaticCache``, through a step captured as a CUDA graph (after ``torch.compile`` where that works;
the decoder is in decoder.py), so the numbers are set by the kernels and the memory system:

- ``compile``: ``torch.compile`` (Inductor fuses the small element-wise kernels) inside a CUDA graph;
- ``graph``: the eager kernels inside a CUDA graph (no launch overhead, no fusion);
- ``eager``: the same static-cache loop without graphs (CPU, and kernels that sync with the host).

``auto`` tries them in that order on CUDA (``eager`` on CPU) and records which one ran and why others
failed (``decode_mode``, ``decode_mode_note``), so a number is never silently from a slower path.

Each measured model gives: load time; prefill tokens/s and time to first token at several prompt
lengths; decode tokens/s at several batch sizes (median, min/max, quartiles over repetitions) with the
per-token latency p50/p95/p99; peak device memory; weight footprint; bytes of weights read per decode
step, and the fraction of the memory-bandwidth roofline reached at batch 1 (those bytes over the
device's copy bandwidth, measured once by a large device-to-device copy and cached).

The runners call it (``HFRunner.bench``); what to measure comes in as settings that look like
llmopt/evaluate/throughput.py's ``ThroughputSettings`` (``DecodeSettings`` below), so this module does
not import the evaluation layer above it.
"""

from __future__ import annotations

import contextlib
import gc
import json
import statistics
import time
from collections.abc import Callable, Iterator
from datetime import UTC, datetime
from typing import Any, Protocol

from llmopt.errors import BackendUnavailableError
from llmopt.progress import Reporter, SilentReporter
from llmopt.runners.decoder import (
    MODE_NAMES,
    StaticDecoder,
    devices,
    graph_breaks,
    has_int8_outlier_path,
    is_cuda,
    mode_chain,
    reset_compiler,
    short_error,
    sync,
    teach_compiler_kernels,
)
from llmopt.stats import cost_per_million_tokens, percentile, summary


class DecodeSettings(Protocol):
    """What the engine reads of llmopt/evaluate/throughput.py's ``ThroughputSettings``."""

    @property
    def batch_sizes(self) -> list[int] | None: ...
    @property
    def prompt_lens(self) -> list[int] | None: ...
    @property
    def gen_len(self) -> int | None: ...
    @property
    def warmup(self) -> int: ...
    @property
    def repetitions(self) -> int: ...
    @property
    def max_seconds_per_point(self) -> float: ...
    @property
    def decode_mode(self) -> str: ...
    @property
    def gpu_hourly_cost(self) -> float | None: ...
    @property
    def seed(self) -> int: ...
    @property
    def context_len(self) -> int: ...
    def resolved(self, device: str) -> DecodeSettings: ...


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
    if is_cuda(device):
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
    sync(device)
    times: list[float] = []
    for _ in range(iters):
        t0 = time.perf_counter()
        dst.copy_(src)
        sync(device)
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
# Measuring


def _random_ids(vocab: int, batch: int, length: int, seed: int, device: str) -> Any:
    import torch

    gen = torch.Generator().manual_seed(seed)
    # Stay clear of special ids at the ends of the vocabulary.
    return torch.randint(10, max(11, vocab - 10), (batch, length), generator=gen).to(devices(device)[0])


def _vocab_size(model: Any) -> int:
    cfg = model.config.get_text_config() if hasattr(model.config, "get_text_config") else model.config
    return int(cfg.vocab_size)


class _Peak:
    """Peak device memory over a block (CUDA only)."""

    def __init__(self, device: str) -> None:
        self.device = device
        self.bytes: int | None = None

    def __enter__(self) -> _Peak:
        if is_cuda(self.device):
            import torch

            for dev in devices(self.device):
                torch.cuda.synchronize(dev)
                torch.cuda.reset_peak_memory_stats(dev)
        return self

    def __exit__(self, *exc: object) -> None:
        if is_cuda(self.device):
            import torch

            sync(self.device)
            # a split model: the sum of every GPU's peak
            self.bytes = sum(int(torch.cuda.max_memory_allocated(dev)) for dev in devices(self.device))


@contextlib.contextmanager
def _released(device: str) -> Iterator[None]:
    try:
        yield
    finally:
        gc.collect()
        if is_cuda(device):
            import torch

            torch.cuda.empty_cache()


def measure_prefill(
    model: Any, device: str, settings: DecodeSettings, reporter: Reporter | None = None
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
                        sync(device)
                        t0 = time.perf_counter()
                        tok = dec.prefill(ids)
                        int(tok[0, 0].item())  # the first token reaches the host
                        elapsed = time.perf_counter() - t0
                        if i >= settings.warmup:
                            times.append(elapsed)
                    dec.close()
                    del dec
            except torch.cuda.OutOfMemoryError as exc:
                out[str(plen)] = {"error": short_error(exc)}
                continue
            out[str(plen)] = {
                "tokens_per_s": summary([plen / t for t in times]),
                "ttft_ms": summary([1e3 * t for t in times]),
                "peak_memory_bytes": peak.bytes,
            }
    return out


PROBE_STEPS = 8  # tokens of the first warm-up, which prices a whole run
MIN_RUN_STEPS = 32  # a timed run is never cut shorter than this to fit a point's time budget

DecoderHook = Callable[[int, "StaticDecoder", Any, int], None]


def _timed_runs(
    dec: StaticDecoder, first: Any, position: int, steps: int, batch: int, settings: DecodeSettings
) -> tuple[list[float], list[float], int]:
    """Warm-up and timed decode runs of one point, within ``settings.max_seconds_per_point``.

    A slow step (eager decoding, a CPU) would make 2 warm-ups + 5 repetitions of 128 tokens cost minutes.
    The first warm-up is a short probe (``PROBE_STEPS`` tokens) that prices a whole run: a fast point then
    gets its warm-ups and repetitions as asked; a slow one gets no more warm-ups (the probe was one) and the
    repetitions the budget holds, never below 2 (a spread needs two); when even two whole runs would overrun
    it, the runs are shortened to fit (never below ``MIN_RUN_STEPS`` tokens). Returns per-step seconds, tokens/s
    per run, runs (the tokens of a run: per-step seconds / runs).
    """
    budget = settings.max_seconds_per_point
    warmup, reps = settings.warmup, settings.repetitions
    per_step: list[float] = []
    rates: list[float] = []
    if warmup:
        n = min(steps, PROBE_STEPS)
        t0 = time.perf_counter()
        dec.run(first, position, n)
        probe = time.perf_counter() - t0
        one = probe * steps / n  # a whole run, priced from the probe
        if (warmup - 1 + reps) * one + probe > budget:
            warmup, reps = 0, max(2, min(reps, int((budget - probe) / max(one, 1e-9))))
            if reps * one + probe > budget and steps > MIN_RUN_STEPS:
                # even two whole runs overrun the budget (eager int8 on a GPU: 11 s a 128-token run): shorter
                # runs, never under MIN_RUN_STEPS tokens; the result says how long they were
                per_token = probe / n
                steps = max(MIN_RUN_STEPS, min(steps, int((budget - probe) / reps / max(per_token, 1e-12))))
        else:
            warmup -= 1 if n == steps else 0  # a probe as long as a run counts as a warm-up
    done = 0  # runs made after the probe, warm-ups included
    while done < warmup + reps:
        t0 = time.perf_counter()
        t = dec.run(first, position, steps)
        one = time.perf_counter() - t0
        if done >= warmup:
            per_step.extend(t)
            rates.append(batch * steps / sum(t))
        done += 1
        if done == 1 and warmup == 0 and reps * one > budget:
            # no warm-up asked: the first timed run prices the rest
            reps = max(2, min(reps, 1 + int((budget - one) / max(one, 1e-9))))
    return per_step, rates, len(rates)


def measure_decode(
    model: Any,
    device: str,
    settings: DecodeSettings,
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
    chain = mode_chain(settings.decode_mode, device)
    results: dict[str, Any] = {}
    notes: list[str] = []
    failed: set[str] = set()
    if chain != ["eager"] and has_int8_outlier_path(model):
        # Measured on an H200: the capture fails ("operation failed due to a previous error during capture")
        # after a compile that cost ~80 s of the measurement, every time; with decode_mode graph as well. A
        # recipe's decode mode applies to every variant, so an explicit one is not an error here: the result
        # says which mode ran and why.
        asked = "" if settings.decode_mode == "auto" else f" (decode mode {settings.decode_mode} was asked)"
        chain = ["eager"]
        notes.append(
            "bitsandbytes int8 with an outlier threshold finds outlier columns of data-dependent shape in every "
            f"matmul (a host synchronization), so no CUDA graph can capture its step: measured eagerly{asked}"
        )
    if "compile" in chain:
        reset_compiler()
        teach_compiler_kernels()
    for batch in settings.batch_sizes:
        with _released(device), rep.step(f"decode at batch {batch}"):
            dec: StaticDecoder | None = None
            started = time.perf_counter()
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
                            note = f"{MODE_NAMES[mode]} failed at batch {batch}: {short_error(exc)}"
                            if mode == chain[-1] and mode != "eager":
                                # an explicit --decode-mode compile/graph: no slower mode to fall back to
                                raise BackendUnavailableError(
                                    f"decode mode {mode} ({note}); nothing else was tried, since that mode was asked.",
                                    "Use decode mode auto (it falls back to the next mode and says so) or eager.",
                                ) from exc
                            if mode == chain[-1]:
                                raise
                            notes.append(note)
                            rep.info(note)
                            failed.add(mode)
                            sync(device)
                    assert mode_used is not None
                    if dec.verified is False:
                        notes.append(f"batch {batch}: graph not checked against eager (logits not finite)")
                    prepared_at = time.perf_counter()
                    per_step, rates, runs = _timed_runs(dec, first, ctx, steps, batch, settings)
                    run_tokens = len(per_step) // max(runs, 1)
                    if runs < settings.repetitions or run_tokens < steps:
                        shorter = f" of {run_tokens} tokens instead of {steps}" if run_tokens < steps else ""
                        notes.append(
                            f"batch {batch}: {runs} timed runs{shorter} of {settings.repetitions} asked "
                            f"(one run took {sum(per_step) / runs:.1f} s; budget {settings.max_seconds_per_point:g} s "
                            "a point)"
                        )
                    timed_at = time.perf_counter()
                    if on_decoder is not None:
                        on_decoder(batch, dec, first, ctx)
            except torch.cuda.OutOfMemoryError as exc:
                results[str(batch)] = {"error": short_error(exc)}
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
                "repetitions": len(rates),
                "tokens_per_run": len(per_step) // max(len(rates), 1),
                # where a point's wall time went: prompt + compile + capture + replay check, then the timed runs
                "seconds": {"prepare": round(prepared_at - started, 2), "timed": round(timed_at - prepared_at, 2)},
            }
    modes = sorted({r["decode_mode"] for r in results.values() if "decode_mode" in r})
    breaks = graph_breaks() if "compile" in chain else 0
    if breaks:
        notes.append(f"torch.compile split the step at {breaks} graph break(s) (still one CUDA graph)")
    if len(devices(device)) > 1:
        notes.append(f"layers split over {device}: no CUDA graph across devices, decoding ran eagerly (eager-static)")
    return {
        "decode": results,
        "decode_mode": "/".join(modes) if modes else None,
        "decode_mode_note": "; ".join(notes) or None,
    }


def measure_model(
    model: Any,
    device: str,
    settings: DecodeSettings,
    reporter: Reporter | None = None,
    on_decoder: DecoderHook | None = None,
) -> dict[str, Any]:
    """Serving-speed measurement of a loaded transformers causal LM (the engine; no loading)."""
    import torch

    settings = settings.resolved(device)
    gpus = devices(device)
    bw = copy_bandwidth(gpus[0])
    weight_bytes = weight_bytes_per_step(model)
    # no_grad rather than inference_mode: the static cache is updated in place across calls and graphs.
    with torch.no_grad():
        t0 = time.perf_counter()
        prefill = measure_prefill(model, device, settings, reporter)
        t1 = time.perf_counter()
        decode = measure_decode(model, device, settings, reporter, on_decoder)
        t2 = time.perf_counter()
    peaks = [r.get("peak_memory_bytes") for r in [*prefill.values(), *decode["decode"].values()]]
    peaks_known = [p for p in peaks if p is not None]
    result: dict[str, Any] = {
        "prefill": prefill,
        **decode,
        "ttft_ms": (prefill.get(str(settings.context_len)) or {}).get("ttft_ms", {}).get("median"),
        "peak_memory_bytes": max(peaks_known) if peaks_known else None,
        "weight_bytes_per_step": weight_bytes,
        "seconds": {"prefill": round(t1 - t0, 2), "decode": round(t2 - t1, 2)},
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
