"""The child process that runs llama.cpp for llmopt, and llama.cpp's smoke check.

llama.cpp can die on a CPU it was not built for (SIGSEGV/SIGILL inside ggml, e.g. its AMX path on
AVX-512/AMX Xeons); in-process that takes the caller down with a bare exit 139. So llmopt's
llama.cpp runner talks to this module in a child process (``serve``): requests and answers are
pickled frames over the child's stdin and a private copy of its stdout (fd 1 itself is pointed at
stderr, so nothing llama.cpp prints can corrupt the stream). Scoring answers carry per-token NLLs
(and for the KL divergence per-token values computed here against FP16's top-K rows sent in), not
logits, so the pipe moves a few KB per window (about 1 MB of reference rows per window going in).

``smoke`` writes a tiny random Llama GGUF with the converter's gguf-py, quantizes it to the types
whose kernels differ by CPU (q8_0, q4_0, q4_1, q4_k_m), decodes each and compares its logits with the
f16 file's; it prints one JSON line. ``scripts/build_llamacpp.py`` runs it right after a build, and
``llmopt backends`` where the build's stamp does not name this CPU.
"""

from __future__ import annotations

import json
import os
import pickle
import platform
import struct
import sys
import time
from pathlib import Path
from typing import Any, BinaryIO

# cpuinfo flags that decide which ggml CPU kernels run
CPU_FLAGS = (
    "sse4_2", "avx", "avx2", "fma", "f16c", "bmi2", "avx_vnni", "avx512f", "avx512bw", "avx512vl",
    "avx512_vnni", "avx512_bf16", "amx_tile", "amx_int8", "amx_bf16", "asimd", "sve",
)  # fmt: skip
SMOKE_TYPES = (("q8_0", 7, 0.08), ("q4_0", 2, 0.35), ("q4_1", 3, 0.35), ("q4_k_m", 15, 0.35))


def cpu_identity() -> dict[str, Any]:
    """This CPU's model name and the instruction-set flags ggml's kernels depend on."""
    model = platform.processor() or platform.machine()
    flags: set[str] = set()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            key, _, value = line.partition(":")
            key = key.strip()
            if key in ("model name", "Model", "CPU part") and model in ("", platform.machine(), platform.processor()):
                model = value.strip()
            elif key in ("flags", "Features") and not flags:
                flags = set(value.split())
    except OSError:  # not Linux: the model name alone
        pass
    return {"model": model, "machine": platform.machine(), "flags": sorted(f for f in CPU_FLAGS if f in flags)}


def same_cpu(a: dict[str, Any] | None, b: dict[str, Any]) -> bool:
    return bool(a) and a.get("model") == b.get("model") and a.get("flags") == b.get("flags")  # type: ignore[union-attr]


# --- framing ------------------------------------------------------------------------------------------


def send(stream: BinaryIO, obj: Any) -> None:
    data = pickle.dumps(obj, protocol=pickle.HIGHEST_PROTOCOL)
    stream.write(struct.pack("<Q", len(data)) + data)
    stream.flush()


def receive(stream: BinaryIO) -> Any:
    head = stream.read(8)
    if len(head) < 8:
        raise EOFError
    (n,) = struct.unpack("<Q", head)
    data = stream.read(n)
    if len(data) < n:
        raise EOFError
    return pickle.loads(data)  # our own child process, over its private pipe


# --- llama.cpp, in the child ----------------------------------------------------------------------------


class _Model:
    def __init__(self, model_path: str, threads: int, gpu: bool) -> None:
        os.environ.setdefault("OMP_WAIT_POLICY", "passive")  # read when llama.cpp's library loads
        import llama_cpp

        self.lc = llama_cpp
        self.path, self.threads = model_path, threads
        self.n_gpu_layers = -1 if gpu else 0
        self.llm: Any = None
        self.n_ctx = 0

    def open(self, n_ctx: int, logits_all: bool) -> Any:
        return self.lc.Llama(
            model_path=self.path,
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

    def context(self, n_ctx: int) -> Any:
        """A context of exactly the window length (reopened when the length changes)."""
        if self.llm is None or self.n_ctx != n_ctx:
            if self.llm is not None:
                self.llm.close()
            self.llm = self.open(n_ctx, True)
            self.n_ctx = n_ctx
        return self.llm

    def logits(self, ids: list[int]) -> Any:
        llm = self.context(len(ids))
        llm.reset()  # n_tokens = 0: eval() then clears the whole KV cache before this window
        llm.eval(ids)
        return llm.scores[: len(ids)]

    def nll(self, windows: list[list[int]], score_from: list[int]) -> list[list[float]]:
        import numpy as np

        out: list[list[float]] = []
        for ids, first in zip(windows, score_from, strict=True):
            logits = self.logits(ids)[: len(ids) - 1]  # row t predicts token t+1
            targets = np.asarray(ids[1:], dtype=np.int64)
            nll = np.empty(len(targets), dtype=np.float64)
            for lo in range(0, len(targets), 64):  # float64 log-softmax, a few rows at a time
                rows = logits[lo : lo + 64].astype(np.float64)
                peak = rows.max(axis=1, keepdims=True)
                lse = np.log(np.exp(rows - peak).sum(axis=1)) + peak[:, 0]
                nll[lo : lo + 64] = lse - rows[np.arange(len(rows)), targets[lo : lo + 64]]
            out.append(nll[max(first, 1) - 1 :].tolist())
        return out

    def kld(self, windows: list[list[int]], score_from: list[int], refs: list[Any]) -> list[Any]:
        """Per-token (KL, top-1 agreement, NLL) against FP16's reference rows (evaluate/kld.py), computed here
        so that only per-token values cross the pipe, never logits."""
        import numpy as np

        from llmopt.evaluate.kld import compare_rows_numpy

        out = []
        for ids, first, ref in zip(windows, score_from, refs, strict=True):
            start = max(first, 1) - 1
            logits = self.logits(ids)[start : len(ids) - 1]  # row t predicts token t+1
            out.append(compare_rows_numpy(logits, np.asarray(ids[1:], dtype=np.int64)[start:], ref))
        return out

    def timed_runs(self, prompt_len: int, gen_len: int, warmup: int, repeats: int) -> list[dict[str, Any]]:
        lc = self.lc
        llm = self.open(prompt_len + gen_len, False)
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

    def close(self) -> None:
        if self.llm is not None:
            self.llm.close()
            self.llm = None


def serve() -> None:
    """Answer the parent's requests until it says close or its end of the pipe goes away."""
    import signal

    # Ctrl-C reaches the whole process group: the parent handles it and ends this child.
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    proto_out = os.fdopen(os.dup(1), "wb")
    os.dup2(2, 1)
    proto_in = os.fdopen(os.dup(0), "rb")
    model: _Model | None = None
    while True:
        try:
            op, kw = receive(proto_in)
        except EOFError:
            return
        try:
            if op == "open":
                start = time.perf_counter()
                model = _Model(kw["path"], kw["threads"], kw["gpu"])
                if kw["gpu"] and not model.lc.llama_supports_gpu_offload():
                    send(proto_out, ("ok", {"gpu_offload": False}))
                    continue
                llm = model.context(512)
                result: Any = {
                    "gpu_offload": True,
                    "n_vocab": int(llm.n_vocab()),
                    "footprint": int(model.lc.llama_model_size(llm.model)),
                    "load_seconds": time.perf_counter() - start,
                }
            elif op == "nll":
                assert model is not None
                result = model.nll(kw["windows"], kw["score_from"])
            elif op == "kld":
                assert model is not None
                result = model.kld(kw["windows"], kw["score_from"], kw["refs"])
            elif op == "timed_runs":
                assert model is not None
                result = model.timed_runs(kw["prompt_len"], kw["gen_len"], kw["warmup"], kw["repeats"])
            elif op == "close":
                if model is not None:
                    model.close()
                send(proto_out, ("ok", None))
                return
            else:
                raise ValueError(f"unknown request {op!r}")
            send(proto_out, ("ok", result))
        except Exception as exc:
            import traceback

            send(proto_out, ("error", f"{type(exc).__name__}: {exc}", traceback.format_exc()))


# --- smoke check --------------------------------------------------------------------------------------


def _write_tiny_llama(path: Path, gguf: Any, seed: int = 0) -> list[int]:
    """A 2-layer random Llama whose rows are 256 wide (k-quants need that); returns token ids to decode."""
    import numpy as np

    rng = np.random.default_rng(seed)
    n_vocab, n_embd, n_ff, n_head, n_layer = 512, 256, 512, 4, 2
    w = gguf.GGUFWriter(str(path), "llama")
    w.add_name("llmopt-smoke")
    w.add_context_length(256)
    w.add_embedding_length(n_embd)
    w.add_feed_forward_length(n_ff)
    w.add_block_count(n_layer)
    w.add_head_count(n_head)
    w.add_head_count_kv(n_head)
    w.add_rope_dimension_count(n_embd // n_head)
    w.add_layer_norm_rms_eps(1e-5)
    w.add_file_type(1)  # mostly f16
    w.add_tokenizer_model("llama")
    w.add_token_list([f"<t{i}>".encode() for i in range(n_vocab)])
    w.add_token_scores([0.0] * n_vocab)
    w.add_token_types([1] * n_vocab)
    w.add_bos_token_id(1)
    w.add_eos_token_id(2)

    def tensor(name: str, *shape: int, scale: float = 0.05) -> None:
        # f16 weights; norms f32 (as the converter writes them)
        if len(shape) == 1:
            w.add_tensor(name, np.ones(shape, dtype=np.float32))
        else:
            w.add_tensor(name, (rng.standard_normal(shape) * scale).astype(np.float16))

    tensor("token_embd.weight", n_vocab, n_embd, scale=1.0)
    for i in range(n_layer):
        tensor(f"blk.{i}.attn_norm.weight", n_embd)
        for t in ("attn_q", "attn_k", "attn_v", "attn_output"):
            tensor(f"blk.{i}.{t}.weight", n_embd, n_embd)
        tensor(f"blk.{i}.ffn_norm.weight", n_embd)
        tensor(f"blk.{i}.ffn_gate.weight", n_ff, n_embd)
        tensor(f"blk.{i}.ffn_up.weight", n_ff, n_embd)
        tensor(f"blk.{i}.ffn_down.weight", n_embd, n_ff)
    tensor("output_norm.weight", n_embd)
    tensor("output.weight", n_vocab, n_embd)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return [int(x) for x in rng.integers(3, n_vocab, size=48)]


def smoke(converter: Path | None, work: Path, threads: int = 2) -> dict[str, Any]:
    """Decode a tiny f16 model and its q8_0/q4_0/q4_1/q4_k_m quantizations; compare logits with f16's."""
    import ctypes

    import numpy as np

    if converter is not None and (converter / "gguf-py").is_dir():
        sys.path.insert(0, str(converter / "gguf-py"))  # the writer of the same llama.cpp version
    import gguf
    import llama_cpp

    work.mkdir(parents=True, exist_ok=True)
    f16 = work / "smoke-F16.gguf"
    ids = _write_tiny_llama(f16, gguf)
    llama_cpp.llama_backend_init()

    def logits(path: Path) -> Any:
        model = _Model(str(path), threads, False)
        try:
            return np.array(model.logits(ids), dtype=np.float64)
        finally:
            model.close()

    ref = logits(f16)
    if not np.isfinite(ref).all():
        return {"ok": False, "checked": ["f16"], "problem": "the f16 model's logits are not finite"}
    checked: dict[str, float] = {}
    for name, ftype, tol in SMOKE_TYPES:
        out = work / f"smoke-{name}.gguf"
        params = llama_cpp.llama_model_quantize_default_params()
        params.ftype, params.nthread = ftype, threads
        if llama_cpp.llama_model_quantize(str(f16).encode(), str(out).encode(), ctypes.byref(params)) != 0:
            problem = f"llama.cpp could not quantize the tiny model to {name}"
            return {"ok": False, "checked": checked, "problem": problem}
        got = logits(out)
        if not np.isfinite(got).all():
            return {"ok": False, "checked": checked, "problem": f"{name} logits are not finite"}
        rel = float(np.linalg.norm(got - ref) / np.linalg.norm(ref))
        checked[name] = round(rel, 4)
        if rel > tol:
            return {
                "ok": False,
                "checked": checked,
                "problem": f"{name} logits differ from f16's by {rel:.3f} (relative; at most {tol} expected)",
            }
    return {"ok": True, "checked": checked, "tokens": len(ids)}


def main(argv: list[str]) -> None:
    if argv[:1] == ["serve"]:
        serve()
        return
    if argv[:1] == ["smoke"]:
        import argparse
        import tempfile

        parser = argparse.ArgumentParser(prog="python -m llmopt.runners.llamacpp_worker smoke")
        parser.add_argument("--converter", type=Path, default=None)
        parser.add_argument("--threads", type=int, default=2)
        args = parser.parse_args(argv[1:])
        with tempfile.TemporaryDirectory(prefix="llmopt-smoke-") as tmp:
            start = time.perf_counter()
            result = smoke(args.converter, Path(tmp), args.threads)
        result["cpu"] = cpu_identity()
        result["seconds"] = round(time.perf_counter() - start, 2)
        print(json.dumps(result), flush=True)
        raise SystemExit(0 if result["ok"] else 3)
    raise SystemExit("usage: python -m llmopt.runners.llamacpp_worker serve|smoke [--converter DIR]")


if __name__ == "__main__":
    main(sys.argv[1:])
