"""OpenAI-compatible servers llmopt starts itself, and their lifecycle.

A server runs in a session of its own (its process group is what gets stopped), with its output in a log file;
it is stopped on every way out: success, error, Ctrl-C/SIGTERM (the CLI's handlers raise), interpreter exit
(atexit), and, on Linux, the death of llmopt itself (PR_SET_PDEATHSIG).
"""

from __future__ import annotations

import atexit
import contextlib
import http.client
import importlib.util
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

from pydantic import BaseModel

from llmopt.errors import BackendUnavailableError, InputError, ModelError

HOST = "127.0.0.1"
SERVERS = ("llama.cpp", "transformers", "vllm")


class ServerOptions(BaseModel):
    """What the user can set about a server llmopt starts."""

    port: int | None = None  # None: a free one
    threads: int | None = None  # llama.cpp CPU threads
    parallel: int = 4  # llama.cpp slots (concurrent sequences)
    context: int = 2048  # tokens per slot (llama.cpp) / max model length (vLLM)
    prefix_caching: bool | None = None  # None: the server's default
    continuous_batching: bool = True  # transformers serve
    device: str = "auto"  # transformers serve --device; llama.cpp: cuda[:N] puts every layer there, cpu none
    dtype: str | None = None  # transformers serve; None: float32 on CPU, the checkpoint's dtype on a GPU
    startup_timeout: float = 300.0
    extra_args: list[str] = []


class ServerSpec(BaseModel):
    kind: str
    argv: list[str]
    env: dict[str, str] = {}
    port: int
    health_path: str = "/health"
    model_name: str | None = None  # the request's "model"; None: the first of /v1/models
    request_extra: dict[str, Any] = {}
    notes: list[str] = []

    @property
    def url(self) -> str:
        return f"http://{HOST}:{self.port}"


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind((HOST, 0))
        return int(s.getsockname()[1])


def check_port_free(port: int) -> None:
    if not 1 <= port <= 65535:
        raise InputError(f"--port {port} is not a TCP port.", "Give 1-65535, or leave --port out for a free one.")
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        try:
            s.bind((HOST, port))
        except OSError:
            raise InputError(
                f"port {port} on {HOST} is in use.",
                "Leave --port out (llmopt picks a free one), or stop what listens there; "
                "to measure a server already running there, use --url.",
            ) from None


# --- which server for which model -------------------------------------------------------------------------


def gguf_file(model: str) -> Path | None:
    """The .gguf a model argument names: the file itself, or a folder's one model .gguf (a GGUF artifact).

    In a folder, the artifact manifest's record of its model file (``options._resolved.gguf_file`` in
    ``llmopt.json``) decides; without one, the folder's .gguf files less importance matrices (the ``imatrix.gguf``
    a GGUF artifact keeps, or any GGUF whose ``general.type`` is ``imatrix``) must be exactly one. None: no model
    .gguf here (or a Hugging Face folder, config.json, without a manifest naming one); more than one: refused.
    """
    p = Path(model).expanduser()
    if p.is_file() and p.suffix.lower() == ".gguf":
        return p.resolve()
    if not p.is_dir():
        return None
    recorded = _manifest_gguf(p)
    if recorded is not None:
        return recorded.resolve()
    if (p / "config.json").is_file():
        return None
    files = _model_ggufs(p)
    if len(files) > 1:
        raise ModelError(
            f"{model} holds {len(files)} GGUF model files ({', '.join(f.name for f in files)}), "
            "and no llmopt.json naming the model file among them.",
            f"Pass the file itself, e.g. {p / files[0].name}.",
        )
    return files[0].resolve() if files else None


def _manifest_gguf(folder: Path) -> Path | None:
    """The model file a GGUF artifact's ``llmopt.json`` records, when it records one this folder holds."""
    manifest = folder / "llmopt.json"
    if not manifest.is_file():
        return None
    try:
        data = json.loads(manifest.read_text())
    except (OSError, ValueError):
        return None
    options = data.get("options") if isinstance(data, dict) else None
    resolved = options.get("_resolved") if isinstance(options, dict) else None
    name = resolved.get("gguf_file") if isinstance(resolved, dict) else None
    # a plain name of this folder: a manifest edited to point elsewhere is not followed
    if not isinstance(name, str) or not name or Path(name).name != name or name in (".", ".."):
        return None
    path = folder / name
    return path if path.is_file() else None


def _model_ggufs(folder: Path) -> list[Path]:
    """The folder's .gguf files that are not importance matrices."""
    from llmopt.backends.gguf import IMATRIX_NAME

    files = sorted(f for f in folder.iterdir() if f.suffix.lower() == ".gguf" and f.is_file())
    return [f for f in files if f.name.lower() != IMATRIX_NAME and _gguf_type(f) != "imatrix"]


_GGUF_STRING = 8
_GGUF_ARRAY = 9
_GGUF_SCALAR_SIZES = {0: 1, 1: 1, 2: 2, 3: 2, 4: 4, 5: 4, 6: 4, 7: 1, 10: 8, 11: 8, 12: 8}


def _gguf_type(path: Path, max_keys: int = 4096) -> str | None:
    """``general.type`` from a GGUF header ("model", "imatrix", "adapter", ...); None when absent or unreadable.

    Read with ``struct``, key by key until it is found (llama.cpp writes the ``general.*`` keys first), so a
    multi-gigabyte model costs a few reads and no optional package."""
    import struct

    try:
        with open(path, "rb") as f:

            def take(fmt: str) -> tuple[Any, ...]:
                size = struct.calcsize(fmt)
                data = f.read(size)
                if len(data) != size:
                    raise ValueError("truncated")
                return struct.unpack(fmt, data)

            def text() -> bytes:
                (n,) = take("<Q")
                if n > 1 << 20:
                    raise ValueError("implausible string")
                data = f.read(n)
                if len(data) != n:
                    raise ValueError("truncated")
                return data

            def skip(kind: int) -> None:
                if kind == _GGUF_STRING:
                    (n,) = take("<Q")
                    f.seek(n, 1)
                elif kind == _GGUF_ARRAY:
                    item, count = take("<IQ")
                    if item in _GGUF_SCALAR_SIZES:
                        f.seek(_GGUF_SCALAR_SIZES[item] * count, 1)
                    elif item == _GGUF_STRING:
                        for _ in range(count):
                            skip(_GGUF_STRING)
                    else:
                        raise ValueError("unknown array type")
                elif kind in _GGUF_SCALAR_SIZES:
                    f.seek(_GGUF_SCALAR_SIZES[kind], 1)
                else:
                    raise ValueError("unknown value type")

            magic, version = take("<4sI")
            if magic != b"GGUF" or version < 2:
                return None
            _n_tensors, n_kv = take("<QQ")
            for _ in range(min(n_kv, max_keys)):
                key = text()
                (kind,) = take("<I")
                if key == b"general.type" and kind == _GGUF_STRING:
                    return text().decode("utf-8", "replace")
                skip(kind)
    except (OSError, ValueError, struct.error):
        return None
    return None


def choose_server(model: str, wanted: str) -> str:
    if wanted != "auto":
        if wanted not in SERVERS:
            raise InputError(f"--server {wanted!r} is not known.", f"Use auto or one of {', '.join(SERVERS)}.")
        return wanted
    if gguf_file(model) is not None:
        return "llama.cpp"
    p = Path(model).expanduser()
    if p.is_dir() and (p / "config.json").is_file():
        return "transformers"
    if p.exists():
        raise ModelError(
            f"{model} is neither a .gguf file, a GGUF artifact folder, nor a Hugging Face model folder.",
            "Give a model folder (config.json + weights) or a .gguf; or measure a running server with --url.",
        )
    raise ModelError(f"{model} does not exist.", "Check the path (relative paths are read from the current folder).")


# --- llama.cpp --------------------------------------------------------------------------------------------


def llama_server_binary() -> Path:
    """$LLMOPT_LLAMA_SERVER, else llama-server from the llama.cpp tools llmopt built, else one on PATH."""
    env = os.environ.get("LLMOPT_LLAMA_SERVER")
    if env:
        p = Path(env).expanduser()
        if not (p.is_file() and os.access(p, os.X_OK)):
            raise BackendUnavailableError(
                f"LLMOPT_LLAMA_SERVER={env} is not an executable file.", "Point it at a llama-server binary."
            )
        return p
    from llmopt.backends.gguf_toolchain import BUILD_SCRIPT, find_toolchain

    chain = find_toolchain()
    if chain is not None and chain.bin is not None and (chain.bin / "llama-server").is_file():
        return chain.bin / "llama-server"
    if chain is not None:
        # a tools build made with --no-install is not the active build, but its llama-server is as usable
        built = [p for p in chain.root.glob("bin/*/llama-server") if p.is_file() and os.access(p, os.X_OK)]
        if built:
            return max(built, key=lambda p: p.stat().st_mtime)
    found = shutil.which("llama-server")
    if found:
        return Path(found)
    raise BackendUnavailableError(
        "llama.cpp's llama-server is not built here.",
        f"Run `{BUILD_SCRIPT}` (it builds llama-server with the other llama.cpp tools), or set "
        "LLMOPT_LLAMA_SERVER to a llama-server binary (a CUDA build, say).",
    )


def check_server_device(device: str) -> str:
    """``--device`` of a started server, checked before anything starts: ``auto``, ``cpu``, ``cuda`` or ``cuda:N``
    (any case, spaces around ignored), returned lower-case. A malformed value, a GPU that is not there or several
    GPUs are bad input (exit 2); a GPU asked for where none is visible, exit 4 (as ``--device`` elsewhere)."""
    text = device.strip().lower()
    if text == "auto":
        return text
    from llmopt.placement import parse_device, visible_gpu_count

    if "," in text:  # bad input wherever it runs: said before looking for GPUs
        raise InputError(
            f"a started server runs on one device; '{device}' names several.",
            "Use --device cuda (the server's own use of every GPU) or cuda:N.",
        )
    parse_device(text, 0 if text == "cpu" else visible_gpu_count())
    return text


GPU_LAYER_FLAGS = ("-ngl", "--gpu-layers", "--n-gpu-layers", "--device", "-dev")


def llama_cpp_placement(device: str, extra_args: list[str]) -> list[str]:
    """llama-server arguments that place the model as ``device`` says: ``cuda`` every layer on the GPU(s), ``cuda:N``
    every layer on GPU N only, ``cpu`` none; ``auto`` (or arguments of the user's own that place it) adds nothing:
    the server's default then holds."""
    if any(arg.split("=", 1)[0] in GPU_LAYER_FLAGS for arg in extra_args):
        return []
    if device == "cpu":
        return ["-ngl", "0"]
    if device == "cuda":
        return ["-ngl", "999"]
    if device.startswith("cuda:") and device[5:].isdigit():
        return ["-ngl", "999", "--device", f"CUDA{int(device[5:])}"]
    return []


def llama_cpp_spec(model: str, port: int, opts: ServerOptions) -> ServerSpec:
    gguf = gguf_file(model)
    if gguf is None:
        raise ModelError(
            f"llama.cpp's server loads .gguf files; {model} is not one (nor a folder with exactly one model .gguf).",
            "Quantize with `llmopt quantize MODEL gguf-...`, or use --server transformers for a model folder.",
        )
    binary = llama_server_binary()
    argv = [str(binary), "-m", str(gguf), "--host", HOST, "--port", str(port)]
    argv += ["-np", str(opts.parallel), "-c", str(opts.context * opts.parallel), "--no-webui"]
    if opts.threads:
        argv += ["-t", str(opts.threads)]
    notes = [f"{opts.parallel} slots of {opts.context} tokens, continuous batching"]
    placement = llama_cpp_placement(opts.device, opts.extra_args)
    if placement:
        argv += placement
        notes.append("every layer on " + opts.device if "999" in placement else "no layer on a GPU")
    if opts.prefix_caching is not None:
        argv.append("--cache-prompt" if opts.prefix_caching else "--no-cache-prompt")
        notes.append("prefix caching " + ("on" if opts.prefix_caching else "off"))
    argv += opts.extra_args
    lib = str(binary.resolve().parent)
    env = {"LD_LIBRARY_PATH": os.pathsep.join(p for p in (lib, os.environ.get("LD_LIBRARY_PATH", "")) if p)}
    return ServerSpec(
        kind="llama.cpp",
        argv=argv,
        env=env,
        port=port,
        model_name=gguf.name,
        # every request generates exactly max_tokens, so artifact and baseline do the same work
        request_extra={"ignore_eos": True},
        notes=notes,
    )


# --- transformers serve -----------------------------------------------------------------------------------


def _transformers_cli() -> list[str]:
    exe = Path(sys.executable).with_name("transformers")
    if exe.is_file():
        return [str(exe)]
    found = shutil.which("transformers")
    if found:
        return [found]
    raise BackendUnavailableError(
        "the `transformers` command is not installed with this Python.", "pip install 'transformers[serving]'"
    )


def transformers_serve_flags(help_text: str) -> dict[str, str | None]:
    """The continuous-batching flag the installed `transformers serve` spells (5.x: --continuous-batching,
    4.5x: --continuous_batching), or None where it has none."""
    for flag in ("--continuous-batching", "--continuous_batching"):
        if flag in help_text:
            return {"continuous_batching": flag}
    return {"continuous_batching": None}


def require_hf_folder(model: str) -> Path:
    p = Path(model).expanduser()
    if not (p.is_dir() and (p / "config.json").is_file()):
        raise ModelError(
            f"`transformers serve` loads Hugging Face model folders; {model} is not one.",
            "Give the folder with config.json, or use --server llama.cpp for a .gguf.",
        )
    return p


def check_transformers_serve() -> None:
    """`transformers serve` needs the `serving` extra, which a plain transformers install lacks."""
    missing = [m for m in ("fastapi", "uvicorn", "openai") if importlib.util.find_spec(m) is None]
    if missing:
        raise BackendUnavailableError(
            f"`transformers serve` needs {', '.join(missing)}, not installed here.",
            "pip install 'transformers[serving]' (fastapi, uvicorn, openai).",
        )


def transformers_spec(model: str, port: int, opts: ServerOptions, *, help_text: str | None = None) -> ServerSpec:
    p = require_hf_folder(model)
    cli = _transformers_cli()
    if help_text is None:
        try:
            help_text = subprocess.run(
                [*cli, "serve", "--help"], capture_output=True, text=True, timeout=120, env=_child_env({})
            ).stdout
        except (OSError, subprocess.TimeoutExpired):
            help_text = ""
    flags = transformers_serve_flags(help_text)
    path = str(p.resolve())
    argv = [*cli, "serve", path, "--host", HOST, "--port", str(port), "--log-level", "info"]
    notes: list[str] = []
    device = opts.device
    if device == "auto":
        import torch

        device = "cuda" if torch.cuda.is_available() else "cpu"
    if "--device" in help_text or not help_text:
        argv += ["--device", device]
    # float16 matmuls on a CPU are emulated, many times slower than float32 (measured: SmolLM2-135M, 8 s to the
    # first token of a 128-token prompt): on a CPU the checkpoint is served in float32, as llmopt evaluates it
    dtype = opts.dtype or ("float32" if device == "cpu" else None)
    if dtype:
        argv += ["--dtype", dtype]
        notes.append(dtype)
    cb = flags["continuous_batching"]
    if opts.continuous_batching and cb:
        argv.append(cb)
        notes.append("continuous batching")
    elif opts.continuous_batching:
        notes.append("continuous batching not offered by this transformers: requests run one at a time")
    else:
        notes.append("no continuous batching")
    argv += opts.extra_args
    # transformers serve refuses request fields outside OpenAI's schema (422), so no ignore_eos here
    return ServerSpec(kind="transformers", argv=argv, port=port, model_name=path, notes=notes)


# --- vLLM ---------------------------------------------------------------------------------------------------


def vllm_spec(model: str, port: int, opts: ServerOptions, *, vllm: str | None = None) -> ServerSpec:
    """`vllm serve MODEL` per vLLM's documented CLI."""
    exe = vllm or shutil.which("vllm")
    if exe is None:
        raise BackendUnavailableError(
            "vLLM is not installed here (no `vllm` command).",
            "pip install vllm on a CUDA machine, or start it yourself and measure it with --url.",
        )
    name = Path(model).name or model
    argv = [exe, "serve", model, "--host", HOST, "--port", str(port), "--served-model-name", name]
    argv += ["--max-model-len", str(opts.context)]
    notes = ["continuous batching (always on in vLLM)"]
    if opts.prefix_caching is not None:
        argv.append("--enable-prefix-caching" if opts.prefix_caching else "--no-enable-prefix-caching")
        notes.append("prefix caching " + ("on" if opts.prefix_caching else "off"))
    argv += opts.extra_args
    return ServerSpec(
        kind="vllm", argv=argv, port=port, model_name=name, request_extra={"ignore_eos": True}, notes=notes
    )


def server_spec(kind: str, model: str, opts: ServerOptions) -> ServerSpec:
    if opts.port is not None:
        check_port_free(opts.port)
    port = opts.port or free_port()
    if kind == "llama.cpp":
        return llama_cpp_spec(model, port, opts)
    if kind == "transformers":
        require_hf_folder(model)  # a wrong kind of model is the user's to fix first (exit 2)
        check_transformers_serve()
        return transformers_spec(model, port, opts)
    return vllm_spec(model, port, opts)


# --- lifecycle ----------------------------------------------------------------------------------------------


def _child_env(extra: dict[str, str]) -> dict[str, str]:
    env = dict(os.environ, HF_HUB_OFFLINE="1", PYTHONUNBUFFERED="1")
    env.setdefault("OMP_WAIT_POLICY", "passive")
    env.update(extra)
    return env


def _die_with_parent() -> None:
    # Linux: the server gets SIGTERM when llmopt dies, even by SIGKILL, so no server outlives its run.
    with contextlib.suppress(Exception):
        import ctypes

        ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG


_running: set[RunningServer] = set()


def _stop_all() -> None:
    for server in list(_running):
        server.stop()


atexit.register(_stop_all)


def log_tail(path: Path, n: int = 12) -> str:
    try:
        lines = path.read_text(errors="replace").splitlines()
    except OSError:
        return "(no log)"
    lines = [ln for ln in lines if ln.strip()][-n:]
    return "\n    ".join(lines) if lines else "(the log is empty)"


class RunningServer:
    """``with RunningServer(spec, log) as server:`` starts it, waits until it answers its health check, and
    always stops it."""

    def __init__(self, spec: ServerSpec, log_path: Path, *, startup_timeout: float = 300.0) -> None:
        self.spec = spec
        self.log_path = log_path
        self.startup_timeout = startup_timeout
        self.proc: subprocess.Popen[bytes] | None = None
        self.startup_s: float | None = None

    def __enter__(self) -> RunningServer:
        self.start()
        try:
            self.wait_ready()
        except BaseException:
            self.stop()
            raise
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def start(self) -> None:
        self.log_path.parent.mkdir(parents=True, exist_ok=True)
        log = open(self.log_path, "wb")  # noqa: SIM115 - the child writes it for its whole life
        try:
            log.write(("$ " + " ".join(self.spec.argv) + "\n").encode())
            log.flush()
            self.proc = subprocess.Popen(
                self.spec.argv,
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
                env=_child_env(self.spec.env),
                start_new_session=True,  # Ctrl-C reaches llmopt only; llmopt stops the server's whole group
                preexec_fn=_die_with_parent if sys.platform.startswith("linux") else None,
            )
        except OSError as exc:
            raise BackendUnavailableError(
                f"the {self.spec.kind} server could not be started: {exc}.", "Check that the server is installed."
            ) from None
        finally:
            log.close()
        _running.add(self)
        self._started = time.monotonic()

    def alive(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def exit_description(self) -> str:
        code = self.proc.returncode if self.proc else None
        if code is not None and code < 0:
            with contextlib.suppress(ValueError):
                return f"killed by {signal.Signals(-code).name}"
        return f"exit code {code}"

    def _healthy(self) -> bool:
        conn = http.client.HTTPConnection(HOST, self.spec.port, timeout=2)
        try:
            conn.request("GET", self.spec.health_path)
            resp = conn.getresponse()
            body = resp.read(2000)
        except (OSError, http.client.HTTPException):
            return False
        finally:
            conn.close()
        if resp.status != 200:
            return False
        with contextlib.suppress(ValueError):
            data = json.loads(body or b"{}")
            if isinstance(data, dict) and data.get("status") not in (None, "ok", "healthy"):
                return False
        return True

    def wait_ready(self) -> None:
        from llmopt import interrupt

        deadline = self._started + self.startup_timeout
        while True:
            interrupt.check()
            if not self.alive():
                raise BackendUnavailableError(
                    f"the {self.spec.kind} server stopped ({self.exit_description()}) before it was ready. "
                    f"Its last log lines:\n    {log_tail(self.log_path)}",
                    f"Full log: {self.log_path}. A model this server cannot load, a bad option, or a port taken "
                    "meanwhile are the usual causes.",
                )
            if self._healthy():
                self.startup_s = time.monotonic() - self._started
                return
            if time.monotonic() > deadline:
                raise BackendUnavailableError(
                    f"the {self.spec.kind} server did not become ready within {self.startup_timeout:.0f} s. "
                    f"Its last log lines:\n    {log_tail(self.log_path)}",
                    f"Full log: {self.log_path}. Raise --startup-timeout if it was still loading.",
                )
            time.sleep(0.25)

    def stop(self, grace: float = 10.0) -> None:
        proc = self.proc
        _running.discard(self)
        if proc is None or proc.poll() is not None:
            return
        for sig, wait in ((signal.SIGTERM, grace), (signal.SIGKILL, 5.0)):
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.killpg(proc.pid, sig)
            try:
                proc.wait(wait)
                break
            except subprocess.TimeoutExpired:
                continue
        # children the server left in its group (uvicorn workers) go too
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(proc.pid, signal.SIGKILL)
