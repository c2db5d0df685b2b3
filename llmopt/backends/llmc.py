"""compressed-tensors checkpoints through llm-compressor: FP8 dynamic, INT8 W8A8, W4A16 and NVFP4.

Each method is llm-compressor's own ``oneshot`` with its own modifiers, as its examples use them:

- ``llmc-fp8-dynamic``: ``QuantizationModifier(scheme="FP8_DYNAMIC")``: FP8 (e4m3) weights with one scale per
  output channel, activations quantized to FP8 per token at run time. No calibration.
- ``llmc-w8a8-int8``: ``SmoothQuantModifier`` then ``GPTQModifier(scheme="W8A8")``: int8 weights per channel
  (GPTQ), int8 activations per token (dynamic), outliers smoothed into the weights first. Calibrated.
- ``llmc-w4a16``: ``GPTQModifier`` with a W4A16 scheme (int4 weights in groups, 16-bit activations). Calibrated.
- ``llmc-nvfp4``: ``QuantizationModifier(scheme="NVFP4")``: FP4 (e2m1) weights and activations in groups of 16
  with FP8 scales and a calibrated global scale per tensor. Calibrated.

The folder is what llm-compressor's ``save_pretrained(save_compressed=True)`` writes (``quant_method:
compressed-tensors`` in config.json, its ``recipe.yaml``), which vLLM serves unchanged and transformers loads
(on a CPU it decompresses the weights on the first forward and keeps quantizing the activations of the
W8A8/FP8/NVFP4 schemes on the fly, so a CPU perplexity includes the activation rounding).

llm-compressor pins transformers and torch tightly (0.14: transformers 5.15-5.17, torch <= 2.14.0); where the
installed versions do not satisfy its pins the backends say so in ``llmopt backends`` instead of failing when
llm-compressor is imported. Nothing here imports torch or llm-compressor at module level.
"""

from __future__ import annotations

import contextlib
import importlib.metadata
import os
from pathlib import Path
from typing import Any, ClassVar, Literal

from pydantic import BaseModel, ConfigDict, Field

from llmopt._thirdparty import quiet_progress_bars, third_party_logs_wanted
from llmopt.backends._shapes import check_group_size, group_size_problem
from llmopt.backends.base import Backend, QuantizeInputs, Requirement, save_tokenizer
from llmopt.backends.format_card import FormatCard, transformers_snippet, vllm_snippet
from llmopt.errors import BackendUnavailableError, ModelError, OptionsError
from llmopt.source import SourceModel
from llmopt.units import WholeNumber

INSTALL = "pip install 'llmopt[llmc]'"
FORMAT = "compressed-tensors"

# What each method needs from a GPU to run through a real low-precision kernel (vLLM's), and what to use instead.
# (minimum compute capability, why, what works on an older GPU)
GPU_NEEDS: dict[str, tuple[tuple[int, int], str, str]] = {
    "llmc-fp8-dynamic": (
        (8, 9),
        "FP8 matmuls need FP8 tensor cores (compute capability 8.9+: Ada L4/L40S/RTX 4090, Hopper H100/H200, "
        "Blackwell)",
        "llmc-w4a16 or llmc-w8a8-int8 (run on compute capability 8.0+)",
    ),
    "llmc-nvfp4": (
        (10, 0),
        "NVFP4 matmuls need FP4 tensor cores (compute capability 10.0+: Blackwell B200/GB200/RTX 50xx); "
        "older GPUs have no NVFP4 kernel",
        "llmc-fp8-dynamic (compute capability 8.9+) or llmc-w4a16 (8.0+)",
    ),
    "llmc-w4a16": (
        (8, 0),
        "W4A16 is served through the Marlin kernels, which need compute capability 8.0+ (Ampere or newer)",
        "bnb-nf4, or quantize with --device cpu and serve on an Ampere-or-newer GPU",
    ),
    "llmc-w8a8-int8": (
        (7, 5),
        "INT8 W8A8 is served through int8 tensor-core GEMMs, which need compute capability 7.5+ (Turing or newer)",
        "bnb-int8",
    ),
}


def gpu_problem(method: str, capability: tuple[int, int], gpu_name: str) -> str | None:
    """Why ``method`` cannot run on a GPU of ``capability`` (None when it can): decided before any work."""
    need = GPU_NEEDS.get(method)
    if need is None or tuple(capability) >= need[0]:
        return None
    cc = f"{capability[0]}.{capability[1]}"
    return f"{method} cannot run on {gpu_name} (compute capability {cc}): {need[1]}."


def version_conflicts() -> list[str]:
    """Installed packages outside llm-compressor's own pins, each with the command that fixes it.

    Read from the installed distributions' metadata, without importing llm-compressor: importing it under a
    transformers it does not support fails (or half-works), and ``llmopt backends`` must explain, not crash.
    """
    try:
        requires = importlib.metadata.requires("llmcompressor") or []
        version = importlib.metadata.version("llmcompressor")
    except importlib.metadata.PackageNotFoundError:
        return []
    try:
        from packaging.requirements import Requirement as Req
        from packaging.version import InvalidVersion, Version
    except ImportError:  # packaging comes with transformers; without it there is nothing to compare
        return []
    problems = []
    for line in requires:
        try:
            req = Req(line)
        except ValueError:
            continue
        if req.marker is not None or req.name not in ("transformers", "torch", "compressed-tensors"):
            continue
        try:
            installed = importlib.metadata.version(req.name)
        except importlib.metadata.PackageNotFoundError:
            continue
        try:
            ok = req.specifier.contains(Version(installed.split("+")[0]), prereleases=True)
        except InvalidVersion:
            continue
        if not ok:
            problems.append(
                f"llmcompressor {version} needs {req.name}{req.specifier} but {req.name} {installed} is installed: "
                f"pip install '{req.name}{req.specifier}' (or use a separate environment with {INSTALL})"
            )
    return problems


class _LlmcOptions(BaseModel):
    model_config = ConfigDict(extra="forbid")
    ignore: list[str] = Field(
        default_factory=lambda: ["lm_head"],
        description="Modules left unquantized (llm-compressor names or 're:' patterns); lm_head by default.",
    )
    pipeline: Literal["independent", "sequential", "basic", "datafree"] | None = Field(
        None,
        description="llm-compressor's calibration pipeline; default: its own choice (sequential, which traces the "
        "model layer by layer). 'basic' needs no tracing.",
    )


class FP8DynamicOptions(_LlmcOptions):
    """No calibration and nothing to tune: FP8 weights per channel, FP8 activations per token at run time."""


class W8A8Int8Options(_LlmcOptions):
    smoothing_strength: float = Field(
        0.8, gt=0, lt=1, description="SmoothQuant's alpha: how much activation range moves into the weights."
    )
    damp_percent: float = Field(0.01, gt=0, lt=1, description="GPTQ Hessian dampening (dampening_frac).")


class W4A16Options(_LlmcOptions):
    group_size: WholeNumber = Field(128, description="Weights sharing one scale; -1 = one scale per output channel.")
    sym: bool = Field(True, description="Symmetric int4 (W4A16); --no-sym: with zero points (W4A16_ASYM).")
    actorder: Literal["static", "group", "weight"] | None = Field(
        None, description="GPTQ activation ordering; default: llm-compressor's."
    )
    damp_percent: float = Field(0.01, gt=0, lt=1, description="GPTQ Hessian dampening (dampening_frac).")


class NVFP4Options(_LlmcOptions):
    """Groups of 16 with FP8 scales are NVFP4's definition; only what is left unquantized can change."""


class _LlmcBackend(Backend):
    format = FORMAT
    runner = "hf"
    requirements = (
        Requirement("llmcompressor", "llmcompressor", "llmc"),
        Requirement("compressed_tensors", "compressed-tensors", "llmc"),
        Requirement("torch", "torch", "core"),
    )
    scheme_name: ClassVar[str]  # llm-compressor's preset name, for the manifest and the card

    def check(self) -> list[str]:
        return super().check() or version_conflicts()

    def format_card(self, options: dict[str, Any], repo_id: str, revision: str | None = None) -> FormatCard:
        return card_facts(self.scheme_name, repo_id, revision)

    def library_versions(self) -> dict[str, str]:
        versions = super().library_versions()
        with contextlib.suppress(importlib.metadata.PackageNotFoundError):
            versions["transformers"] = importlib.metadata.version("transformers")
        return versions

    def validate(self, options: BaseModel, source: SourceModel, device: str) -> None:
        if device.startswith("cuda"):
            import torch

            index = int(device.split(":")[1]) if ":" in device else 0
            cap = tuple(torch.cuda.get_device_capability(index))
            problem = gpu_problem(self.name, (int(cap[0]), int(cap[1])), torch.cuda.get_device_name(index))
            if problem:
                raise BackendUnavailableError(
                    problem,
                    f"Use {GPU_NEEDS[self.name][2]} on this GPU, or make the artifact with --device cpu (its "
                    "perplexity is then simulated) and serve it on a GPU that has the kernels.",
                )
        from transformers import CONFIG_MAPPING

        if not source.model_type or source.model_type not in CONFIG_MAPPING:
            raise ModelError(
                f"architecture '{source.architecture or source.model_type}' is not one this version of transformers "
                "knows, so llm-compressor cannot load it.",
                "Upgrade transformers within llm-compressor's pins, or pick a model with a supported architecture.",
            )

    def recipe(self, options: BaseModel) -> list[Any]:
        """llm-compressor modifiers for these options (what ``oneshot(recipe=...)`` gets)."""
        raise NotImplementedError

    def quantize(self, inputs: QuantizeInputs) -> dict[str, Any]:
        opts = inputs.options
        assert isinstance(opts, _LlmcOptions)
        import torch
        from transformers import AutoModelForCausalLM

        # On a CPU the calibration forward and GPTQ run in float32 (float16 matmuls are emulated and slow there);
        # the tensors are cast back to the source's dtype before saving, so the artifact is the one a GPU makes.
        on_cpu = inputs.device == "cpu"
        with inputs.reporter.step("loading model for llm-compressor"):
            model = AutoModelForCausalLM.from_pretrained(
                inputs.source.path,
                dtype=torch.float32 if on_cpu else "auto",
                trust_remote_code=inputs.source.trust_remote_code,
            )
        source_dtype = _source_dtype(inputs.source.path)
        if inputs.device.startswith("cuda"):
            torch.cuda.set_device(torch.device(inputs.device))
        kwargs: dict[str, Any] = {}
        if self.wants_calibration(opts):
            assert inputs.calibration is not None
            kwargs.update(calibration_dataset(inputs.calibration.samples))
        if opts.pipeline:
            kwargs["pipeline"] = opts.pipeline
        from llmcompressor import oneshot

        _quiet_llmcompressor()
        label = f"llm-compressor {self.scheme_name}" + (
            f" on {kwargs['num_calibration_samples']} samples" if "num_calibration_samples" in kwargs else ""
        )
        # its tqdm bars ("(3/31): Calibrating", compressed-tensors' "Compressing model"): the reporter's steps say it
        with inputs.reporter.step(label), quiet_progress_bars():
            try:
                oneshot(model=model, recipe=self.recipe(opts), **kwargs)
            except Exception as exc:
                raise _explain(exc, opts) from exc
        with inputs.reporter.step("saving compressed-tensors checkpoint"), quiet_progress_bars():
            if on_cpu and source_dtype in (torch.float16, torch.bfloat16):
                model.to(source_dtype)
            model.save_pretrained(inputs.out_dir, save_compressed=True)
            save_tokenizer(inputs)
            _normal_permissions(inputs.out_dir)
        return {"scheme": self.scheme_name, "quantized_on": inputs.device}


def calibration_dataset(samples: list[list[int]]) -> dict[str, Any]:
    """``oneshot`` arguments for llmopt's token-id samples: used as they are, in order, none cut or dropped."""
    from datasets import Dataset

    ds = Dataset.from_dict({"input_ids": samples, "attention_mask": [[1] * len(s) for s in samples]})
    return {
        "dataset": ds,
        "num_calibration_samples": len(samples),
        "max_seq_length": max(len(s) for s in samples),
        "shuffle_calibration_samples": False,
    }


def _source_dtype(path: Path) -> Any:
    import json

    import torch

    try:
        cfg = json.loads((path / "config.json").read_text())
    except (OSError, ValueError):
        return None
    name = cfg.get("dtype") or cfg.get("torch_dtype") or (cfg.get("text_config") or {}).get("dtype")
    return getattr(torch, str(name), None) if name else None


def _normal_permissions(folder: Path) -> None:
    """compressed-tensors writes the weights through a private temp file (mode 0600): give them the umask's mode,
    like every other file of the artifact."""
    umask = os.umask(0)
    os.umask(umask)
    for path in folder.rglob("*"):
        if path.is_file():
            path.chmod(0o666 & ~umask)


def _quiet_llmcompressor() -> None:
    """llm-compressor logs every GPTQ module at INFO through loguru; llmopt's reporter says what step runs.

    Its records are disabled, not its logger's configuration: LLM_COMPRESSOR_LOG_DISABLED would also skip
    registering its METRIC level, and its GPTQ then fails logging a timing ("Level 'METRIC' does not exist").
    """
    if third_party_logs_wanted():
        return
    import llmcompressor  # noqa: F401 - configures its loguru levels first
    from loguru import logger

    logger.disable("llmcompressor")
    logger.disable("compressed_tensors")


def _explain(exc: Exception, opts: _LlmcOptions) -> Exception:
    """llm-compressor's failures that are about the model, as llmopt errors; anything else stays a bug."""
    text = f"{type(exc).__name__}: {exc}"
    lowered = text.lower()
    if "trac" in lowered and (opts.pipeline in (None, "independent", "sequential")):
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        return ModelError(
            f"llm-compressor cannot trace this model layer by layer for calibration ({first}).",
            "Pass -O pipeline=basic (calibrates every layer in one pass, no tracing; needs the whole model in "
            "memory), or pick llmc-fp8-dynamic, which needs no calibration.",
        )
    return exc


class LlmcFP8DynamicBackend(_LlmcBackend):
    name = "llmc-fp8-dynamic"
    scheme_name = "FP8_DYNAMIC"
    needs_calibration = False
    description = (
        "llm-compressor FP8 dynamic (compressed-tensors): FP8 weights per channel, FP8 activations per token; "
        "no calibration; vLLM on compute capability 8.9+."
    )
    Options = FP8DynamicOptions

    def recipe(self, options: BaseModel) -> list[Any]:
        from llmcompressor.modifiers.quantization import QuantizationModifier

        assert isinstance(options, FP8DynamicOptions)
        return [QuantizationModifier(targets="Linear", scheme="FP8_DYNAMIC", ignore=list(options.ignore))]


class LlmcW8A8Int8Backend(_LlmcBackend):
    name = "llmc-w8a8-int8"
    scheme_name = "W8A8"
    needs_calibration = True
    description = (
        "llm-compressor INT8 W8A8 (compressed-tensors): SmoothQuant + GPTQ int8 weights, int8 activations per "
        "token; calibrated; vLLM on compute capability 7.5+."
    )
    Options = W8A8Int8Options

    def recipe(self, options: BaseModel) -> list[Any]:
        from llmcompressor.modifiers.gptq import GPTQModifier
        from llmcompressor.modifiers.transform.smoothquant import SmoothQuantModifier

        assert isinstance(options, W8A8Int8Options)
        return [
            SmoothQuantModifier(smoothing_strength=options.smoothing_strength),
            GPTQModifier(
                targets="Linear", scheme="W8A8", ignore=list(options.ignore), dampening_frac=options.damp_percent
            ),
        ]


class LlmcW4A16Backend(_LlmcBackend):
    name = "llmc-w4a16"
    scheme_name = "W4A16"
    needs_calibration = True
    description = (
        "llm-compressor W4A16 (compressed-tensors): GPTQ int4 weights in groups, 16-bit activations; calibrated; "
        "vLLM (Marlin) on compute capability 8.0+."
    )
    Options = W4A16Options

    def validate(self, options: BaseModel, source: SourceModel, device: str) -> None:
        assert isinstance(options, W4A16Options)
        check_group_size(source.config, options.group_size)
        super().validate(options, source, device)

    def recipe(self, options: BaseModel) -> list[Any]:
        from llmcompressor.modifiers.gptq import GPTQModifier

        assert isinstance(options, W4A16Options)
        extra: dict[str, Any] = {}
        if options.actorder is not None:
            extra["actorder"] = options.actorder
        return [
            GPTQModifier(
                ignore=list(options.ignore),
                config_groups={"group_0": w4a16_scheme(options.group_size, options.sym)},
                dampening_frac=options.damp_percent,
                **extra,
            )
        ]


def w4a16_scheme(group_size: int, sym: bool) -> Any:
    """llm-compressor's W4A16 (or W4A16_ASYM) preset with another group size (-1: one scale per channel)."""
    from compressed_tensors.quantization import QuantizationStrategy, preset_name_to_scheme

    scheme = preset_name_to_scheme("W4A16" if sym else "W4A16_ASYM", ["Linear"])
    assert scheme.weights is not None
    if group_size == -1:
        scheme.weights.strategy = QuantizationStrategy.CHANNEL
        scheme.weights.group_size = None
    else:
        scheme.weights.group_size = group_size
    return scheme


class LlmcNVFP4Backend(_LlmcBackend):
    name = "llmc-nvfp4"
    scheme_name = "NVFP4"
    needs_calibration = True
    description = (
        "llm-compressor NVFP4 (compressed-tensors): FP4 weights and activations in groups of 16, FP8 scales; "
        "calibrated global scales; vLLM on Blackwell (compute capability 10.0+)."
    )
    Options = NVFP4Options

    def validate(self, options: BaseModel, source: SourceModel, device: str) -> None:
        problem = group_size_problem(source.config, 16)
        if problem:
            raise OptionsError(f"NVFP4 needs groups of 16: {problem}", "Pick another method for this model.")
        super().validate(options, source, device)

    def recipe(self, options: BaseModel) -> list[Any]:
        from llmcompressor.modifiers.quantization import QuantizationModifier

        assert isinstance(options, NVFP4Options)
        return [QuantizationModifier(targets="Linear", scheme="NVFP4", ignore=list(options.ignore))]


# --- publishing -------------------------------------------------------------------------------------------


_KERNELS = {
    "FP8_DYNAMIC": "FP8 GEMMs on compute capability 8.9+ (Ada, Hopper, Blackwell)",
    "W8A8": "INT8 GEMMs (CUTLASS) on compute capability 7.5+",
    "W4A16": "Marlin (W4A16) kernels on compute capability 8.0+",
    "NVFP4": "FP4 GEMMs on Blackwell (compute capability 10.0+)",
}
_TAGS = {
    "FP8_DYNAMIC": ["fp8", "w8a8", "8-bit"],
    "W8A8": ["int8", "w8a8", "8-bit"],
    "W4A16": ["int4", "w4a16", "4-bit", "gptq"],
    "NVFP4": ["nvfp4", "fp4", "4-bit"],
}
_BITS = {"FP8_DYNAMIC": 8, "W8A8": 8, "W4A16": 4, "NVFP4": 4}


def card_facts(scheme: str, repo_id: str, revision: str | None = None) -> FormatCard:
    """What a model card says about a compressed-tensors artifact: how to serve and load it, its tags.

    ``scheme``: llm-compressor's preset (FP8_DYNAMIC, W8A8, W4A16, NVFP4). vLLM reads the format from
    ``quantization_config`` and needs no flag.
    """
    bits = _BITS.get(scheme)
    return FormatCard(
        format=FORMAT,
        library_name="transformers",
        tags=["compressed-tensors", "llm-compressor", *_TAGS.get(scheme, [])],
        bits=bits,
        bit_width=f"{bits}-bit" if bits else None,
        quant_type=scheme,
        load=[
            vllm_snippet(
                repo_id,
                revision,
                note=f"compressed-tensors from `quantization_config`; {_KERNELS.get(scheme, 'its kernels')}",
            ),
            transformers_snippet(repo_id, revision, needs="compressed-tensors"),
        ],
    )
