"""bitsandbytes int8 (LLM.int8()) and 4-bit (NF4 / FP4), saved as serialized checkpoints.

The weights are quantized when transformers loads the model with a ``BitsAndBytesConfig``; saving
that model writes packed weights plus the quantization state, which transformers reloads without
quantizing again.
"""

from __future__ import annotations

from typing import Any, ClassVar, Literal

from pydantic import BaseModel, ConfigDict, Field

from llmopt.backends.base import Backend, QuantizeInputs, Requirement, save_tokenizer
from llmopt.backends.format_card import FormatCard, bits_of, transformers_snippet, vllm_snippet
from llmopt.errors import BackendUnavailableError
from llmopt.source import SourceModel

ComputeDtype = Literal["auto", "float16", "bfloat16", "float32"]


class BnbInt8Options(BaseModel):
    model_config = ConfigDict(extra="forbid")
    llm_int8_threshold: float = Field(6.0, ge=0, description="Outlier threshold: larger activations stay fp16.")
    skip_modules: list[str] = Field(default_factory=lambda: ["lm_head"], description="Modules kept unquantized.")


class Bnb4bitOptions(BaseModel):
    model_config = ConfigDict(extra="forbid")
    double_quant: bool = Field(True, description="Quantize the quantization constants too (QLoRA's default).")
    compute_dtype: ComputeDtype = Field(
        "auto",
        description="Matmul dtype stored in the checkpoint for whoever loads it; auto = float16 (what GPU users "
        "want), wherever it is made. llmopt's CPU runner computes in float32 regardless.",
    )
    skip_modules: list[str] = Field(default_factory=lambda: ["lm_head"], description="Modules kept unquantized.")


_REQS = (
    Requirement("bitsandbytes", "bitsandbytes", "bnb"),
    Requirement("torch", "torch", "core"),
    Requirement("accelerate", "accelerate", "core"),
)


def resolve_compute_dtype(name: str, device: str) -> str:
    # The stored dtype serves the checkpoint's users, mostly on GPUs: one made on a CPU used to store float32,
    # giving GPU users float32 matmuls. Quantizing does no matmul, so the machine it runs on does not matter.
    return "float16" if name == "auto" else name


def _probe(device: str, four_bit: bool) -> None:
    """Quantize a tiny tensor on the device: fails in a second where bitsandbytes cannot run."""
    try:
        import bitsandbytes.functional as F
        import torch

        w = torch.randn(64, 64, dtype=torch.float16 if device != "cpu" else torch.float32, device=device)
        if four_bit:
            F.quantize_4bit(w, quant_type="nf4")
        else:
            F.int8_vectorwise_quant(w.half() if device != "cpu" else w)
    except Exception as exc:
        lines = str(exc).strip().splitlines()
        cause = f"{type(exc).__name__}: {lines[0] if lines else ''}".rstrip(": ")
        if device != "cpu" and _cuda_available():
            # There is a GPU: the cause is this process's CUDA state or the bitsandbytes build, not the machine.
            raise BackendUnavailableError(
                f"bitsandbytes failed a test quantization on '{device}': {cause}",
                "A GPU is present: an earlier CUDA error in this process, or a bitsandbytes build that does not "
                "match this torch/CUDA, can cause this; run the step again in a fresh process, and check "
                "`python -m bitsandbytes`.",
            ) from None
        raise BackendUnavailableError(
            f"bitsandbytes cannot run on '{device}' here: {cause}",
            "Use a CUDA GPU (or a bitsandbytes build with a backend for this device), or pick another method.",
        ) from None


def _cuda_available() -> bool:
    try:
        import torch

        return bool(torch.cuda.is_available())
    except Exception:
        return False


class _BnbBackend(Backend):
    runner = "hf"
    requirements = _REQS
    four_bit: ClassVar[bool]
    quant_type: ClassVar[str]

    def format_card(self, options: dict[str, Any], repo_id: str, revision: str | None = None) -> FormatCard:
        bits = bits_of(self.format, options)
        load = [transformers_snippet(repo_id, revision, needs="bitsandbytes accelerate")]
        if self.four_bit:  # vLLM loads bitsandbytes 4-bit checkpoints only
            load.append(vllm_snippet(repo_id, revision, args="--quantization bitsandbytes"))
        return FormatCard(
            format=self.format,
            library_name="transformers",
            tags=["bitsandbytes"],
            bits=bits,
            bit_width=f"{bits}-bit" if bits else None,
            quant_type=self.quant_type,
            load=load,
        )

    def validate(self, options: BaseModel, source: SourceModel, device: str) -> None:
        _probe(device, self.four_bit)

    def _quant_config(self, options: BaseModel, device: str) -> Any:
        raise NotImplementedError

    def quantize(self, inputs: QuantizeInputs) -> dict[str, Any]:
        import torch
        from transformers import AutoModelForCausalLM

        from llmopt.placement import Placement, observed_layers, plan_placement

        qcfg, compute = self._quant_config(inputs.options, inputs.device)
        trust = inputs.source.trust_remote_code
        # bitsandbytes quantizes each weight as it is loaded onto its GPU, so a model split over several
        # GPUs (transformers device_map) is quantized there in place: planned on the fp16 source's sizes.
        placement = (
            plan_placement(inputs.target, inputs.source.path, dtype_bytes=2)
            if inputs.target is not None
            else Placement.on(inputs.device)
        )
        with inputs.reporter.step(f"loading and quantizing with bitsandbytes ({self.name})"):
            # Tensors left unquantized (embeddings, norms) are stored in fp16 on every device, so the
            # artifact is the same size wherever it was made; a CPU runner upcasts them on load.
            model = AutoModelForCausalLM.from_pretrained(
                inputs.source.path,
                quantization_config=qcfg,
                dtype=torch.float16,
                device_map=placement.transformers_device_map(),
                trust_remote_code=trust,
            )
        if placement.mode == "split":
            placement.layers_per_device = observed_layers(model)
        with inputs.reporter.step("saving bitsandbytes checkpoint"):
            model.save_pretrained(inputs.out_dir)
            save_tokenizer(inputs)
        return {"compute_dtype": compute, "placement": placement.record()}


class BnbInt8Backend(_BnbBackend):
    name = "bnb-int8"
    format = "bnb-8bit"
    four_bit = False
    quant_type = "int8"
    description = "bitsandbytes LLM.int8(): 8-bit weights with fp16 outlier columns; no calibration."
    Options = BnbInt8Options

    def _quant_config(self, options: BaseModel, device: str) -> Any:
        from transformers import BitsAndBytesConfig

        assert isinstance(options, BnbInt8Options)
        cfg = BitsAndBytesConfig(
            load_in_8bit=True,
            llm_int8_threshold=options.llm_int8_threshold,
            llm_int8_skip_modules=options.skip_modules or None,
        )
        return cfg, "float32" if device == "cpu" else "float16"


class _Bnb4bitBackend(_BnbBackend):
    four_bit = True
    format = "bnb-4bit"
    Options = Bnb4bitOptions

    def _quant_config(self, options: BaseModel, device: str) -> Any:
        import torch
        from transformers import BitsAndBytesConfig

        assert isinstance(options, Bnb4bitOptions)
        compute = resolve_compute_dtype(options.compute_dtype, device)
        cfg = BitsAndBytesConfig(
            load_in_4bit=True,
            bnb_4bit_quant_type=self.quant_type,
            bnb_4bit_use_double_quant=options.double_quant,
            bnb_4bit_compute_dtype=getattr(torch, compute),
            llm_int8_skip_modules=options.skip_modules or None,
        )
        return cfg, compute


class BnbNf4Backend(_Bnb4bitBackend):
    name = "bnb-nf4"
    quant_type = "nf4"
    description = "bitsandbytes 4-bit NormalFloat (QLoRA's format); no calibration."


class BnbFp4Backend(_Bnb4bitBackend):
    name = "bnb-fp4"
    quant_type = "fp4"
    description = "bitsandbytes 4-bit float; no calibration."
