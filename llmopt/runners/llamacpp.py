"""Runner over llama.cpp (llama-cpp-python) for GGUF artifacts.

Scoring follows the evaluation protocol exactly: the baseline's token ids are fed to llama.cpp as
they are (llama.cpp's own tokenizer is never used), one window at a time in a context of exactly the
window length, with the KV cache cleared before each window. ``logits_all=True`` keeps the logits of
every position (n_ctx x vocab floats); with it off, llama-cpp-python keeps none (NOTES).

Computation: llama.cpp's CPU path computes in f32 with the file's weight types and an f16 KV cache
(its default, as it is served), which the report's ``dtype`` says.

Threads: $LLMOPT_THREADS, else every CPU this process may use. OpenMP threads that spin while
waiting slow llama.cpp down badly when anything else runs on the machine, so OMP_WAIT_POLICY is set
to passive (unless already set) before llama.cpp's library is loaded.
"""

from __future__ import annotations

import os
import statistics
import time
from pathlib import Path
from typing import Any

from llmopt.errors import ArtifactError, BackendUnavailableError, InputError

KV_CACHE_TYPE = "f16"


def default_threads() -> int:
    env = os.environ.get("LLMOPT_THREADS")
    if env and env.isdigit() and int(env) > 0:
        return int(env)
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except AttributeError:  # not on Linux
        return max(1, os.cpu_count() or 1)


def find_gguf(path: Path) -> Path:
    """The model file of a GGUF artifact (a single .gguf file is also accepted)."""
    if path.is_file() and path.suffix == ".gguf":
        return path
    manifest = path / "llmopt.json"
    if manifest.is_file():
        import json

        try:
            resolved = json.loads(manifest.read_text()).get("options", {}).get("_resolved", {})
        except ValueError:
            resolved = {}
        name = resolved.get("gguf_file") if isinstance(resolved, dict) else None
        if name and (path / name).is_file():
            return path / name
    files = sorted(p for p in path.glob("*.gguf") if "imatrix" not in p.name)
    if len(files) != 1:
        raise ArtifactError(
            f"{path} holds {len(files)} GGUF model files; a GGUF artifact holds exactly one.",
            "Re-create the artifact with `llmopt quantize --method gguf`.",
        )
    return files[0]


def _import_llama_cpp() -> Any:
    # Read by the OpenMP runtime when llama.cpp's library loads, so it must be set before the import.
    os.environ.setdefault("OMP_WAIT_POLICY", "passive")
    try:
        import llama_cpp
    except ImportError:
        raise BackendUnavailableError(
            "evaluating a GGUF artifact needs llama-cpp-python.",
            "Run `python scripts/build_llamacpp.py` (builds and installs it), or pip install 'llmopt[gguf]'.",
        ) from None
    return llama_cpp


class LlamaCppRunner:
    name = "llamacpp"

    def __init__(self, path: Path, device: str, *, threads: int | None = None) -> None:
        llama_cpp = _import_llama_cpp()
        self._llama_cpp = llama_cpp
        self.model_path = find_gguf(Path(path))
        self.device = device
        self.threads = threads or default_threads()
        self.n_gpu_layers = 0
        if device.startswith("cuda"):
            if not llama_cpp.llama_supports_gpu_offload():
                raise BackendUnavailableError(
                    f"device '{device}' was asked for, but this llama-cpp-python build is CPU-only.",
                    "Rebuild it with `python scripts/build_llamacpp.py --cuda`, or use --device cpu.",
                )
            self.n_gpu_layers = -1
        self.dtype = f"f32 compute, {KV_CACHE_TYPE} KV cache (llama.cpp)"
        self._llm: Any = None
        self._n_ctx = 0
        start = time.perf_counter()
        self._llm = self._open(n_ctx=512, logits_all=True)
        self._n_ctx = 512
        self.load_seconds = time.perf_counter() - start

    def _open(self, *, n_ctx: int, logits_all: bool) -> Any:
        return self._llama_cpp.Llama(
            model_path=str(self.model_path),
            n_ctx=n_ctx,
            n_batch=n_ctx,
            n_ubatch=min(n_ctx, 512),
            n_threads=self.threads,
            n_threads_batch=self.threads,
            n_gpu_layers=self.n_gpu_layers,
            logits_all=logits_all,
            seed=0,
            verbose=False,
        )

    def _context_for(self, n_ctx: int) -> Any:
        """A context of exactly the window length (reopened when the length changes)."""
        if self._llm is None or self._n_ctx != n_ctx:
            if self._llm is not None:
                self._llm.close()
            self._llm = self._open(n_ctx=n_ctx, logits_all=True)
            self._n_ctx = n_ctx
        return self._llm

    @property
    def n_vocab(self) -> int:
        return int(self._llm.n_vocab())

    def nll(self, windows: list[list[int]], score_from: list[int]) -> list[list[float]]:
        import numpy as np

        out: list[list[float]] = []
        for ids, first in zip(windows, score_from, strict=True):
            if len(ids) < 2:
                raise InputError("a window needs at least 2 tokens.", "Use a larger --context.")
            n_vocab = self._context_for(len(ids)).n_vocab()
            if max(ids) >= n_vocab or min(ids) < 0:
                raise InputError(
                    f"token id {max(ids)} is outside the GGUF model's vocabulary ({n_vocab}).",
                    "Evaluate against the baseline the artifact was made from.",
                )
            llm = self._llm
            llm.reset()  # n_tokens = 0: eval() then clears the whole KV cache before this window
            llm.eval(ids)
            logits = llm.scores[: len(ids) - 1]  # row t predicts token t+1
            targets = np.asarray(ids[1:], dtype=np.int64)
            nll = np.empty(len(targets), dtype=np.float64)
            for lo in range(0, len(targets), 64):  # float64 log-softmax, a few rows at a time
                rows = logits[lo : lo + 64].astype(np.float64)
                peak = rows.max(axis=1, keepdims=True)
                lse = np.log(np.exp(rows - peak).sum(axis=1)) + peak[:, 0]
                nll[lo : lo + 64] = lse - rows[np.arange(len(rows)), targets[lo : lo + 64]]
            out.append(nll[max(first, 1) - 1 :].tolist())
        return out

    def footprint_bytes(self) -> int:
        """Bytes of the model's tensors as llama.cpp holds them (KV cache and logits excluded, as for HF)."""
        return int(self._llama_cpp.llama_model_size(self._llm.model))

    def _timed_runs(self, prompt_len: int, gen_len: int, warmup: int, repeats: int) -> list[dict[str, Any]]:
        """Prompt of ``prompt_len`` fixed token ids, then ``gen_len`` single-token decodes, timed.

        A fresh context without ``logits_all`` (as served); fixed next tokens instead of sampling, so
        only llama.cpp's decode is timed. Wall-clock around each llama_decode call (what a caller sees,
        llama-cpp-python's Python overhead included) and llama.cpp's own counters (time inside decode).
        """
        if prompt_len < 1 or gen_len < 1:
            raise InputError("prompt and generation lengths must be at least 1.", "Pass positive lengths.")
        lc = self._llama_cpp
        llm = self._open(n_ctx=prompt_len + gen_len, logits_all=False)
        runs: list[dict[str, Any]] = []
        try:
            n_vocab = llm.n_vocab()
            prompt = [(17 + 7919 * i) % n_vocab for i in range(prompt_len)]
            gen = [(29 + 104729 * i) % n_vocab for i in range(gen_len)]
            for r in range(warmup + repeats):
                llm.reset()
                lc.llama_perf_context_reset(llm.ctx)
                # llama_synchronize: the work is done (GPU backends return early) and llama.cpp's
                # counters book each decode as prompt or generation (they do so only on a sync).
                t0 = time.perf_counter()
                llm.eval(prompt)
                lc.llama_synchronize(llm.ctx)
                prompt_s = time.perf_counter() - t0
                steps = []
                for tok in gen:
                    s = time.perf_counter()
                    llm.eval([tok])
                    lc.llama_synchronize(llm.ctx)
                    steps.append(time.perf_counter() - s)
                perf = lc.llama_perf_context(llm.ctx)
                if r >= warmup:
                    runs.append(
                        {
                            "prompt_s": prompt_s,
                            "steps": steps,
                            "perf_prompt_ms": perf.t_p_eval_ms,
                            "perf_gen_ms": perf.t_eval_ms,
                            "perf_n_gen": perf.n_eval,
                        }
                    )
        finally:
            llm.close()
        return runs

    def speed(self, prompt_len: int = 128, gen_len: int = 64, repeats: int = 3) -> dict[str, Any]:
        """llama.cpp's prompt and generation tokens/s for one sequence (median of runs, 1 warm-up)."""
        runs = self._timed_runs(prompt_len, gen_len, 1, repeats)
        prompt_s = statistics.median(r["prompt_s"] for r in runs)
        gen_s = statistics.median(sum(r["steps"]) for r in runs)
        steps = sorted(s for r in runs for s in r["steps"])
        perf_prompt = statistics.median(r["perf_prompt_ms"] for r in runs)
        perf_gen = statistics.median(r["perf_gen_ms"] for r in runs)
        n_gen = runs[0]["perf_n_gen"] or gen_len
        return {
            "runner": self.name,
            "threads": self.threads,
            "prompt_len": prompt_len,
            "gen_len": gen_len,
            "repeats": repeats,
            "prompt_tokens_per_s": prompt_len / prompt_s,
            "gen_tokens_per_s": gen_len / gen_s,
            "time_to_first_token_s": prompt_s,
            "token_latency_ms_p50": 1000 * statistics.median(steps),
            "token_latency_ms_p95": 1000 * steps[min(len(steps) - 1, int(0.95 * len(steps)))],
            "llama_perf_prompt_tokens_per_s": prompt_len / (perf_prompt / 1000) if perf_prompt > 0 else None,
            "llama_perf_gen_tokens_per_s": n_gen / (perf_gen / 1000) if perf_gen > 0 else None,
            "timing": "wall-clock around each llama_decode call, median of runs after 1 warm-up; "
            "llama_perf_*: llama.cpp's own counters",
        }

    def bench(self, settings: Any, reporter: Any = None) -> dict[str, Any]:
        """``llmopt bench`` protocol (evaluate/throughput.py's result shape), measured through llama.cpp.

        Prefill at each prompt length; decode at batch 1 after the first prompt length. llama.cpp runs
        one sequence per context here, so larger batch sizes are reported as not measured.
        """
        from llmopt.evaluate.throughput import percentile, summary

        settings = settings.resolved("cpu" if not self.device.startswith("cuda") else self.device)
        warm, reps, gen_len = settings.warmup, settings.repetitions, settings.gen_len
        prefill: dict[str, Any] = {}
        for plen in settings.prompt_lens:
            runs = self._timed_runs(plen, 1, warm, reps)
            prefill[str(plen)] = {
                "tokens_per_s": summary([plen / r["prompt_s"] for r in runs]),
                "ttft_ms": summary([1e3 * r["prompt_s"] for r in runs]),
                "peak_memory_bytes": None,
            }
        decode: dict[str, Any] = {}
        for batch in settings.batch_sizes:
            if batch != 1:
                decode[str(batch)] = {"error": "llama.cpp runner: one sequence per context (batch 1 only)"}
                continue
            runs = self._timed_runs(settings.context_len, gen_len, warm, reps)
            ms = [1e3 * s for r in runs for s in r["steps"]]
            decode["1"] = {
                "tokens_per_s": summary([gen_len / sum(r["steps"]) for r in runs]),
                "itl_ms": {"p50": percentile(ms, 50), "p95": percentile(ms, 95), "p99": percentile(ms, 99)},
                "peak_memory_bytes": None,
                "decode_mode": f"llama.cpp ({self.threads} threads)",
            }
        return {
            "prefill": prefill,
            "decode": decode,
            "decode_mode": f"llama.cpp ({self.threads} threads)",
            "decode_mode_note": "wall-clock around llama_decode calls (llama-cpp-python)",
            "ttft_ms": (prefill.get(str(settings.context_len)) or {}).get("ttft_ms", {}).get("median"),
            "peak_memory_bytes": None,
            "weight_bytes_per_step": self.footprint_bytes(),
            "roofline": None,
        }

    def close(self) -> None:
        if self._llm is not None:
            self._llm.close()
            self._llm = None
