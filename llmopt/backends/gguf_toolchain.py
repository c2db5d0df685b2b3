"""Where llama.cpp's converter and tools live (built by scripts/build_llamacpp.py), and whether they work.

Used by the GGUF backend (gguf.py) and its importance-matrix step (gguf_imatrix.py).
"""

from __future__ import annotations

import ast
import difflib
import importlib.metadata
import json
import os
import re
import subprocess
import sys
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path
from typing import Any

from llmopt.errors import BackendUnavailableError, ModelError
from llmopt.source import SourceModel, cache_dir

BUILD_SCRIPT = "python scripts/build_llamacpp.py"
STAMP = "llmopt-llamacpp.json"


def log_tail(text: str, n: int = 6) -> str:
    lines = [ln for ln in text.strip().splitlines() if ln.strip()]
    return "\n    ".join(lines[-n:])


def child_env(threads: int | None = None) -> dict[str, str]:
    env = dict(os.environ, HF_HUB_OFFLINE="1", PYTHONUNBUFFERED="1")
    # With other work on the machine, busy-waiting OpenMP threads slow llama.cpp down (NOTES).
    env.setdefault("OMP_WAIT_POLICY", "passive")
    if threads:
        env.setdefault("OMP_NUM_THREADS", str(threads))
    return env


# --- where llama.cpp's converter and tools live -------------------------------------------------------


@dataclass(frozen=True)
class Toolchain:
    version: str  # llama-cpp-python version it was taken from
    root: Path  # DIR/<version>
    converter: Path  # folder holding convert_hf_to_gguf.py
    bin: Path | None  # folder holding llama-imatrix (+ its shared libraries), if built

    @property
    def imatrix_tool(self) -> Path | None:
        if self.bin is None:
            return None
        tool = self.bin / "llama-imatrix"
        return tool if tool.is_file() else None


def installed_llama_cpp_version() -> str | None:
    try:
        return importlib.metadata.version("llama_cpp_python")
    except importlib.metadata.PackageNotFoundError:
        return None


def toolchain_dirs() -> list[Path]:
    """Folders searched for ``<version>/`` trees: $LLMOPT_LLAMACPP_DIR alone, else the llmopt caches."""
    env = os.environ.get("LLMOPT_LLAMACPP_DIR")
    if env:
        return [Path(env).expanduser().absolute()]
    home = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "llmopt" / "llamacpp"
    dirs = [cache_dir() / "llamacpp", home]
    return list(dict.fromkeys(dirs))


def find_toolchain(version: str | None = None) -> Toolchain | None:
    """The converter (and tools) set up for ``version`` (default: the installed llama-cpp-python)."""
    version = version or installed_llama_cpp_version()
    if version is None:
        return None
    for base in toolchain_dirs():
        root = base / version
        converter = root / "converter"
        if not (converter / "convert_hf_to_gguf.py").is_file():
            continue
        bin_dir = None
        stamp = root / STAMP
        if stamp.is_file():
            try:
                data = json.loads(stamp.read_text())
                active = data.get("builds", {}).get(data.get("active", ""), {})
                bin_dir = Path(active["bin"]) if active.get("bin") else None
            except (ValueError, KeyError, TypeError):
                bin_dir = None
        return Toolchain(version=version, root=root, converter=converter, bin=bin_dir)
    return None


def decode_check(chain: Toolchain, *, timeout: float = 600) -> tuple[bool, str]:
    """Whether the active llama.cpp build decodes correctly on this CPU, and a line saying how it is known.

    Known from the build's stamp (the CPUs its smoke check passed on), else from a smoke check run here
    in a child process (a crash must not take the caller down), remembered per build and CPU.
    """
    from llmopt.runners.llamacpp_worker import cpu_identity, same_cpu

    cpu = cpu_identity()
    try:
        data = json.loads((chain.root / STAMP).read_text())
    except (OSError, ValueError):
        data = {}
    builds = data.get("builds") if isinstance(data.get("builds"), dict) else {}
    key = data.get("active") if isinstance(data, dict) else None
    entry = builds.get(key, {}) if key else {}
    rebuild = f"Rebuild with `{BUILD_SCRIPT} --rebuild` (portable by default: -DGGML_NATIVE=OFF)."
    if data and key is None:
        failed = [b.get("smoke", {}).get("problem") for b in builds.values() if b.get("smoke", {}).get("ok") is False]
        return (
            False,
            f"the llama.cpp build failed its smoke decode here ({failed[-1] if failed else 'no details'}). " + rebuild,
        )
    if any(same_cpu(c, cpu) for c in entry.get("passed_on", [])):
        checked = ", ".join(entry.get("smoke", {}).get("checked") or {})
        return True, f"llama.cpp decodes on this CPU ({cpu['model']}; smoke check at build time: f16, {checked})."
    memo_path = cache_dir() / "llamacpp-smoke.json"
    wheel = str(entry.get("wheel") or "")
    if wheel and Path(wheel).is_file():  # a rebuild in place (same flags and path) must not reuse the verdict
        wheel += f"@{Path(wheel).stat().st_mtime_ns}"
    memo_key = f"{chain.version}:{key}:{wheel}:{json.dumps(cpu, sort_keys=True)}"
    try:
        memo = json.loads(memo_path.read_text())
    except (OSError, ValueError):
        memo = {}
    result = memo.get(memo_key) if isinstance(memo, dict) else None
    if not isinstance(result, dict):
        result = _run_smoke(chain, timeout)
        memo = memo if isinstance(memo, dict) else {}
        memo[memo_key] = result
        memo_path.parent.mkdir(parents=True, exist_ok=True)
        tmp = memo_path.with_name(f".{memo_path.name}.{os.getpid()}")
        tmp.write_text(json.dumps(memo, indent=2) + "\n")
        os.replace(tmp, memo_path)
    if result.get("ok"):
        checked = ", ".join(result.get("checked") or {})
        return True, f"llama.cpp decodes on this CPU ({cpu['model']}; smoke check run here: f16, {checked})."
    return (
        False,
        f"the built llama.cpp does not decode correctly on this CPU ({cpu['model']}): {result.get('problem')}. "
        + rebuild,
    )


def _run_smoke(chain: Toolchain, timeout: float) -> dict[str, Any]:
    cmd = [sys.executable, "-m", "llmopt.runners.llamacpp_worker", "smoke", "--converter", str(chain.converter)]
    env = child_env()
    package_root = str(Path(__file__).resolve().parents[2])
    env["PYTHONPATH"] = os.pathsep.join(p for p in (package_root, env.get("PYTHONPATH", "")) if p)
    try:
        proc = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=timeout)
    except subprocess.TimeoutExpired:
        return {"ok": False, "problem": f"the smoke decode did not finish in {timeout:.0f} s"}
    lines = [ln for ln in proc.stdout.splitlines() if ln.startswith("{")]
    if proc.returncode < 0:
        import signal

        try:
            sig = signal.Signals(-proc.returncode).name
        except ValueError:
            sig = f"signal {-proc.returncode}"
        return {"ok": False, "problem": f"llama.cpp crashed ({sig}) decoding a tiny model"}
    if not lines:
        return {"ok": False, "problem": f"the smoke decode failed (exit {proc.returncode}): {log_tail(proc.stderr, 2)}"}
    result: dict[str, Any] = json.loads(lines[-1])
    return result


def setup_hint() -> str:
    return (
        f"Run `{BUILD_SCRIPT}` from the llmopt source tree (builds llama-cpp-python and sets up llama.cpp's "
        "converter and llama-imatrix), or point LLMOPT_LLAMACPP_DIR at a folder it prepared."
    )


def require_toolchain() -> Toolchain:
    version = installed_llama_cpp_version()
    chain = find_toolchain(version)
    if chain is None:
        where = ", ".join(str(d / (version or "VERSION")) for d in toolchain_dirs())
        raise BackendUnavailableError(
            f"llama.cpp's converter for llama-cpp-python {version} is not set up (looked in {where}).",
            setup_hint(),
        )
    return chain


@lru_cache(maxsize=8)
def converter_architectures(converter: Path) -> frozenset[str]:
    """HF architecture names the converter registers, read from its source without importing it."""
    package_init = converter / "conversion" / "__init__.py"
    if package_init.is_file():  # llama.cpp >= mid-2026: a TEXT_MODEL_MAP literal in conversion/
        tree = ast.parse(package_init.read_text(encoding="utf-8"))
        for node in ast.walk(tree):
            target = getattr(node, "target", None) or (getattr(node, "targets", None) or [None])[0]
            if isinstance(target, ast.Name) and target.id == "TEXT_MODEL_MAP":
                value = getattr(node, "value", None)
                if isinstance(value, ast.Dict):
                    return frozenset(
                        str(k.value) for k in value.keys if isinstance(k, ast.Constant) and isinstance(k.value, str)
                    )
    # older single-file converters: @ModelBase.register("A", "B") decorators
    text = (converter / "convert_hf_to_gguf.py").read_text(encoding="utf-8")
    names: set[str] = set()
    for args in re.findall(r"@(?:ModelBase|Model)\.register\(([^)]*)\)", text):
        names.update(re.findall(r"[\"']([\w.-]+)[\"']", args))
    return frozenset(names)


def source_architecture(config: dict[str, Any]) -> str | None:
    """The architecture the converter dispatches on (its get_model_architecture, text models)."""
    text_cfg = config.get("text_config") or {}
    if text_cfg.get("architectures"):
        return str(text_cfg["architectures"][0])
    archs = config.get("architectures") or []
    return str(archs[0]) if archs else None


def check_architecture(source: SourceModel, chain: Toolchain) -> None:
    arch = source_architecture(source.config)
    known = converter_architectures(chain.converter)
    if not known:  # unreadable layout: let the converter decide
        return
    if arch is None:
        raise ModelError(
            f"{source.path}/config.json names no architecture, so llama.cpp's converter cannot pick one.",
            "Give a model whose config.json has an `architectures` entry.",
        )
    if arch not in known:
        close = difflib.get_close_matches(arch, sorted(known), n=3, cutoff=0.6)
        near = f" Close names it supports: {', '.join(close)}." if close else ""
        raise ModelError(
            f"architecture '{arch}' is not supported by llama.cpp's converter "
            f"(llama-cpp-python {chain.version}, {len(known)} architectures).{near}",
            "Pick a model of a supported architecture, or rebuild with a newer llama-cpp-python "
            f"(`{BUILD_SCRIPT} --version X.Y.Z`) if llama.cpp has added it since.",
        )
