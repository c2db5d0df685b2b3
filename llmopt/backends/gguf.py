"""GGUF through llama.cpp's own tools: its HF converter, its quantizer, its importance matrix.

    HF folder --convert_hf_to_gguf.py--> f16/bf16 GGUF --llama_model_quantize--> TYPE GGUF
                                              |                                   ^
                                              +--llama-imatrix (calibration)--> imatrix (optional)

- The converter is llama.cpp's ``convert_hf_to_gguf.py`` with its own ``conversion/`` package and
  ``gguf-py`` (PyPI ``gguf`` lags behind it), taken from the llama-cpp-python sdist of the installed
  version by ``scripts/build_llamacpp.py``, which also builds that wheel and llama.cpp's
  ``llama-imatrix`` tool from the same source. Nothing is downloaded at run time.
- Quantization calls llama.cpp's ``llama_model_quantize`` through llama-cpp-python, in a child
  process: llama.cpp aborts the process on some errors, and the artifact staging folder must still
  be cleaned up. An importance matrix file (llama.cpp's GGUF or legacy ``.dat`` format) is read here
  and handed to the same call, exactly as ``llama-quantize --imatrix`` does.
- ``imatrix: auto`` computes the matrix with ``llama-imatrix`` on the calibration samples (decoded to
  text, since the tool tokenizes itself); the matrix is kept in the artifact as ``imatrix.gguf``.
- The artifact holds the ``.gguf`` file, the source's tokenizer files (evaluation checks that the
  artifact tokenizes like its baseline) and ``llmopt.json``.
"""

from __future__ import annotations

import ast
import difflib
import importlib.metadata
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path
from typing import Any

from pydantic import BaseModel, ConfigDict, Field, field_validator
from pydantic_core import PydanticCustomError

from llmopt.backends.base import Backend, QuantizeInputs, Requirement
from llmopt.errors import BackendUnavailableError, DataError, ModelError, OptionsError
from llmopt.source import SourceModel, cache_dir

BUILD_SCRIPT = "python scripts/build_llamacpp.py"
STAMP = "llmopt-llamacpp.json"
IMATRIX_NAME = "imatrix.gguf"


@dataclass(frozen=True)
class QuantType:
    name: str  # llmopt's spelling: lower case, as llama-quantize accepts it
    ftype: int  # llama_ftype (llama.h); stable ABI values
    imatrix: str  # "required", "recommended" or "unused"
    about: str

    @property
    def file_tag(self) -> str:
        return self.name.upper()

    @property
    def is_float(self) -> bool:
        return self.name in ("f32", "f16", "bf16")


_TYPES = (
    QuantType("f32", 0, "unused", "32-bit float, no quantization"),
    QuantType("f16", 1, "unused", "16-bit float"),
    QuantType("bf16", 32, "unused", "bfloat16"),
    QuantType("q8_0", 7, "unused", "8.5 bpw, round-to-nearest blocks of 32"),
    QuantType("q4_0", 2, "recommended", "4.5 bpw, legacy"),
    QuantType("q4_1", 3, "recommended", "5.0 bpw, legacy"),
    QuantType("q5_0", 8, "recommended", "5.5 bpw, legacy"),
    QuantType("q5_1", 9, "recommended", "6.0 bpw, legacy"),
    QuantType("q2_k", 10, "recommended", "k-quant mix around 2.6 bpw"),
    QuantType("q2_k_s", 21, "required", "k-quant mix around 2.6 bpw, smaller"),
    QuantType("q3_k_s", 11, "recommended", "k-quant mix around 3.4 bpw"),
    QuantType("q3_k_m", 12, "recommended", "k-quant mix around 3.7 bpw"),
    QuantType("q3_k_l", 13, "recommended", "k-quant mix around 4.0 bpw"),
    QuantType("q4_k_s", 14, "recommended", "k-quant mix around 4.4 bpw"),
    QuantType("q4_k_m", 15, "recommended", "k-quant mix around 4.6 bpw (common default)"),
    QuantType("q5_k_s", 16, "recommended", "k-quant mix around 5.2 bpw"),
    QuantType("q5_k_m", 17, "recommended", "k-quant mix around 5.3 bpw"),
    QuantType("q6_k", 18, "recommended", "6.6 bpw k-quant"),
    QuantType("iq1_s", 24, "required", "1.56 bpw i-quant"),
    QuantType("iq1_m", 31, "required", "1.75 bpw i-quant"),
    QuantType("iq2_xxs", 19, "required", "2.06 bpw i-quant"),
    QuantType("iq2_xs", 20, "required", "2.31 bpw i-quant"),
    QuantType("iq2_s", 28, "required", "2.5 bpw i-quant"),
    QuantType("iq2_m", 29, "required", "2.7 bpw i-quant mix"),
    QuantType("iq3_xxs", 23, "required", "3.06 bpw i-quant"),
    QuantType("iq3_xs", 22, "recommended", "3.3 bpw i-quant"),
    QuantType("iq3_s", 26, "recommended", "3.44 bpw i-quant"),
    QuantType("iq3_m", 27, "recommended", "3.66 bpw i-quant mix"),
    QuantType("iq4_nl", 25, "recommended", "4.5 bpw non-linear"),
    QuantType("iq4_xs", 30, "recommended", "4.25 bpw non-linear"),
)
QUANT_TYPES: dict[str, QuantType] = {t.name: t for t in _TYPES}
# llama-quantize's own aliases.
ALIASES = {"q3_k": "q3_k_m", "q4_k": "q4_k_m", "q5_k": "q5_k_m"}


def normalize_quant_type(name: str) -> str:
    """Lower-case, ``-`` -> ``_``, aliases resolved; raises ValueError naming the closest valid types."""
    key = name.strip().lower().replace("-", "_")
    key = ALIASES.get(key, key)
    if key in QUANT_TYPES:
        return key
    raise ValueError(unknown_type_message(name))


def suggest_quant_types(name: str, n: int = 3) -> list[str]:
    key = name.strip().lower().replace("-", "_")
    candidates = [*QUANT_TYPES, *ALIASES]
    close = difflib.get_close_matches(key, candidates, n=n, cutoff=0.5)
    if not close:  # "q4km": compare without underscores too
        squashed = {c.replace("_", ""): c for c in candidates}
        close = [squashed[c] for c in difflib.get_close_matches(key.replace("_", ""), list(squashed), n=n)]
    return list(dict.fromkeys(ALIASES.get(c, c) for c in close))


def unknown_type_message(name: str) -> str:
    close = suggest_quant_types(name)
    hint = f" (did you mean {' or '.join(repr(c) for c in close)}?)" if close else ""
    return f"unknown GGUF type '{name}'{hint}; types: {', '.join(QUANT_TYPES)}"


class GGUFOptions(BaseModel):
    """llama.cpp quantization; defaults follow llama.cpp's common practice (Q4_K_M, no imatrix)."""

    model_config = ConfigDict(extra="forbid")
    quant_type: str = Field("q4_k_m", description="llama.cpp type: q8_0, q6_k, q5_k_m, q4_k_m, iq4_xs, f16, ...")
    imatrix: str = Field(
        "none",
        description="Importance matrix: none, auto (computed from --calibration text), or a path to an "
        "imatrix file (llama-imatrix's .gguf or legacy .dat).",
    )
    threads: int | None = Field(None, ge=1, description="CPU threads for converting/quantizing (default: all).")
    pure: bool = Field(False, description="Every tensor in the base type (no k-quant mix).")

    @field_validator("quant_type")
    @classmethod
    def _known_type(cls, value: str) -> str:
        try:
            return normalize_quant_type(value)
        except ValueError as exc:
            raise PydanticCustomError("gguf_quant_type", str(exc)) from None

    @field_validator("imatrix")
    @classmethod
    def _imatrix_spec(cls, value: str) -> str:
        value = value.strip()
        if not value:
            raise PydanticCustomError("gguf_imatrix", "empty; use none, auto or a file path")
        return value.lower() if value.lower() in ("none", "auto") else value


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
    env = _child_env()
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
        return {"ok": False, "problem": f"the smoke decode failed (exit {proc.returncode}): {_tail(proc.stderr, 2)}"}
    result: dict[str, Any] = json.loads(lines[-1])
    return result


def _setup_hint() -> str:
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
            _setup_hint(),
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


# --- the backend -------------------------------------------------------------------------------------


class GGUFBackend(Backend):
    name = "gguf"
    format = "gguf"
    runner = "llamacpp"
    needs_calibration = False
    description = (
        "llama.cpp GGUF (q8_0, k-quants, i-quants; optional importance matrix); served by llama.cpp, Ollama, LM Studio."
    )
    Options = GGUFOptions
    requirements = (
        Requirement("llama_cpp", "llama-cpp-python", "gguf"),
        Requirement("torch", "torch", "core"),
        Requirement("transformers", "transformers", "core"),
        Requirement("gguf", "gguf", "core"),
        Requirement("sentencepiece", "sentencepiece", "gguf"),  # the converter imports it for Llama models
    )

    note: str | None = None  # after check(): whether the built llama.cpp decodes on this CPU

    def check(self) -> list[str]:
        problems = []
        for r in self.requirements:
            if r.present():
                continue
            if r.module == "llama_cpp":  # no wheels on PyPI: the build script compiles and installs it
                problems.append(
                    "missing Python package 'llama-cpp-python' (PyPI has no wheels of it): run "
                    f"`{BUILD_SCRIPT}` in the llmopt source tree (compiles and installs it, ~10 minutes once), "
                    "then pip install -e '.[gguf]'"
                )
            else:
                problems.append(f"missing Python package '{r.package}': {r.install_hint()}")
        if problems:
            return problems
        chain = find_toolchain()
        if chain is None:
            return [
                f"llama.cpp's converter for llama-cpp-python {installed_llama_cpp_version()} is not set up: "
                + _setup_hint()
            ]
        ok, text = decode_check(chain)
        if not ok:
            return [text]
        self.note = text
        return []

    def library_versions(self) -> dict[str, str]:
        versions = super().library_versions()
        versions["llama.cpp converter"] = f"from llama-cpp-python {installed_llama_cpp_version()} sdist"
        return versions

    def wants_calibration(self, options: BaseModel) -> bool:
        assert isinstance(options, GGUFOptions)
        return options.imatrix == "auto"

    def validate(self, options: BaseModel, source: SourceModel, device: str) -> None:
        assert isinstance(options, GGUFOptions)
        qt = QUANT_TYPES[options.quant_type]
        if options.imatrix != "none" and qt.imatrix == "unused":
            raise OptionsError(
                f"{qt.name} does not use an importance matrix (imatrix={options.imatrix}).",
                "Leave out --imatrix, or pick a quantized type such as q4_k_m or iq4_xs.",
            )
        if options.imatrix == "none" and qt.imatrix == "required":
            raise OptionsError(
                f"GGUF type {qt.name} needs an importance matrix: llama.cpp refuses to quantize to it without one.",
                "Pass --imatrix auto --calibration TEXT_FILE (computed here), or --imatrix FILE (from llama-imatrix).",
            )
        if options.imatrix not in ("none", "auto"):
            if not Path(options.imatrix).expanduser().is_file():
                raise OptionsError(
                    f"imatrix file '{options.imatrix}' does not exist.",
                    "Give a file written by llama-imatrix, or --imatrix auto to compute one from --calibration.",
                )
            load_imatrix(Path(options.imatrix).expanduser())  # a malformed file fails here, in a second
        chain = require_toolchain()
        check_architecture(source, chain)
        if options.imatrix == "auto" and chain.imatrix_tool is None:
            raise BackendUnavailableError(
                "--imatrix auto needs llama.cpp's llama-imatrix tool, which is not built here.",
                f"Run `{BUILD_SCRIPT}` without --no-tools, or pass --imatrix FILE.",
            )

    def quantize(self, inputs: QuantizeInputs) -> dict[str, Any]:
        opts = inputs.options
        assert isinstance(opts, GGUFOptions)
        chain = require_toolchain()
        qt = QUANT_TYPES[opts.quant_type]
        threads = opts.threads or _cpu_count()
        stem = _model_stem(inputs.source)
        # Absolute: the converter runs in its own folder, where a relative -o or model path means nothing.
        out_dir = inputs.out_dir.resolve()
        final = out_dir / f"{stem}-{qt.file_tag}.gguf"
        extra: dict[str, Any] = {"gguf_file": final.name, "threads": threads}
        # Intermediate files go next to the staging folder (same disk), never into it.
        work = Path(tempfile.mkdtemp(prefix=".llmopt-gguf-", dir=out_dir.parent))
        try:
            if qt.is_float:
                with inputs.reporter.step(f"converting to GGUF {qt.file_tag} with llama.cpp's converter"):
                    extra["convert_seconds"] = _convert(chain, inputs.source, qt.name, final)
            else:
                intermediate = work / f"{stem}-convert.gguf"
                with inputs.reporter.step("converting to GGUF (16-bit) with llama.cpp's converter"):
                    extra["convert_seconds"] = _convert(chain, inputs.source, "auto", intermediate)
                imatrix_file: Path | None = None
                if opts.imatrix == "auto":
                    assert inputs.calibration is not None
                    n = len(inputs.calibration.samples)
                    with inputs.reporter.step(f"importance matrix with llama-imatrix ({n} calibration samples)"):
                        imatrix_file = out_dir / IMATRIX_NAME
                        extra["imatrix"] = _compute_imatrix(chain, intermediate, inputs, imatrix_file, work, threads)
                elif opts.imatrix != "none":
                    imatrix_file = Path(opts.imatrix).expanduser().resolve()
                    extra["imatrix"] = {"file": str(imatrix_file), "sha256": _sha256(imatrix_file)}
                with inputs.reporter.step(f"quantizing to {qt.file_tag} with llama.cpp"):
                    extra["quantize_seconds"] = _run_quantize_worker(
                        intermediate, final, qt, threads, imatrix_file, opts.pure,
                        imatrix_label=IMATRIX_NAME if opts.imatrix == "auto" else str(opts.imatrix),
                    )  # fmt: skip
            extra["tensor_types"] = _tensor_type_counts(final)
            with inputs.reporter.step("saving tokenizer files"):
                _save_tokenizer(inputs)
        finally:
            shutil.rmtree(work, ignore_errors=True)
        return extra


# --- steps (each a child process, so a crash inside llama.cpp cannot leave files behind) --------------


def _cpu_count() -> int:
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except AttributeError:  # not on Linux
        return max(1, os.cpu_count() or 1)


def _model_stem(source: SourceModel) -> str:
    spec = source.spec.rstrip("/")
    name = Path(spec).name if not spec.endswith(".gguf") else Path(spec).stem
    name = re.sub(r"[^\w.-]+", "-", name).strip("-.") or "model"
    return name


def _sha256(path: Path) -> str:
    from llmopt.artifact import sha256_file

    return sha256_file(path)


def _tail(text: str, n: int = 6) -> str:
    lines = [ln for ln in text.strip().splitlines() if ln.strip()]
    return "\n    ".join(lines[-n:])


def _child_env(threads: int | None = None) -> dict[str, str]:
    env = dict(os.environ, HF_HUB_OFFLINE="1", PYTHONUNBUFFERED="1")
    # With other work on the machine, busy-waiting OpenMP threads slow llama.cpp down (NOTES).
    env.setdefault("OMP_WAIT_POLICY", "passive")
    if threads:
        env.setdefault("OMP_NUM_THREADS", str(threads))
    return env


def _convert(chain: Toolchain, source: SourceModel, outtype: str, out: Path) -> float:
    script = chain.converter / "convert_hf_to_gguf.py"
    # cwd is the converter's folder (it imports its own gguf-py from there), so every path is absolute.
    cmd = [sys.executable, str(script.resolve()), str(source.path.resolve()), "--outfile", str(out.resolve()),
           "--outtype", outtype]  # fmt: skip
    start = time.perf_counter()
    proc = subprocess.run(cmd, capture_output=True, text=True, env=_child_env(), cwd=chain.converter.resolve())
    if proc.returncode != 0 or not out.is_file():
        log = proc.stdout + proc.stderr
        missing = re.search(r"No module named '([\w.]+)'", log)
        if missing:
            raise BackendUnavailableError(
                f"llama.cpp's converter needs the Python package '{missing.group(1)}'.",
                f"pip install {missing.group(1)}",
            )
        raise ModelError(
            f"llama.cpp's converter failed on {source.spec} (exit {proc.returncode}):\n    {_tail(log)}",
            "Check that the model folder is complete and its architecture is supported; "
            f"the command was: {' '.join(cmd)}",
        )
    return round(time.perf_counter() - start, 2)


def _compute_imatrix(
    chain: Toolchain, model: Path, inputs: QuantizeInputs, out: Path, work: Path, threads: int
) -> dict[str, Any]:
    """Run llama-imatrix over the calibration samples (decoded to text: the tool tokenizes itself)."""
    from transformers import AutoTokenizer

    calib = inputs.calibration
    assert calib is not None and chain.imatrix_tool is not None and chain.bin is not None
    tokenizer = AutoTokenizer.from_pretrained(inputs.source.path)
    text_file = work / "calibration.txt"
    text_file.write_text("".join(str(tokenizer.decode(s)) for s in calib.samples), encoding="utf-8")
    cmd = [
        str(chain.imatrix_tool), "-m", str(model), "-f", str(text_file), "-o", str(out),
        "-c", str(calib.seq_len), "--chunks", str(len(calib.samples)), "-t", str(threads),
        "--no-ppl", "-ofreq", "1000000",
    ]  # fmt: skip
    env = _child_env(threads)
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
            f"llama-imatrix failed (exit {proc.returncode}):\n    {_tail(proc.stdout + proc.stderr)}",
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


def _run_quantize_worker(
    src: Path, dst: Path, qt: QuantType, threads: int, imatrix: Path | None, pure: bool, *, imatrix_label: str
) -> float:
    cmd = [sys.executable, "-m", "llmopt.backends.gguf", "--quantize", str(src), str(dst),
           "--ftype", str(qt.ftype), "--threads", str(threads)]  # fmt: skip
    if imatrix is not None:
        cmd += ["--imatrix", str(imatrix), "--imatrix-label", imatrix_label]
    if pure:
        cmd.append("--pure")
    start = time.perf_counter()
    proc = subprocess.run(cmd, capture_output=True, text=True, env=_child_env(threads))
    if proc.returncode != 0 or not dst.is_file():
        log = proc.stdout + proc.stderr
        if "requires an imatrix" in log or "requires an importance matrix" in log:
            raise OptionsError(
                f"llama.cpp needs an importance matrix to quantize this model to {qt.name}.",
                "Pass --imatrix auto --calibration TEXT_FILE, or --imatrix FILE.",
            )
        errors = [ln for ln in log.splitlines() if "error" in ln.lower() or "failed" in ln.lower()]
        detail = "\n    ".join(errors[-4:]) if errors else _tail(log)
        raise ModelError(
            f"llama.cpp could not quantize to {qt.name} (exit {proc.returncode}):\n    {detail}",
            "Try another --quant-type (this model's tensor shapes may not fit it).",
        )
    return round(time.perf_counter() - start, 2)


def _tensor_type_counts(path: Path) -> dict[str, int] | None:
    """How many tensors of each type the file holds (k-quants fall back where shapes do not fit)."""
    try:
        from gguf import GGUFReader

        counts: dict[str, int] = {}
        for t in GGUFReader(path).tensors:
            counts[t.tensor_type.name] = counts.get(t.tensor_type.name, 0) + 1
        return dict(sorted(counts.items(), key=lambda kv: -kv[1]))
    except Exception:  # a type newer than the installed gguf package: informative only
        return None


def _save_tokenizer(inputs: QuantizeInputs) -> None:
    from transformers import AutoTokenizer

    AutoTokenizer.from_pretrained(inputs.source.path).save_pretrained(inputs.out_dir)


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

    parser = argparse.ArgumentParser(prog="python -m llmopt.backends.gguf")
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
