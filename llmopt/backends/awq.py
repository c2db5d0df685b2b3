"""AWQ (activation-aware weight quantization) through GPTQModel.

Writes the AutoAWQ checkpoint layout (``quantization_config`` in config.json with ``quant_method: awq``,
``version: gemm|gemv``, ``zero_point``, ``bits``, ``group_size``), which transformers (through GPTQModel)
and vLLM load. AutoAWQ itself is deprecated and points to GPTQModel and llm-compressor; llm-compressor
writes compressed-tensors, not this layout, and pins an older transformers.

What comparing GPTQModel's AWQ with AutoAWQ's algorithm found (docs/awq.md has the evidence and numbers):

- Calibration samples must all have the same length. GPTQModel's AWQ (7.3.6 and 7.6.0,
  ``AWQProcessor._layer_input_features``) concatenates the captured inputs of the calibration batches only
  when their shapes match beyond the batch dimension; otherwise it keeps the *last batch alone* for the scale
  and clipping search of every layer of a dense model (its "latest_batch" mode: 176 of 1,106 tokens in one
  run). Documents of different lengths therefore calibrate AWQ on one document, while GPTQModel's quant log
  still reports every token as a sample. llmopt's calibration samples are equal-length slices, and
  ``quantize`` refuses samples of different lengths rather than let this happen silently.
- Otherwise it is AutoAWQ's algorithm: the same groups (input_layernorm -> q/k/v, post_attention_layernorm
  -> gate/up, up -> down; v -> o skipped under grouped-query attention, as AutoAWQ does),
  the same 20-point grid over ``x_mean^r / w_mean^(1-r)``, the same clipping search (q/k not clipped).
- Symmetric quantization (``zero_point=False``) costs a small model much more than AWQ's default with a zero
  point; the default stays asymmetric.
- It cannot compute in float32 (its AWQ packing kernels take float16/bfloat16 only) and on a CPU picks
  bfloat16 by itself. We pass ``dtype`` explicitly, float16 by default: the dtype AWQ checkpoints are served
  in (vLLM's plain ``awq`` kernel takes nothing else; gemv checkpoints are float16 only). On CPUs without
  bf16/fp16 units both are emulated and slow (about a minute per decoder layer of SmolLM2-135M on 2 cores);
  quantize on a GPU where one is available.
"""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field

from llmopt._thirdparty import configure_gptqmodel_env, quiet_gptqmodel
from llmopt.backends._shapes import check_group_size, group_size_hint
from llmopt.backends.base import Backend, QuantizeInputs, Requirement, save_tokenizer
from llmopt.backends.format_card import FormatCard, bits_of, transformers_snippet, vllm_snippet
from llmopt.backends.gptq import strip_machine_specific, validate_gptqmodel_architecture
from llmopt.errors import BackendUnavailableError, DataError, OptionsError
from llmopt.source import SourceModel
from llmopt.units import WholeNumber

# Group sizes GPTQModel's AWQ kernels take (and vLLM's AWQ-Marlin serves); -1 = one group per row.
GROUP_SIZES = (32, 64, 128, -1)
GEMV_GROUP_SIZES = (64, 128, -1)
AUTO_BATCH = 32  # calibration samples per forward when batch_size is not given


class AWQOptions(BaseModel):
    """AWQ options; defaults are the paper's and AutoAWQ's (4-bit, group 128, with zero point, GEMM)."""

    model_config = ConfigDict(extra="forbid")
    bits: Literal[4] = Field(4, description="Bits per weight (AWQ checkpoints are 4-bit).")
    group_size: WholeNumber = Field(
        128, description="Weights sharing one scale and zero point; -1 = one group per row."
    )
    zero_point: bool = Field(True, description="Asymmetric quantization with a zero point per group.")
    version: Literal["gemm", "gemv"] = Field(
        "gemm", description="Packing: gemm (served everywhere) or gemv (CUDA only, faster at batch 1)."
    )
    dtype: Literal["float16", "bfloat16"] = Field(
        "float16", description="Dtype the search runs in and the checkpoint's scales and other tensors are stored in."
    )
    batch_size: WholeNumber | None = Field(
        None,
        ge=1,
        description=f"Calibration samples per forward pass; default: all of them, at most {AUTO_BATCH}. It changes "
        "only the speed: GPTQModel's AWQ runs its scale and clip searches in batches of this size, and one sample at "
        "a time made the same artifact bit for bit (tested on CPU), 20% slower on a CPU and, for small models on a "
        "GPU, bound by launching one small forward per sample.",
    )
    quantize_lm_head: bool = Field(
        False, description="Not supported: GPTQModel's AWQ cannot quantize the lm_head (use method gptq)."
    )


class AWQBackend(Backend):
    speed_only_options = frozenset({"batch_size"})
    name = "awq"
    format = "awq"
    runner = "gptqmodel"
    needs_calibration = True
    description = (
        "AWQ (GPTQModel): 4-bit weight-only, activation-aware scales, calibrated; served by vLLM, transformers."
    )
    Options = AWQOptions
    requirements = (
        Requirement("gptqmodel", "gptqmodel", "awq"),
        Requirement("torch", "torch", "core"),
    )

    def format_card(self, options: dict[str, Any], repo_id: str, revision: str | None = None) -> FormatCard:
        bits = bits_of(self.format, options)
        return FormatCard(
            format=self.format,
            library_name="transformers",
            tags=["awq"],
            bits=bits,
            bit_width=f"{bits}-bit" if bits else None,
            load=[
                transformers_snippet(repo_id, revision, needs="gptqmodel optimum"),
                # no --quantization awq: that forces vLLM's plain AWQ kernel (float16 only) over AWQ-Marlin
                vllm_snippet(
                    repo_id, revision, "AWQ is detected from `quantization_config`; vLLM picks its fastest AWQ kernel"
                ),
            ],
        )

    def validate(self, options: BaseModel, source: SourceModel, device: str) -> None:
        assert isinstance(options, AWQOptions)
        if options.quantize_lm_head:
            # GPTQModel 7.6 with QuantizeConfig(quant_method=AWQ, lm_head=True), tried on a tiny Llama: every
            # layer quantizes, then packing the head raises KeyError('q_zeros') (no AWQ result for it).
            raise OptionsError(
                "AWQ cannot quantize the lm_head: GPTQModel's AWQ searches scales inside decoder layers only and "
                "fails when asked to pack the output head (lm_head=True).",
                "Drop --quantize-lm-head for awq, or use --method gptq --quantize-lm-head.",
            )
        sizes = GEMV_GROUP_SIZES if options.version == "gemv" else GROUP_SIZES
        if options.group_size not in sizes:
            raise OptionsError(
                f"group size {options.group_size} is not one AWQ {options.version} kernels take "
                f"({', '.join(str(s) for s in sizes)}).",
                group_size_hint(source.config, tuple(s for s in sizes if s > 0)),
            )
        check_group_size(source.config, options.group_size)
        if options.version == "gemv" and options.dtype != "float16":
            # GPTQModel's gemv kernel (AwqGEMVQuantLinear) declares float16 as its only dtype and stores fp16 scales.
            raise OptionsError(
                f"AWQ gemv checkpoints are float16 only (dtype={options.dtype} asked).",
                "Drop -O dtype=bfloat16, or use --version gemm (float16 or bfloat16).",
            )
        if options.version == "gemv" and not device.startswith("cuda"):
            raise BackendUnavailableError(
                f"AWQ gemv checkpoints are packed and run by CUDA kernels only (device here: {device}).",
                "Use --version gemm (served by vLLM and transformers, and runs on CPU), or quantize on a CUDA GPU.",
            )
        validate_gptqmodel_architecture(source)

    def quantize(self, inputs: QuantizeInputs) -> dict[str, Any]:
        opts = inputs.options
        assert isinstance(opts, AWQOptions) and inputs.calibration is not None
        lengths = sorted({len(sample) for sample in inputs.calibration.samples})
        if len(lengths) > 1:
            # GPTQModel would silently search scales and clipping on the last batch alone (docs/awq.md).
            raise DataError(
                f"AWQ calibration samples have {len(lengths)} different lengths ({lengths[0]} to {lengths[-1]} "
                "tokens); GPTQModel's AWQ would calibrate every layer on the last batch alone.",
                "Cut the text into samples of one length: llmopt's --calibration with --samples/--seq-len does.",
            )
        configure_gptqmodel_env()
        import torch
        quiet_gptqmodel()
        from gptqmodel import BACKEND, GPTQModel
        from gptqmodel.quantization.config import FORMAT, METHOD, QuantizeConfig

        qcfg = QuantizeConfig(
            quant_method=METHOD.AWQ,
            format=FORMAT(opts.version),
            bits=opts.bits,
            group_size=opts.group_size,
            sym=not opts.zero_point,
        )
        # GPTQModel's own choice on CPU is a CUDA packing kernel ("AWQ: CUDA is not available").
        kernel = BACKEND.AWQ_TORCH if inputs.device == "cpu" else BACKEND.AUTO
        with inputs.reporter.step("loading model for AWQ"):
            model = GPTQModel.load(
                str(inputs.source.path),
                qcfg,
                device=inputs.device,
                dtype=getattr(torch, opts.dtype),
                backend=kernel,
                trust_remote_code=inputs.source.trust_remote_code,
            )
        calib = [{"input_ids": s, "attention_mask": [1] * len(s)} for s in inputs.calibration.samples]
        batch = opts.batch_size or min(len(calib), AUTO_BATCH)
        with inputs.reporter.step(f"AWQ 4-bit g{opts.group_size} on {len(calib)} samples, {batch} a batch"):
            model.quantize(calib, batch_size=batch, calibration_sort=None, backend=kernel)
        with inputs.reporter.step("saving AWQ checkpoint"):
            model.save(str(inputs.out_dir))
            strip_machine_specific(inputs.out_dir)
            save_tokenizer(inputs)
        return {"packing_kernel": getattr(kernel, "value", str(kernel))}
