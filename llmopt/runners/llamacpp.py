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

Process: llama.cpp runs in a child (``llamacpp_worker.serve``), scoring and timing alike, so a crash
inside it (SIGSEGV/SIGILL on a CPU the build does not suit) is an llmopt error with exit code 4 that
names the signal and the rebuild command, never a dead caller. Only NLLs cross the pipe.
"""

from __future__ import annotations

import os
import statistics
import time
from pathlib import Path
from typing import Any, NoReturn

from llmopt.environment import cpu_count
from llmopt.errors import ArtifactError, BackendUnavailableError, InputError
from llmopt.runners.base import BaseRunner, LoadRequest
from llmopt.stats import percentile, summary

KV_CACHE_TYPE = "f16"


def default_threads() -> int:
    env = os.environ.get("LLMOPT_THREADS")
    if env and env.isdigit() and int(env) > 0:
        return int(env)
    return cpu_count()


def find_gguf(path: Path) -> Path:
    """The model file of a GGUF artifact (a single .gguf file is also accepted)."""
    if path.is_file() and path.suffix == ".gguf":
        _check_magic(path)
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
    _check_magic(files[0])
    return files[0]


def _check_magic(path: Path) -> None:
    with open(path, "rb") as f:
        magic = f.read(4)
    if magic != b"GGUF":
        raise ArtifactError(
            f"{path} is not a GGUF file: it starts with {magic!r}, not b'GGUF'.",
            "The file was damaged or replaced: re-create the artifact with `llmopt quantize --method gguf`.",
        )


def _check_llama_cpp() -> None:
    import importlib.util

    if importlib.util.find_spec("llama_cpp") is None:
        raise BackendUnavailableError(
            "evaluating a GGUF artifact needs llama-cpp-python.",
            "Run `python scripts/build_llamacpp.py` (builds and installs it), then pip install -e '.[gguf]'.",
        )


def _signal_name(returncode: int) -> str:
    import signal

    try:
        return signal.Signals(-returncode).name
    except ValueError:
        return f"signal {-returncode}"


class LlamaCppRunner(BaseRunner):
    """llama.cpp in a child process (llamacpp_worker.serve): a crash there is an llmopt error here."""

    name = "llamacpp"

    @classmethod
    def open(cls, request: LoadRequest) -> LlamaCppRunner:
        from llmopt.placement import resolve_target

        return cls(request.path, resolve_target(request.device).primary)

    def __init__(self, path: Path, device: str, *, threads: int | None = None) -> None:
        _check_llama_cpp()
        self.model_path = find_gguf(Path(path)).resolve()
        self.device = device
        self.threads = threads or default_threads()
        self.n_gpu_layers = -1 if device.startswith("cuda") else 0
        self.dtype = f"f32 compute, {KV_CACHE_TYPE} KV cache (llama.cpp)"
        self._proc: Any = None
        self._log: Any = None
        self._doing = ""
        start = time.perf_counter()
        self._start()
        gpu = self.n_gpu_layers != 0
        try:
            info = self._call("open", "loading", path=str(self.model_path), threads=self.threads, gpu=gpu)
        except BaseException:
            self.close()
            raise
        if not info["gpu_offload"]:
            self.close()
            raise BackendUnavailableError(
                f"device '{device}' was asked for, but this llama-cpp-python build is CPU-only.",
                "Rebuild it with `python scripts/build_llamacpp.py --cuda`, or use --device cpu.",
            )
        self._n_vocab = int(info["n_vocab"])
        self._footprint = int(info["footprint"])
        self.load_seconds = time.perf_counter() - start

    def _start(self) -> None:
        import subprocess
        import sys
        import tempfile

        env = dict(os.environ)
        env.setdefault("OMP_WAIT_POLICY", "passive")
        # llmopt itself must be importable by the child exactly as it is here (a checkout or an install).
        package_root = str(Path(__file__).resolve().parents[2])
        env["PYTHONPATH"] = os.pathsep.join(p for p in (package_root, env.get("PYTHONPATH", "")) if p)
        self._log = tempfile.TemporaryFile()  # noqa: SIM115 - closed in close(); the child's stderr: its tail goes into a crash message
        self._proc = subprocess.Popen(
            [sys.executable, "-m", "llmopt.runners.llamacpp_worker", "serve"],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=self._log,
            env=env,
        )

    def _call(self, op: str, doing: str, **kw: Any) -> Any:
        from llmopt.runners.llamacpp_worker import receive, send

        if self._proc is None:
            raise BackendUnavailableError("the llama.cpp process is closed.", "Load the artifact again.")
        try:
            send(self._proc.stdin, (op, kw))
            reply = receive(self._proc.stdout)
        except (EOFError, BrokenPipeError, OSError):
            self._died(doing)
        if reply[0] == "ok":
            return reply[1]
        if str(reply[1]).startswith(("ModuleNotFoundError", "ImportError", "OSError")):
            raise BackendUnavailableError(
                f"llama-cpp-python cannot be loaded here: {reply[1]}",
                "Run `python scripts/build_llamacpp.py` (it builds, installs and smoke-checks it).",
            )
        if op == "open" and str(reply[1]).startswith("ValueError"):  # llama-cpp-python: a file it cannot load
            raise ArtifactError(
                f"llama.cpp could not load {self.model_path}: {reply[1]}",
                "Re-create the artifact with `llmopt quantize --method gguf`, or check `llmopt backends`.",
            )
        raise RuntimeError(f"llama.cpp worker failed while {doing} {self.model_path}: {reply[1]}\n{reply[2]}")

    def _died(self, doing: str) -> NoReturn:
        proc, self._proc = self._proc, None
        try:
            code = proc.wait(timeout=30)
        except Exception:
            proc.kill()
            code = proc.wait()
        tail = ""
        if self._log is not None:
            self._log.seek(0)
            lines = [ln for ln in self._log.read().decode("utf-8", "replace").splitlines() if ln.strip()]
            tail = "\n    ".join(lines[-6:])
        how = f"was killed by {_signal_name(code)}" if code < 0 else f"exited with code {code}"
        if code == -9:
            likely = "killed from outside, most often by the kernel for want of memory"
        elif code < 0:
            likely = (
                "llama.cpp was likely built for another CPU, or hit a CPU-specific kernel bug "
                "(e.g. ggml's AMX path on AVX-512/AMX Xeons)"
            )
        else:
            likely = "llama.cpp stopped the process"
        raise BackendUnavailableError(
            f"llama.cpp {how} while {doing} {self.model_path}: {likely}." + (f"\n    {tail}" if tail else ""),
            "Rebuild it portable and smoke-checked on this CPU: `python scripts/build_llamacpp.py --rebuild`; "
            "`llmopt backends` says whether the build decodes here.",
        )

    @property
    def n_vocab(self) -> int:
        return self._n_vocab

    def nll(self, windows: list[list[int]], score_from: list[int]) -> list[list[float]]:
        self._check_ids(windows)
        result: list[list[float]] = self._call("nll", "scoring with", windows=windows, score_from=score_from)
        return result

    def _check_ids(self, windows: list[list[int]]) -> None:
        for ids in windows:
            if len(ids) < 2:
                raise InputError("a window needs at least 2 tokens.", "Use a larger --context.")
            if max(ids) >= self._n_vocab or min(ids) < 0:
                raise InputError(
                    f"token id {max(ids)} is outside the GGUF model's vocabulary ({self._n_vocab}).",
                    "Evaluate against the baseline the artifact was made from.",
                )

    def kld_compare(self, windows: list[list[int]], score_from: list[int], refs: list[Any]) -> list[Any]:
        """Per-token (KL, top-1 agreement, NLL) against FP16's reference rows, computed in the child."""
        self._check_ids(windows)
        result: list[Any] = self._call("kld", "scoring with", windows=windows, score_from=score_from, refs=refs)
        return result

    def footprint_bytes(self) -> int:
        """Bytes of the model's tensors as llama.cpp holds them (KV cache and logits excluded, as for HF)."""
        return self._footprint

    def _timed_runs(self, prompt_len: int, gen_len: int, warmup: int, repeats: int) -> list[dict[str, Any]]:
        """Prompt of ``prompt_len`` fixed token ids, then ``gen_len`` single-token decodes, timed (in the child).

        A fresh context without ``logits_all`` (as served); fixed next tokens instead of sampling, so
        only llama.cpp's decode is timed. Wall-clock around each llama_decode call (what a caller sees,
        llama-cpp-python's Python overhead included) and llama.cpp's own counters (time inside decode).
        """
        if prompt_len < 1 or gen_len < 1:
            raise InputError("prompt and generation lengths must be at least 1.", "Pass positive lengths.")
        runs: list[dict[str, Any]] = self._call(
            "timed_runs", "timing", prompt_len=prompt_len, gen_len=gen_len, warmup=warmup, repeats=repeats
        )
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
            "token_latency_ms_p95": 1000 * percentile(steps, 95),
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
        proc, self._proc = self._proc, None
        if proc is not None:
            from llmopt.runners.llamacpp_worker import send

            try:
                send(proc.stdin, ("close", {}))
                proc.stdin.close()
                proc.wait(timeout=10)
            except Exception:  # already dead, or stuck: it must not outlive us
                proc.kill()
                proc.wait()
            proc.stdout.close()
        if self._log is not None:
            self._log.close()
            self._log = None

    def __del__(self) -> None:
        if getattr(self, "_proc", None) is not None:
            self._proc.kill()
