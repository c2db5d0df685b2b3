"""GGUF importance matrices: computed with llama-imatrix, read from files (GGUF or legacy ``.dat``), and
handed to ``llama_model_quantize`` by the quantize worker (``python -m llmopt.backends.gguf_imatrix``),
exactly as ``llama-quantize --imatrix`` does. The worker runs in a child process of the GGUF backend
(gguf.py): llama.cpp aborts the process on some errors.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

from llmopt.backends.base import QuantizeInputs
from llmopt.backends.gguf_toolchain import BUILD_SCRIPT, Toolchain, child_env, log_tail
from llmopt.errors import BackendUnavailableError, DataError, OptionsError


def compute_imatrix(
    chain: Toolchain, model: Path, inputs: QuantizeInputs, out: Path, work: Path, threads: int
) -> dict[str, Any]:
    """Run llama-imatrix over the calibration samples (decoded to text: the tool tokenizes itself)."""
    from llmopt.source import load_tokenizer

    calib = inputs.calibration
    assert calib is not None and chain.imatrix_tool is not None and chain.bin is not None
    tokenizer = load_tokenizer(inputs.source.path, trust_remote_code=inputs.source.trust_remote_code)
    text_file = work / "calibration.txt"
    text_file.write_text("".join(str(tokenizer.decode(s)) for s in calib.samples), encoding="utf-8")
    cmd = [
        str(chain.imatrix_tool), "-m", str(model), "-f", str(text_file), "-o", str(out),
        "-c", str(calib.seq_len), "--chunks", str(len(calib.samples)), "-t", str(threads),
        "--no-ppl", "-ofreq", "1000000",
    ]  # fmt: skip
    env = child_env(threads)
    env["LD_LIBRARY_PATH"] = os.pathsep.join(p for p in (str(chain.bin), env.get("LD_LIBRARY_PATH", "")) if p)
    start = time.perf_counter()
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env)
    log = proc.stdout + proc.stderr
    short = re.search(r"you need at least (\d+) tokens.*?tokenizes to only (\d+) tokens", log, re.S)
    if proc.returncode != 0 and short:
        # llama-imatrix wants two chunks' worth of tokens, counted after its own re-tokenization
        raise DataError(
            f"llama-imatrix needs at least {short.group(1)} tokens ({calib.seq_len}-token chunks, two at least); "
            f"the {len(calib.samples)} calibration samples re-tokenize to {short.group(2)}.",
            "Pass more --samples (3 or more), or a smaller --seq-len.",
        )
    if proc.returncode != 0 or not out.is_file():
        raise BackendUnavailableError(
            f"llama-imatrix failed (exit {proc.returncode}):\n    {log_tail(proc.stdout + proc.stderr)}",
            f"Rebuild the tools with `{BUILD_SCRIPT} --rebuild`, or pass --imatrix FILE.",
        )
    chunks = re.findall(r"computing over (\d+) chunks", proc.stdout + proc.stderr)
    return {
        "source": "auto",
        "file": out.name,
        "tool": "llama-imatrix",
        "chunks": int(chunks[-1]) if chunks else None,
        "chunk_tokens": calib.seq_len,
        "seconds": round(time.perf_counter() - start, 2),
    }


# --- importance matrix files (what llama-quantize's loader does) -------------------------------------


def load_imatrix(path: Path) -> tuple[dict[str, list[float]], list[str], int]:
    """Per-tensor importance values, datasets and chunk count from an imatrix file (GGUF or legacy .dat)."""
    with open(path, "rb") as f:
        magic = f.read(4)
    if magic == b"GGUF":
        import numpy as np
        from gguf import GGUFReader

        reader = GGUFReader(path)
        fields = reader.fields
        if not all(k in fields for k in ("imatrix.datasets", "imatrix.chunk_count", "imatrix.chunk_size")):
            raise OptionsError(f"{path} is a GGUF file without imatrix metadata.", "Give a file from llama-imatrix.")
        datasets_field = fields["imatrix.datasets"]
        datasets = [bytes(datasets_field.parts[i]).decode("utf-8", "replace") for i in datasets_field.data]
        chunk_field = fields["imatrix.chunk_count"]
        chunks = int(chunk_field.parts[chunk_field.data[0]][0])
        sums: dict[str, Any] = {}
        counts: dict[str, Any] = {}
        for t in reader.tensors:
            if t.name.endswith(".in_sum2"):
                sums[t.name[: -len(".in_sum2")]] = np.asarray(t.data, dtype=np.float32).reshape(-1)
            elif t.name.endswith(".counts"):
                counts[t.name[: -len(".counts")]] = np.asarray(t.data, dtype=np.float32).reshape(-1)
        values: dict[str, list[float]] = {}
        for name, s in sums.items():
            if name not in counts:
                raise OptionsError(f"{path}: sums without counts for {name}.", "Give a file from llama-imatrix.")
            c = np.rint(counts[name])
            per = s.reshape(len(c), -1)
            out = np.where(c[:, None] > 0, per / np.where(c > 0, c, 1)[:, None], 1.0).astype(np.float32)
            values[name] = out.reshape(-1).tolist()
        return values, datasets, chunks
    return _load_legacy_imatrix(path)


def _load_legacy_imatrix(path: Path) -> tuple[dict[str, list[float]], list[str], int]:
    import struct

    data = path.read_bytes()
    pos = 0

    def take(fmt: str) -> tuple[Any, ...]:
        nonlocal pos
        size = struct.calcsize(fmt)
        if pos + size > len(data):
            raise OptionsError(f"{path} is not an imatrix file (truncated).", "Give a file from llama-imatrix.")
        vals = struct.unpack_from(fmt, data, pos)
        pos += size
        return vals

    (n_entries,) = take("<i")
    if n_entries < 1 or n_entries > 1_000_000:
        raise OptionsError(f"{path} is not an imatrix file.", "Give a file from llama-imatrix (.gguf or .dat).")
    import numpy as np

    values: dict[str, list[float]] = {}
    for _ in range(n_entries):
        (length,) = take("<i")
        name = data[pos : pos + length].decode("utf-8", "replace")
        pos += length
        ncall, nval = take("<ii")
        arr = np.frombuffer(data, dtype="<f4", count=nval, offset=pos)
        pos += 4 * nval
        values[name] = (arr / ncall if ncall > 0 else arr).astype(np.float32).tolist()
    chunks, datasets = 0, []
    if pos + 4 <= len(data):
        (chunks,) = take("<i")
        if pos + 4 <= len(data):
            (length,) = take("<i")
            if length > 0:
                datasets = [data[pos : pos + length].decode("utf-8", "replace")]
    return values, datasets, chunks


def _worker_quantize(
    src: str, dst: str, ftype: int, threads: int, imatrix: str | None, imatrix_label: str, pure: bool
) -> None:
    """Child process: llama.cpp's quantizer, with an importance matrix passed like llama-quantize does."""
    import ctypes

    import llama_cpp

    if imatrix and not hasattr(llama_cpp, "llama_model_imatrix_data"):
        print(
            "error: this llama-cpp-python cannot pass an importance matrix (needs >= 0.3.36)",
            file=sys.stderr,
        )
        raise SystemExit(2)
    llama_cpp.llama_backend_init()
    params = llama_cpp.llama_model_quantize_default_params()
    params.nthread = threads
    params.ftype = ftype
    params.pure = pure
    keep: list[Any] = []  # ctypes buffers must outlive the call
    if imatrix:
        values, datasets, chunks = load_imatrix(Path(imatrix))
        entries = (llama_cpp.llama_model_imatrix_data * (len(values) + 1))()
        for i, (name, vals) in enumerate(values.items()):
            buf = (ctypes.c_float * len(vals))(*vals)
            keep.append(buf)
            entries[i].name = name.encode()
            entries[i].data = ctypes.cast(buf, ctypes.POINTER(ctypes.c_float))
            entries[i].size = len(vals)
        entries[len(values)].name = None  # terminator
        params.imatrix = ctypes.cast(entries, ctypes.POINTER(llama_cpp.llama_model_imatrix_data))
        keep.append(entries)
        # The same metadata llama-quantize records, so both give the same file.
        kvs: list[tuple[str, int, Any]] = [
            ("quantize.imatrix.file", llama_cpp.LLAMA_KV_OVERRIDE_TYPE_STR, imatrix_label)
        ]
        if datasets:
            kvs.append(("quantize.imatrix.dataset", llama_cpp.LLAMA_KV_OVERRIDE_TYPE_STR, datasets[0]))
        kvs.append(("quantize.imatrix.entries_count", llama_cpp.LLAMA_KV_OVERRIDE_TYPE_INT, len(values)))
        if chunks > 0:
            kvs.append(("quantize.imatrix.chunks_count", llama_cpp.LLAMA_KV_OVERRIDE_TYPE_INT, chunks))
        overrides = (llama_cpp.llama_model_kv_override * (len(kvs) + 1))()
        for i, (key, tag, val) in enumerate(kvs):
            slot: Any = overrides[i]  # the bindings type `value` as a plain union, not the ctypes Union
            slot.key = key.encode()
            slot.tag = tag
            if tag == llama_cpp.LLAMA_KV_OVERRIDE_TYPE_STR:
                slot.value.val_str = str(val).encode()[:127]
            else:
                slot.value.val_i64 = int(val)
        overrides[len(kvs)].key = b""  # terminator
        params.kv_overrides = ctypes.cast(overrides, ctypes.POINTER(llama_cpp.llama_model_kv_override))
        keep.append(overrides)
    rc = llama_cpp.llama_model_quantize(src.encode(), dst.encode(), ctypes.byref(params))
    if rc != 0:
        Path(dst).unlink(missing_ok=True)
        print(f"llama_model_quantize failed with code {rc}", file=sys.stderr)
        raise SystemExit(2)


def _worker_main(argv: list[str]) -> None:
    import argparse

    parser = argparse.ArgumentParser(prog="python -m llmopt.backends.gguf_imatrix")
    parser.add_argument("--quantize", nargs=2, metavar=("SRC", "DST"), required=True)
    parser.add_argument("--ftype", type=int, required=True)
    parser.add_argument("--threads", type=int, default=0)
    parser.add_argument("--imatrix", default=None)
    parser.add_argument("--imatrix-label", default="")
    parser.add_argument("--pure", action="store_true")
    args = parser.parse_args(argv)
    src, dst = args.quantize
    _worker_quantize(src, dst, args.ftype, args.threads, args.imatrix, args.imatrix_label or "", args.pure)


if __name__ == "__main__":
    _worker_main(sys.argv[1:])
