#!/usr/bin/env python3
"""Build llama-cpp-python from its PyPI sdist and set up what the `gguf` backend needs (idempotent).

llama-cpp-python publishes no wheels on PyPI, so `pip install llama-cpp-python` compiles llama.cpp
(5-12 minutes on 2 CPU cores). This script does that once per (version, CMAKE_ARGS) and keeps:

    DIR/<version>/
      llama_cpp_python-<version>.tar.gz    the sdist (the only download)
      wheels/<flags-hash>/*.whl            the built wheel, reinstalled in ~1 s on later runs
      converter/convert_hf_to_gguf.py      llama.cpp's HF -> GGUF converter, with its conversion/
      converter/gguf-py/                   package and its own gguf-py (PyPI gguf lacks what it needs)
      bin/<flags-hash>/llama-imatrix       llama.cpp's importance-matrix and quantize tools, built from
      bin/<flags-hash>/llama-quantize      the same source and build tree as the wheel (i-quants and
                                           `--imatrix`: the Python binding cannot pass an imatrix)
      llmopt-llamacpp.json                 what was built, read by llmopt's gguf backend

DIR is --dir, else $LLMOPT_LLAMACPP_DIR, else ~/.cache/llmopt/llamacpp ($XDG_CACHE_HOME honoured).
Nothing is downloaded when llmopt runs; only this script uses the network (PyPI, through pip).

Build flags come from $CMAKE_ARGS; without it, a portable CPU-only build:
    -DGGML_NATIVE=OFF -DGGML_CUDA=OFF -DGGML_METAL=OFF -DGGML_VULKAN=OFF -DGGML_BLAS=OFF
With GGML_NATIVE=OFF ggml's x86-64 kernels use SSE4.2/AVX/AVX2/FMA/F16C/BMI2 and no AVX-512/AMX, so the
wheel runs on any x86-64 CPU of the last decade (ggml's AMX path crashed on AVX-512/AMX Xeons). For NVIDIA
GPUs pass --cuda (adds -DGGML_CUDA=ON; needs the CUDA toolkit's nvcc), or set CMAKE_ARGS, e.g.
CMAKE_ARGS="-DGGML_CUDA=ON -DCMAKE_CUDA_ARCHITECTURES=90". A native build (CMAKE_ARGS without
-DGGML_NATIVE=OFF) runs only on CPUs like the one it was built on: its cache key includes that CPU.
Different flags get a different wheel and tool folder, so a flag change never reuses a stale build.

After installing, a smoke check decodes a tiny random Llama (f16, q8_0, q4_0, q4_1, q4_k_m) in a
child process and compares each type's logits with f16's. A crash or wrong numbers stops the script
(exit 1) and the build is not made active; the stamp records the CPUs each build passed on, which
`llmopt backends` compares with the CPU it runs on.

Usage:
    python scripts/build_llamacpp.py                  # build (or reuse) and install
    python scripts/build_llamacpp.py --no-tools       # skip llama-imatrix/llama-quantize (no i-quants)
    python scripts/build_llamacpp.py --print-dir      # where the backend will look
The build runs under `nice`; -j defaults to the CPU count ($CMAKE_BUILD_PARALLEL_LEVEL overrides).
Before building, the C++ compiler (-DCMAKE_CXX_COMPILER in CMAKE_ARGS, else $CXX, else c++, with the flags CMake
would add) is asked to build a tiny shared library: one that does not link the shared libstdc++ is refused in about
a second (the build would crash on every model load), with the fix (CC=gcc CXX=g++). With CUDA on, the CUDA host
compiler nvcc compiles and links libggml-cuda.so with (-DCMAKE_CUDA_HOST_COMPILER in CMAKE_ARGS, else $CUDAHOSTCXX)
is asked the same, with its fix (CUDAHOSTCXX=g++); --skip-compiler-check builds anyway.
"""

from __future__ import annotations

import argparse
import contextlib
import hashlib
import json
import os
import shutil
import signal
import subprocess
import sys
import tarfile
import time
from pathlib import Path, PurePosixPath, PureWindowsPath
from typing import Any

DEFAULT_VERSION = "0.3.36"
CPU_FLAGS = "-DGGML_NATIVE=OFF -DGGML_CUDA=OFF -DGGML_METAL=OFF -DGGML_VULKAN=OFF -DGGML_BLAS=OFF"
CUDA_FLAGS = "-DGGML_NATIVE=OFF -DGGML_CUDA=ON -DGGML_METAL=OFF -DGGML_VULKAN=OFF -DGGML_BLAS=OFF"
STAMP = "llmopt-llamacpp.json"
COMPILER_TIMEOUT = 60.0  # seconds the compiler check waits for a two-line library
# Always added: llmopt needs no multimodal (mtmd) library, and skipping it saves ~30% of the build.
FIXED_ARGS = "-DLLAVA_BUILD=OFF"
# llama-perplexity: the reference for llmopt's KL divergence (docs/kld.md); llama-server: serving load tests.
TOOLS = ("llama-imatrix", "llama-quantize", "llama-perplexity", "llama-server")
ROOT = Path(__file__).resolve().parents[1]  # the llmopt checkout this script belongs to


def default_dir() -> Path:
    env = os.environ.get("LLMOPT_LLAMACPP_DIR")
    if env:
        return Path(env)
    base = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache")
    return base / "llmopt" / "llamacpp"


def log(msg: str) -> None:
    print(f"[build_llamacpp] {msg}", file=sys.stderr, flush=True)


def run(cmd: list[str], env: dict[str, str] | None = None, cwd: Path | None = None) -> None:
    log("$ " + " ".join(cmd))
    subprocess.run(cmd, check=True, env=env, cwd=cwd)


def nice_prefix() -> list[str]:
    return ["nice", "-n", "10"] if shutil.which("nice") else []


def fetch_sdist(version: str, vdir: Path) -> Path:
    sdist = vdir / f"llama_cpp_python-{version}.tar.gz"
    if sdist.is_file():
        return sdist
    tmp = vdir / "download.partial"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    try:
        run([sys.executable, "-m", "pip", "download", "--no-deps", "--no-binary", ":all:", "-d", str(tmp),
             f"llama-cpp-python=={version}"])  # fmt: skip
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    found = list(tmp.glob("llama_cpp_python-*.tar.gz"))
    if not found:
        raise SystemExit(f"pip download produced no sdist in {tmp}")
    os.replace(found[0], sdist)
    shutil.rmtree(tmp, ignore_errors=True)
    return sdist


def _unsafe(name: str, linkname: str | None, links: set[str], is_sym: bool) -> str | None:
    """Why a member may not be unpacked by hand (None: it may).

    Checked on the names alone, before anything is written: no absolute or drive names, no ``..``,
    nothing below a link unpacked earlier (writing through it could land anywhere), and links whose
    target, followed component by component, stays inside and never passes another link.
    """
    if name.startswith(("/", "\\")) or PureWindowsPath(name).drive:
        return "has an absolute name"
    parts = [p for p in PurePosixPath(name).parts if p not in ("", ".")]
    if not parts or ".." in parts:
        return "has '..' in its name"
    for i in range(1, len(parts)):
        if "/".join(parts[:i]) in links:
            return f"lies below the link {'/'.join(parts[:i])!r}"
    if linkname is None:
        return None
    if os.path.isabs(linkname) or linkname.startswith("\\") or PureWindowsPath(linkname).drive:
        return f"is a link to the absolute path {linkname!r}"
    # A symlink's target is relative to its folder; a hard link's to the archive root.
    stack = parts[:-1] if is_sym else []
    for part in PurePosixPath(linkname).parts:
        if part in ("", "."):
            continue
        if part == "..":
            if not stack:
                return f"is a link pointing outside ({linkname!r})"
            stack.pop()
        else:
            stack.append(part)
        if "/".join(stack) in links:
            return f"is a link through another link ({linkname!r})"
    if not stack:
        return f"is a link to the unpack folder itself ({linkname!r})"
    return None


def safe_extract(archive: Path, dest: Path) -> None:
    """Extract a tar archive into ``dest``; a member that could land outside it stops the unpack.

    Every member is checked by hand first (``_unsafe``), on every Python: stricter than tarfile's
    ``filter="data"`` (no ``..`` and no absolute names at all, where the filter strips or resolves
    them; nothing written below a link), and given the filter's modes: no setuid/setgid/sticky, no
    group/other write, folders 0755, files readable and writable by their owner and executable only
    where the owner's x bit was set. Where the filter exists (3.11.4+, 3.12, and distributions'
    backports to older 3.11) it runs as well. A refused archive leaves ``dest`` empty (hand check)
    or removed by the caller (filter).
    """
    with tarfile.open(archive) as tf:
        members = []
        links: set[str] = set()
        for m in tf.getmembers():
            if m.isdev():  # character/block devices and FIFOs
                raise SystemExit(f"refusing to unpack {archive}: member {m.name!r} is a device file")
            if not (m.isfile() or m.isdir() or m.issym() or m.islnk()):
                raise SystemExit(f"refusing to unpack {archive}: member {m.name!r} is of an unknown type")
            link = m.linkname if (m.issym() or m.islnk()) else None
            why = _unsafe(m.name, link, links, m.issym())
            if why:
                raise SystemExit(f"refusing to unpack {archive}: member {m.name!r} {why}")
            if m.issym() or m.islnk():
                links.add("/".join(p for p in PurePosixPath(m.name).parts if p not in ("", ".")))
            if m.isdir():
                m.mode = 0o755
            elif m.isfile() or m.islnk():
                mode = m.mode & 0o755
                m.mode = (mode if mode & 0o100 else mode & ~0o111) | 0o600
            m.uid = m.gid = 0
            m.uname = m.gname = ""
            members.append(m)
        if hasattr(tarfile, "data_filter"):  # the library's filter as a second guard where it exists
            try:
                tf.extractall(dest, members=members, filter="data")
            except tarfile.FilterError as exc:
                raise SystemExit(f"refusing to unpack {archive}: {exc}") from None
            return
        tf.extractall(dest, members=members)


def unpack(sdist: Path, dest: Path) -> Path:
    """Extract the sdist into dest (kept from an interrupted run); returns the source root."""
    done = dest / ".unpacked"
    if not done.is_file():
        if dest.exists():
            shutil.rmtree(dest)
        dest.mkdir(parents=True)
        try:
            safe_extract(sdist, dest)
        except BaseException:
            shutil.rmtree(dest, ignore_errors=True)  # nothing half-unpacked is taken for a source tree
            raise
        done.write_text(sdist.name + "\n")
    roots = [p for p in dest.iterdir() if (p / "pyproject.toml").is_file()]
    if len(roots) != 1:
        raise SystemExit(f"unexpected sdist layout in {sdist}")
    return roots[0]


def extract_converter(src: Path, out: Path) -> None:
    """Copy convert_hf_to_gguf.py, its conversion/ package and its gguf-py into ``out`` (atomically)."""
    llama = src / "vendor" / "llama.cpp"
    tmp = out.with_name(out.name + ".partial")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    shutil.copy2(llama / "convert_hf_to_gguf.py", tmp / "convert_hf_to_gguf.py")
    for sub in ("conversion", "gguf-py"):
        if (llama / sub).is_dir():
            shutil.copytree(llama / sub, tmp / sub, ignore=shutil.ignore_patterns("__pycache__", "tests"))
    for lic in ("LICENSE",):
        if (llama / lic).is_file():
            shutil.copy2(llama / lic, tmp / lic)
    if out.exists():
        shutil.rmtree(out)
    os.replace(tmp, out)


def build_wheel(src: Path, build_dir: Path, wheel_dir: Path, flags: str, jobs: int) -> Path:
    env = dict(os.environ, CMAKE_ARGS=flags, CMAKE_BUILD_PARALLEL_LEVEL=str(jobs))
    tmp = wheel_dir.with_name(wheel_dir.name + ".partial")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    # A persistent build dir, so the tools below reuse the compiled ggml/llama/common objects.
    run([*nice_prefix(), sys.executable, "-m", "pip", "wheel", "--no-deps", "-w", str(tmp),
         f"--config-settings=build-dir={build_dir}", str(src)], env=env)  # fmt: skip
    wheels = list(tmp.glob("llama_cpp_python-*.whl"))
    if len(wheels) != 1:
        raise SystemExit(f"pip wheel produced {len(wheels)} wheels in {tmp}")
    if wheel_dir.exists():
        shutil.rmtree(wheel_dir)
    os.replace(tmp, wheel_dir)
    return wheel_dir / wheels[0].name


def build_tools(src: Path, build_dir: Path, bin_dir: Path, jobs: int) -> None:
    """Reconfigure the wheel's build tree with llama.cpp's tools on; build only the TOOLS."""
    # tools/ adds mtmd itself, which llama-cpp-python's top level also adds (LLAVA_BUILD): turn that off.
    run([*nice_prefix(), "cmake", "-S", str(src), "-B", str(build_dir), "-DLLAMA_BUILD_TOOLS=ON",
         "-DLLAVA_BUILD=OFF", "-DLLAMA_BUILD_SERVER=ON", "-DLLAMA_BUILD_TESTS=OFF",
         # The server's web UI would be fetched from the Hub at build time: build the API server without it.
         "-DLLAMA_BUILD_UI=OFF", "-DLLAMA_USE_PREBUILT_UI=OFF",
         "-DLLAMA_BUILD_EXAMPLES=OFF"])  # fmt: skip
    run([*nice_prefix(), "cmake", "--build", str(build_dir), "--target", *TOOLS, "-j", str(jobs)])
    tmp = bin_dir.with_name(bin_dir.name + ".partial")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    for tool in TOOLS:
        hits = [p for p in build_dir.rglob(tool) if p.is_file() and os.access(p, os.X_OK)]
        if not hits:
            raise SystemExit(f"{tool} was not built in {build_dir}")
        shutil.copy2(hits[0], tmp / tool)
    # The tools link to the shared libraries of the same build; keep them next to the tools.
    for lib in build_dir.rglob("*.so*"):
        if (lib.is_file() or lib.is_symlink()) and "CMakeFiles" not in lib.parts:
            shutil.copy2(lib, tmp / lib.name, follow_symlinks=False)  # keep libfoo.so.0 -> libfoo.so.0.x
    if bin_dir.exists():
        shutil.rmtree(bin_dir)
    os.replace(tmp, bin_dir)
    envrun = dict(os.environ, LD_LIBRARY_PATH=str(bin_dir))
    subprocess.run([str(bin_dir / "llama-quantize"), "--help"], env=envrun, capture_output=True, check=False)


def _worker_module() -> Any:
    """llmopt's llama.cpp worker module (cpu_identity, smoke), loaded from this checkout by path."""
    import importlib.util

    path = ROOT / "llmopt" / "runners" / "llamacpp_worker.py"
    spec = importlib.util.spec_from_file_location("llmopt_llamacpp_worker", path)
    assert spec and spec.loader
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def is_native(flags: str) -> bool:
    """Whether ggml is built for this very CPU (GGML_NATIVE is on unless turned off)."""
    return "-DGGML_NATIVE=OFF" not in flags.split()


def cache_key(flags: str, cpu: dict[str, Any]) -> str:
    # A native build runs only on CPUs like this one: the CPU is part of its key, so a cache restored
    # on another machine builds anew instead of crashing.
    text = flags if not is_native(flags) else flags + "|" + json.dumps(cpu, sort_keys=True)
    return hashlib.sha256(text.encode()).hexdigest()[:12]


def smoke_check(conv_dir: Path) -> dict[str, Any]:
    """Decode a tiny model, f16 and quantized, with the installed llama-cpp-python in a child process."""
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(p for p in (str(ROOT), os.environ.get("PYTHONPATH")) if p))
    cmd = [sys.executable, "-m", "llmopt.runners.llamacpp_worker", "smoke", "--converter", str(conv_dir)]
    log("smoke check: a tiny random Llama, f16 and q8_0/q4_0/q4_1/q4_k_m, decoded in a child process")
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env, cwd=ROOT)
    lines = [ln for ln in proc.stdout.splitlines() if ln.startswith("{")]
    result: dict[str, Any] = json.loads(lines[-1]) if lines else {"ok": False, "checked": {}}
    if proc.returncode < 0:
        try:
            sig = signal.Signals(-proc.returncode).name
        except ValueError:
            sig = f"signal {-proc.returncode}"
        result.update(ok=False, problem=f"llama.cpp crashed ({sig}) decoding the tiny model")
    elif proc.returncode not in (0, 3) or not lines:
        tail = "\n    ".join((proc.stdout + proc.stderr).strip().splitlines()[-8:])
        result.update(ok=False, problem=f"the smoke check failed (exit {proc.returncode}):\n    {tail}")
    result.setdefault("cpu", _worker_module().cpu_identity())
    return result


def static_libstdcxx(lib_dir: Path) -> list[str]:
    """llama.cpp libraries in ``lib_dir`` linked without a dynamic libstdc++ (their NEEDED entries name none).

    Such libraries each carry their own copy of libstdc++, and llama.cpp's libraries then call into each
    other's copies: seen on a machine whose compiler (CXX=/opt/gcc/bin/g++) links libstdc++ statically, where
    every model load crashed in std::regex (the tokenizer) with any build flags.
    """
    found = []
    for lib in sorted(lib_dir.glob("lib*.so")):
        data = lib.read_bytes()
        if b"libstdc++.so" not in data and b"_ZNSt" in data:
            found.append(lib.name)
    return found


def _cmake_defines(args: str) -> dict[str, str]:
    """``-DNAME=VALUE`` / ``-DNAME:TYPE=VALUE`` definitions in a CMAKE_ARGS string."""
    import shlex

    try:
        words = shlex.split(args)
    except ValueError:
        words = args.split()
    out = {}
    for i, word in enumerate(words):
        if word == "-D" and i + 1 < len(words):  # `-D NAME=VALUE`, as CMake also takes it
            word = "-D" + words[i + 1]
        if word.startswith("-D") and "=" in word:
            name, value = word[2:].split("=", 1)
            out[name.split(":", 1)[0]] = value
    return out


def compiler_problem(flags: str = "") -> str | None:
    """Why a compiler the build will use must not build llama.cpp; None if it may (or cannot be asked).

    Checked before a build of minutes: a compiler that does not link the shared libstdc++ into shared libraries
    (static_libstdcxx above) makes every llama.cpp library carry its own copy, and the build then crashes on
    every model load. A tiny shared library is compiled the way CMake will compile and link llama.cpp's (its
    compiler from ``-DCMAKE_CXX_COMPILER`` in ``flags``, else $CXX, else c++; $CXXFLAGS, $LDFLAGS,
    ``-DCMAKE_CXX_FLAGS`` and ``-DCMAKE_SHARED_LINKER_FLAGS``) and its NEEDED entries read. When ``flags`` turn
    CUDA on, the CUDA host compiler is asked too (``-DCMAKE_CUDA_HOST_COMPILER`` in ``flags``, else
    $CUDAHOSTCXX; neither: CMake's default, the C++ compiler already asked): nvcc compiles and links
    libggml-cuda.so with it. A compiler that cannot be run, or fails or hangs on that library, is left to CMake,
    which says why.
    """
    defines = _cmake_defines(flags)
    problems = [_cxx_problem(defines), _cuda_host_problem(defines) if _cuda_on(defines) else None]
    return "\n".join(p for p in problems if p) or None  # both, when both are wrong: one run, not two


def _cxx_compiler(defines: dict[str, str]) -> tuple[list[str], str]:
    """The C++ compiler CMake will use (its command line, and how to name it); ValueError if $CXX cannot be split."""
    import shlex

    if defines.get("CMAKE_CXX_COMPILER"):
        return [defines["CMAKE_CXX_COMPILER"]], f"CMAKE_CXX_COMPILER={defines['CMAKE_CXX_COMPILER']}"
    if (os.environ.get("CXX") or "").strip():
        return shlex.split(os.environ["CXX"]), f"CXX={os.environ['CXX']}"
    return ["c++"], "the default C++ compiler (c++)"


def _cuda_on(defines: dict[str, str]) -> bool:
    """Whether the CMake definitions build ggml's CUDA backend (GGML_CUDA, or llama.cpp's old LLAMA_CUDA)."""
    value = defines.get("GGML_CUDA", defines.get("LLAMA_CUDA", "")).strip().upper()
    if value.lstrip("+-").isdigit():  # CMake: a non-zero number is true
        return int(value) != 0
    return value in ("ON", "YES", "TRUE", "Y")


def _cuda_host_compiler(defines: dict[str, str]) -> tuple[list[str], str, str] | None:
    """The CUDA host compiler set for CMake (command line, name, where it was set), or None for CMake's default.

    ``-DCMAKE_CUDA_HOST_COMPILER`` wins over $CUDAHOSTCXX, as in CMake; ValueError if $CUDAHOSTCXX cannot be split.
    """
    import shlex

    if defines.get("CMAKE_CUDA_HOST_COMPILER"):
        value = defines["CMAKE_CUDA_HOST_COMPILER"]
        return [value], f"CMAKE_CUDA_HOST_COMPILER={value}", "-DCMAKE_CUDA_HOST_COMPILER in CMAKE_ARGS"
    if (os.environ.get("CUDAHOSTCXX") or "").strip():
        value = os.environ["CUDAHOSTCXX"]
        return shlex.split(value), f"CUDAHOSTCXX={value}", "the CUDAHOSTCXX environment variable"
    return None


def _same_command(a: list[str], b: list[str]) -> bool:
    """Whether two compiler command lines run the same program with the same arguments."""

    def resolve(word: str) -> str:
        found = shutil.which(word)
        return os.path.realpath(found) if found else word

    return len(a) == len(b) and bool(a) and resolve(a[0]) == resolve(b[0]) and a[1:] == b[1:]


def _cxx_problem(defines: dict[str, str]) -> str | None:
    import shlex

    try:
        cxx, named = _cxx_compiler(defines)
        extra = [
            *shlex.split(os.environ.get("CXXFLAGS", "")),
            *shlex.split(defines.get("CMAKE_CXX_FLAGS", "")),
            *shlex.split(os.environ.get("LDFLAGS", "")),
            *shlex.split(defines.get("CMAKE_SHARED_LINKER_FLAGS", "")),
        ]
    except ValueError as exc:  # an unbalanced quote: CMake will not make sense of it either
        log(f"compiler check skipped: cannot split the compiler settings ({exc})")
        return None
    if shutil.which(cxx[0]) is None:
        log(f"compiler check skipped: {cxx[0]} is not a command here (CMake will say more)")
        return None
    log(f"checking the C++ compiler ({' '.join(cxx)}) links libstdc++ as a shared library ...")
    if not _links_static(cxx, extra):
        return None
    if extra and not _links_static(cxx, []):
        shown = " ".join(extra)
        return (
            f"the build flags ({shown}; from CXXFLAGS, LDFLAGS or CMAKE_ARGS) make {' '.join(cxx)} link libstdc++ "
            "statically into shared libraries, so every llama.cpp library would carry its own copy and the build "
            "would crash on every model load (seen: std::regex in the tokenizer).\n"
            "  -> Take -static-libstdc++ (or -static) out of those flags, or pass --skip-compiler-check to build anyway"
        )
    return (
        f"{named} does not link the shared libstdc++ into shared libraries (it links it statically, or not at all "
        "as gcc does for C++), so every llama.cpp library would carry its own copy or none, and the build would "
        "crash on every model load (seen: std::regex in the tokenizer).\n"
        "  -> Build with a compiler that links libstdc++ dynamically, e.g. the system's: "
        "CC=gcc CXX=g++ python scripts/build_llamacpp.py (or --skip-compiler-check to build anyway)"
    )


def _cuda_host_problem(defines: dict[str, str]) -> str | None:
    """The CUDA host compiler's problem, as _cxx_problem's; None when it is CMake's default (the C++ compiler)."""
    try:
        host = _cuda_host_compiler(defines)
        cxx = _cxx_compiler(defines)[0]
    except ValueError as exc:
        log(f"CUDA host compiler check skipped: cannot split the compiler settings ({exc})")
        return None
    if host is None:
        return None
    hostcxx, named, source = host
    if _same_command(hostcxx, cxx):  # the C++ compiler, already asked
        return None
    if shutil.which(hostcxx[0]) is None:
        log(f"CUDA host compiler check skipped: {hostcxx[0]} is not a command here (CMake will say more)")
        return None
    log(f"checking the CUDA host compiler ({' '.join(hostcxx)}) links libstdc++ as a shared library ...")
    if not _links_static(hostcxx, []):
        return None
    if source.startswith("-D"):
        fix = (
            "Set -DCMAKE_CUDA_HOST_COMPILER in CMAKE_ARGS to a compiler that links libstdc++ dynamically, e.g. the "
            "system's: -DCMAKE_CUDA_HOST_COMPILER=/usr/bin/g++ (or pass --skip-compiler-check to build anyway)"
        )
    else:
        fix = (
            "Point CUDAHOSTCXX at a compiler that links libstdc++ dynamically, e.g. the system's: "
            "CUDAHOSTCXX=g++ python scripts/build_llamacpp.py --cuda (or put -DCMAKE_CUDA_HOST_COMPILER=/usr/bin/g++ "
            "in CMAKE_ARGS, or pass --skip-compiler-check to build anyway)"
        )
    return (
        f"{named} (the CUDA host compiler, from {source}: nvcc compiles and links libggml-cuda.so with it) does "
        "not link the shared libstdc++ into shared libraries (it links it statically, or not at all), so "
        "libggml-cuda.so would carry its own copy or none, and the build would crash on every model load.\n"
        f"  -> {fix}"
    )


def _links_static(cxx: list[str], extra: list[str]) -> bool:
    """Whether a two-line shared library built by ``cxx`` with ``extra`` lacks a NEEDED libstdc++ (False when it
    cannot be built, or the compiler hangs: CMake will say more)."""
    import tempfile

    with tempfile.TemporaryDirectory(prefix="llmopt-cxx-") as tmp:
        src, lib = Path(tmp) / "probe.cpp", Path(tmp) / "libprobe.so"
        src.write_text('#include <string>\nstd::string probe(const char* s) { return std::string(s) + "!"; }\n')
        try:
            proc = subprocess.Popen([*cxx, *extra, "-shared", "-fPIC", "-o", str(lib), str(src)],
                                    stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                                    start_new_session=True)  # fmt: skip
        except OSError:
            return False
        try:
            proc.wait(timeout=COMPILER_TIMEOUT)
        except BaseException as exc:  # a hang, or Ctrl-C: the compiler and whatever it started go too
            with contextlib.suppress(OSError):
                os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
            if not isinstance(exc, subprocess.TimeoutExpired):
                raise
            log(f"compiler check skipped: {' '.join(cxx)} took over {COMPILER_TIMEOUT:g} s on a two-line library")
            return False
        return proc.returncode == 0 and lib.is_file() and bool(static_libstdcxx(Path(tmp)))


def _installed_lib_dir() -> Path | None:
    code = "import importlib.util, os; s = importlib.util.find_spec('llama_cpp'); print(os.path.dirname(s.origin))"
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=False)
    path = Path(proc.stdout.strip()) / "lib" if proc.returncode == 0 else None
    return path if path is not None and path.is_dir() else None


def failure_hint(flags: str = "") -> str:
    """The next step after a failed smoke check, from what can be seen of the build (and its ``flags``).

    A statically linked libggml-cuda.so is the CUDA host compiler's doing (nvcc links it with that compiler:
    -DCMAKE_CUDA_HOST_COMPILER, else $CUDAHOSTCXX, else CMake's default); the other libraries are CXX's.
    """
    lib_dir = _installed_lib_dir()
    static = static_libstdcxx(lib_dir) if lib_dir else []
    if not static:
        return "\n  -> Build it portable (the default flags: -DGGML_NATIVE=OFF; check CMAKE_ARGS) with --rebuild."
    defines = _cmake_defines(flags)
    cuda = [name for name in static if name.startswith("libggml-cuda")]
    other = [name for name in static if name not in cuda]
    try:
        cxx_named = _cxx_compiler(defines)[1]
        host = _cuda_host_compiler(defines)
    except ValueError:
        cxx_named, host = "the C++ compiler", None
    causes, env, cmake_args = [], [], ""
    if other:
        causes.append(f"{', '.join(other)} link libstdc++ statically ({cxx_named} does that)")
        env.append("CC=gcc CXX=g++")
    if cuda:
        if host is None:
            host_named = f"CMake's default, as {cxx_named}"
            env.append("CUDAHOSTCXX=g++")
        elif host[2].startswith("-D"):
            host_named = host[1]
            cmake_args = " and -DCMAKE_CUDA_HOST_COMPILER=/usr/bin/g++ in CMAKE_ARGS"
        else:
            host_named = host[1]
            env.append("CUDAHOSTCXX=g++")
        causes.append(
            f"{', '.join(cuda)} links libstdc++ statically (nvcc links it with the CUDA host compiler, {host_named}, "
            "which does that)"
        )
    return (
        f": {'; '.join(causes)}, so each library carries its own copy and they clash when a model loads.\n"
        "  -> Build with compilers that link libstdc++ dynamically, e.g. the system's: "
        f"{' '.join([*env, 'python scripts/build_llamacpp.py --rebuild'])}{cmake_args}"
    )


def install_wheel(wheel: Path) -> None:
    # --force-reinstall: the same version built with other flags must replace the installed one.
    run([sys.executable, "-m", "pip", "install", "--no-deps", "--force-reinstall", str(wheel)])
    run([sys.executable, "-m", "pip", "install", str(wheel)])  # its dependencies (numpy, diskcache, jinja2)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--version", default=DEFAULT_VERSION, help="llama-cpp-python version")
    parser.add_argument("--dir", type=Path, default=None, help="where to keep sdist, wheel, converter, tools")
    parser.add_argument("--cuda", action="store_true", help="build with -DGGML_CUDA=ON (ignored if CMAKE_ARGS set)")
    parser.add_argument("--no-tools", action="store_true", help="skip llama-imatrix / llama-quantize")
    parser.add_argument("--no-install", action="store_true", help="build the wheel but do not pip-install it")
    parser.add_argument("--rebuild", action="store_true", help="rebuild even if a wheel for these flags exists")
    parser.add_argument("--keep-build", action="store_true", help="keep the source and CMake build tree")
    parser.add_argument("--print-dir", action="store_true", help="print the version folder and exit")
    parser.add_argument("-j", "--jobs", type=int, default=None)
    parser.add_argument(
        "--skip-compiler-check",
        action="store_true",
        help="build even with a C++ compiler that links libstdc++ statically (the smoke check still runs)",
    )
    args = parser.parse_args()

    root = args.dir or default_dir()
    vdir = root / args.version
    if args.print_dir:
        print(vdir)
        return
    flags = os.environ.get("CMAKE_ARGS") or (CUDA_FLAGS if args.cuda else CPU_FLAGS)
    flags = " ".join([*flags.split(), FIXED_ARGS])
    cpu = _worker_module().cpu_identity()
    key = cache_key(flags, cpu)
    jobs = args.jobs or int(os.environ.get("CMAKE_BUILD_PARALLEL_LEVEL") or os.cpu_count() or 1)
    wheel_dir, bin_dir, conv_dir = vdir / "wheels" / key, vdir / "bin" / key, vdir / "converter"
    stamp_path = vdir / STAMP
    stamp = json.loads(stamp_path.read_text()) if stamp_path.is_file() else {}
    builds = stamp.get("builds", {})

    start = time.perf_counter()
    wheels = sorted(wheel_dir.glob("llama_cpp_python-*.whl")) if wheel_dir.is_dir() else []
    need_wheel = args.rebuild or not wheels
    need_tools = not args.no_tools and (args.rebuild or not all((bin_dir / t).is_file() for t in TOOLS))
    need_converter = args.rebuild or not (conv_dir / "convert_hf_to_gguf.py").is_file()
    log(f"llama-cpp-python {args.version}, CMAKE_ARGS='{flags}' (key {key}), folder {vdir}")

    if (need_wheel or need_tools) and not args.skip_compiler_check:
        problem = compiler_problem(flags)
        if problem:  # bad input, before anything is made or fetched
            print(f"error: {problem}", file=sys.stderr)
            raise SystemExit(2)
    vdir.mkdir(parents=True, exist_ok=True)
    build_seconds = None
    if need_wheel or need_tools or need_converter:
        sdist = fetch_sdist(args.version, vdir)
        # Source and CMake build tree persist until success, so an interrupted build resumes.
        work = vdir / "work"
        src = unpack(sdist, work / "src")
        build_dir = work / f"build-{key}"
        ok = False
        try:
            if need_converter:
                extract_converter(src, conv_dir)
                log(f"converter extracted to {conv_dir}")
            if need_wheel or need_tools:
                t0 = time.perf_counter()
                wheel = build_wheel(src, build_dir, wheel_dir, flags, jobs)
                log(f"wheel built in {time.perf_counter() - t0:.0f} s: {wheel}")
                if not args.no_tools:
                    t1 = time.perf_counter()
                    build_tools(src, build_dir, bin_dir, jobs)
                    log(f"tools built in {time.perf_counter() - t1:.0f} s: {bin_dir}")
                build_seconds = round(time.perf_counter() - t0, 1)
            ok = True
        finally:
            if ok and not args.keep_build:
                shutil.rmtree(work, ignore_errors=True)
            elif not ok:
                log(f"build failed or was interrupted; {work} is kept, so running this again resumes it")
        wheels = sorted(wheel_dir.glob("llama_cpp_python-*.whl"))
    else:
        log("wheel, tools and converter already present for these flags: reusing them")

    entry = builds.get(key, {})
    entry.update({"cmake_args": flags, "wheel": str(wheels[-1]), "native": is_native(flags)})
    if bin_dir.is_dir() and all((bin_dir / t).is_file() for t in TOOLS):
        entry["bin"] = str(bin_dir)
    if build_seconds is not None:
        entry["build_seconds"] = build_seconds
    active = key
    failure = None
    if args.no_install:
        log("not installed (--no-install), so not smoke-checked and not made the active build")
        active = stamp.get("active")
    else:
        install_wheel(wheels[-1])
        smoke = smoke_check(conv_dir)
        cpu_text = f"{smoke['cpu'].get('model')} ({' '.join(smoke['cpu'].get('flags', [])) or 'no listed flags'})"
        checked = ", ".join(f"{t} {d:.3f}" for t, d in smoke.get("checked", {}).items())
        entry["smoke"] = {k: smoke.get(k) for k in ("ok", "checked", "problem", "seconds")}
        passed = [c for c in entry.get("passed_on", []) if c != smoke["cpu"]]
        if smoke.get("ok"):
            entry["passed_on"] = [*passed, smoke["cpu"]]
            log(f"smoke check passed on {cpu_text}: logits finite; relative distance to f16: {checked}")
        else:
            entry["passed_on"] = passed
            failure = f"smoke check FAILED on {cpu_text}: {smoke.get('problem')}" + (
                f" (passed first: {checked})" if checked else ""
            )
            previous = builds.get(stamp.get("active") or "", {})
            if stamp.get("active") not in (None, key) and smoke["cpu"] in previous.get("passed_on", []):
                install_wheel(Path(previous["wheel"]))  # back to the build that decodes here
                active = stamp["active"]
            else:
                active = None
    builds[key] = entry
    stamp = {"llama_cpp_python": args.version, "converter": str(conv_dir), "builds": builds, "active": active}
    tmp = stamp_path.with_suffix(".tmp")
    tmp.write_text(json.dumps(stamp, indent=2) + "\n")
    os.replace(tmp, stamp_path)
    if failure:
        log(failure)
        raise SystemExit(
            "error: this llama.cpp build does not decode correctly on this CPU, so it is not made active"
            + (f" (the previous build {active} is reinstalled)" if active else "")
            + failure_hint(flags)
        )
    log(f"done in {time.perf_counter() - start:.0f} s; llmopt's gguf backend reads {stamp_path}")


if __name__ == "__main__":
    try:
        main()
    except KeyboardInterrupt:
        print("\n[build_llamacpp] interrupted; run it again to resume", file=sys.stderr)
        raise SystemExit(130) from None
    except subprocess.CalledProcessError as exc:  # the command's own output, above, says why
        cmd = " ".join(str(c) for c in exc.cmd) if isinstance(exc.cmd, list) else str(exc.cmd)
        raise SystemExit(
            f"error: `{cmd}` failed (exit {exc.returncode}); its output is above.\n"
            "  -> For a download: check the network and --version; for a build: the compiler's first error above."
        ) from None
