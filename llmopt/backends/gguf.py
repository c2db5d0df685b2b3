"""GGUF through llama.cpp's own tools: its HF converter, its quantizer, its importance matrix.

    HF folder --convert_hf_to_gguf.py--> f16/bf16 GGUF --llama_model_quantize--> TYPE GGUF
                                              |                                   ^
                                              +--llama-imatrix (calibration)--> imatrix (optional)

- The converter is llama.cpp's ``convert_hf_to_gguf.py`` with its own ``conversion/`` package and
  ``gguf-py`` (PyPI ``gguf`` lags behind it), taken from the llama-cpp-python sdist of the installed
  version by ``scripts/build_llamacpp.py``, which also builds that wheel and llama.cpp's
  ``llama-imatrix`` tool from the same source. Nothing is downloaded at run time.
- Right after converting, llama.cpp (vocabulary only, in a child process) must tokenize a few texts
  exactly like the source's HF tokenizer (``gguf_vocab.py``): a converted vocabulary that llama.cpp
  cannot use (llama-server, llama-imatrix, ... would fail on every request) stops the variant there,
  with the first difference and the fix, before anything is quantized or kept.
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

import difflib
import re
import shutil
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from pydantic import BaseModel, ConfigDict, Field, field_validator
from pydantic_core import PydanticCustomError

from llmopt.backends import gguf_toolchain as toolchain
from llmopt.backends.base import Backend, QuantizeInputs, Requirement, save_tokenizer
from llmopt.backends.format_card import FormatCard, LoadSnippet
from llmopt.backends.gguf_imatrix import compute_imatrix, load_imatrix
from llmopt.backends.gguf_toolchain import (
    BUILD_SCRIPT,
    Toolchain,
    check_architecture,
    child_env,
    log_tail,
    require_toolchain,
)
from llmopt.backends.gguf_toolchain import (
    STAMP as STAMP,
)
from llmopt.backends.gguf_toolchain import (
    converter_architectures as converter_architectures,
)
from llmopt.backends.gguf_vocab import check_gguf_vocab
from llmopt.environment import cpu_count
from llmopt.errors import BackendUnavailableError, ModelError, OptionsError
from llmopt.source import SourceModel
from llmopt.units import WholeNumber

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

    @property
    def bit_width(self) -> str:
        """Bits per weight in words: '8.5 bpw', '~4.6 bpw' for a k-quant mix, '16-bit' for a float type."""
        if self.is_float:
            return "32-bit" if self.name == "f32" else "16-bit"
        m = re.search(r"([0-9.]+) bpw", self.about)
        if not m:
            return self.about
        return f"~{m.group(1)} bpw" if "around" in self.about else f"{m.group(1)} bpw"


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
    threads: WholeNumber | None = Field(None, ge=1, description="CPU threads for converting/quantizing (default: all).")
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
        chain = toolchain.find_toolchain()
        if chain is None:
            return [
                f"llama.cpp's converter for llama-cpp-python {toolchain.installed_llama_cpp_version()} is not set up: "
                + toolchain.setup_hint()
            ]
        ok, text = toolchain.decode_check(chain)
        if not ok:
            return [text]
        self.note = text
        return []

    def library_versions(self) -> dict[str, str]:
        versions = super().library_versions()
        versions["llama.cpp converter"] = f"from llama-cpp-python {toolchain.installed_llama_cpp_version()} sdist"
        return versions

    def format_card(self, options: dict[str, Any], repo_id: str, revision: str | None = None) -> FormatCard:
        qt = QUANT_TYPES.get(str(options.get("quant_type") or "").lower())
        return FormatCard(
            format=self.format,
            library_name="gguf",  # the Hub's library id for GGUF repos (its model list filters on library=gguf)
            tags=["gguf"],
            bits=None,  # a k-quant mixes widths: no one number of bits
            bit_width=qt.bit_width if qt else None,
            quant_type=qt.name if qt else None,
            load=[LoadSnippet(intro="With llama.cpp:", language="bash", code=f"llama-cli -hf {repo_id}")],
        )

    def wants_calibration(self, options: BaseModel) -> bool:
        assert isinstance(options, GGUFOptions)
        return options.imatrix == "auto"

    def unused_calibration(self, options: BaseModel) -> tuple[str, str]:
        assert isinstance(options, GGUFOptions)
        return (
            f"gguf with imatrix={options.imatrix} reads no calibration text (only --imatrix auto computes an "
            "importance matrix from it), so --calibration would be ignored.",
            "Drop --calibration, or pass --imatrix auto to compute the importance matrix from it.",
        )

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
        threads = opts.threads or cpu_count()
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
                extra["vocab_check"] = _check_vocab(inputs, final)
            else:
                intermediate = work / f"{stem}-convert.gguf"
                with inputs.reporter.step("converting to GGUF (16-bit) with llama.cpp's converter"):
                    extra["convert_seconds"] = _convert(chain, inputs.source, "auto", intermediate)
                extra["vocab_check"] = _check_vocab(inputs, intermediate)
                imatrix_file: Path | None = None
                if opts.imatrix == "auto":
                    assert inputs.calibration is not None
                    n = len(inputs.calibration.samples)
                    with inputs.reporter.step(f"importance matrix with llama-imatrix ({n} calibration samples)"):
                        imatrix_file = out_dir / IMATRIX_NAME
                        extra["imatrix"] = compute_imatrix(chain, intermediate, inputs, imatrix_file, work, threads)
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
                save_tokenizer(inputs)
        finally:
            shutil.rmtree(work, ignore_errors=True)
        return extra


# --- steps (each a child process, so a crash inside llama.cpp cannot leave files behind) --------------


def _model_stem(source: SourceModel) -> str:
    spec = source.spec.rstrip("/")
    name = Path(spec).name if not spec.endswith(".gguf") else Path(spec).stem
    name = re.sub(r"[^\w.-]+", "-", name).strip("-.") or "model"
    return name


def _sha256(path: Path) -> str:
    from llmopt.artifact import sha256_file

    return sha256_file(path)


def _convert(chain: Toolchain, source: SourceModel, outtype: str, out: Path) -> float:
    script = chain.converter / "convert_hf_to_gguf.py"
    # cwd is the converter's folder (it imports its own gguf-py from there), so every path is absolute.
    cmd = [sys.executable, str(script.resolve()), str(source.path.resolve()), "--outfile", str(out.resolve()),
           "--outtype", outtype]  # fmt: skip
    start = time.perf_counter()
    proc = subprocess.run(cmd, capture_output=True, text=True, env=child_env(), cwd=chain.converter.resolve())
    if proc.returncode != 0 or not out.is_file():
        log = proc.stdout + proc.stderr
        missing = re.search(r"No module named '([\w.]+)'", log)
        if missing:
            raise BackendUnavailableError(
                f"llama.cpp's converter needs the Python package '{missing.group(1)}'.",
                f"pip install {missing.group(1)}",
            )
        raise ModelError(
            f"llama.cpp's converter failed on {source.spec} (exit {proc.returncode}):\n    {log_tail(log)}",
            "Check that the model folder is complete and its architecture is supported; "
            f"the command was: {' '.join(cmd)}",
        )
    return round(time.perf_counter() - start, 2)


def _check_vocab(inputs: QuantizeInputs, converted: Path) -> dict[str, Any]:
    """llama.cpp must tokenize the converted file like the source's HF tokenizer (ModelError if not)."""
    with inputs.reporter.step("checking that llama.cpp tokenizes like the source model"):
        try:
            result = check_gguf_vocab(
                converted,
                inputs.source.path,
                trust_remote_code=inputs.source.trust_remote_code,
                calibration=inputs.calibration.samples if inputs.calibration is not None else None,
            )
        except BaseException:
            converted.unlink(missing_ok=True)  # an f16/bf16 result sits in the staging folder: never keep it
            raise
    if result.get("calibration_tokens_differing"):
        inputs.reporter.info(
            f"llama.cpp splits {result['calibration_tokens_differing']} calibration tokens differently from the HF "
            f"tokenizer (within tolerance); first: {result['first_calibration_difference']}"
        )
    return result


def _run_quantize_worker(
    src: Path, dst: Path, qt: QuantType, threads: int, imatrix: Path | None, pure: bool, *, imatrix_label: str
) -> float:
    cmd = [sys.executable, "-m", "llmopt.backends.gguf_imatrix", "--quantize", str(src), str(dst),
           "--ftype", str(qt.ftype), "--threads", str(threads)]  # fmt: skip
    if imatrix is not None:
        cmd += ["--imatrix", str(imatrix), "--imatrix-label", imatrix_label]
    if pure:
        cmd.append("--pure")
    start = time.perf_counter()
    proc = subprocess.run(cmd, capture_output=True, text=True, env=child_env(threads))
    if proc.returncode != 0 or not dst.is_file():
        log = proc.stdout + proc.stderr
        if "requires an imatrix" in log or "requires an importance matrix" in log:
            raise OptionsError(
                f"llama.cpp needs an importance matrix to quantize this model to {qt.name}.",
                "Pass --imatrix auto --calibration TEXT_FILE, or --imatrix FILE.",
            )
        errors = [ln for ln in log.splitlines() if "error" in ln.lower() or "failed" in ln.lower()]
        detail = "\n    ".join(errors[-4:]) if errors else log_tail(log)
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
