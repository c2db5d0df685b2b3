"""HQQ (half-quadratic quantization): calibration-free 4-bit, written as an AWQ GEMM checkpoint.

The scales and zero points come from the hqq library's half-quadratic solver (``hqq.core.optimize.
optimize_weights_proximal``, hqq's default, with its default settings), run group by group on every linear layer of
every decoder block. No calibration data: the solver minimises an l_p (p < 1) norm of each weight group's own
quantization error.

Why the AWQ GEMM layout (asymmetric int4, one fp16 scale and one integer zero point per group): it is the
container existing loaders serve with zero points. vLLM's AWQ-Marlin kernel serves it (its GPTQ-Marlin kernel
takes symmetric GPTQ only, so an asymmetric GPTQ checkpoint would fall back to vLLM's slower exllama GPTQ kernel),
GPTQModel loads it for transformers (Marlin on GPU, its torch kernel on CPU), and llmopt already scores it on CPU
(runners/hf.py's dense float32 path). hqq's own files (a pickle, ``qmodel.pt``) load nowhere but in hqq.

The container needs integer zero points, while hqq's solver moves them continuously. Rounding them inside hqq's
loop does not work: its zero-point step moves a zero point by less than half an integer, so rounding undoes every
step and the result is round-to-nearest (measured). So hqq's solver runs as it is; then each zero point is rounded
and the scale, the variable left free, is re-fitted (least squares on the codes, repeated); each group keeps the
better of that and round-to-nearest. ``solve`` has the details;
docs/hqq.md measures what the rounding costs against hqq's float zero points (the manifest records it per artifact).

Packing is AWQ's GEMM layout (``pack_awq_4bit``: what GPTQModel's ``pack_awq`` writes and its AWQ layers read);
the quantization config is AutoAWQ's (``quant_method: awq``, ``version: gemm``, ``zero_point: true``), which
transformers (through GPTQModel) and vLLM detect.
"""

from __future__ import annotations

import json
from typing import TYPE_CHECKING, Any, Literal

from pydantic import BaseModel, ConfigDict, Field

from llmopt._thirdparty import configure_gptqmodel_env, quiet_gptqmodel
from llmopt.backends._shapes import check_group_size, group_size_hint
from llmopt.backends.base import Backend, QuantizeInputs, Requirement, save_tokenizer
from llmopt.backends.format_card import FormatCard, bits_of, transformers_snippet, vllm_snippet
from llmopt.backends.gptq import validate_gptqmodel_architecture
from llmopt.errors import ModelError, OptionsError
from llmopt.source import SourceModel
from llmopt.units import WholeNumber

if TYPE_CHECKING:
    import torch

# Group sizes the AWQ GEMM container's kernels take (GPTQModel's AWQ layers, vLLM's AWQ-Marlin); -1 = whole rows.
GROUP_SIZES = (32, 64, 128, -1)
# AWQ's GEMM packing puts eight 4-bit codes of neighbouring output channels in one int32.
PACK_FACTOR = 8


class HQQOptions(BaseModel):
    """HQQ options; the solver's defaults are hqq's (``optimize_weights_proximal``: p=0.7, beta=10, 20 iterations)."""

    model_config = ConfigDict(extra="forbid")
    bits: Literal[4] = Field(
        4, description="Bits per weight (the AWQ GEMM container vLLM and GPTQModel serve with zero points is 4-bit)."
    )
    group_size: WholeNumber = Field(
        64,
        description="Weights sharing one scale and zero point; -1 = one group per row "
        "(64, not 128: 128 does not divide some models' widths, e.g. SmolLM2's 576).",
    )
    iterations: WholeNumber = Field(
        20, ge=1, le=1000, description="Most iterations of hqq's solver, and of the scale re-fit (hqq's default: 20)."
    )
    lp_norm: float = Field(
        0.7, gt=0, le=1, description="p of the l_p error norm the solver minimises (hqq's default: 0.7)."
    )
    beta: float = Field(10.0, gt=0, description="The solver's half-quadratic penalty weight (hqq's default: 10).")
    dtype: Literal["float16", "bfloat16"] = Field(
        "float16", description="Dtype of the stored scales and of the tensors left unquantized."
    )


class HQQBackend(Backend):
    name = "hqq"
    format = "awq"
    runner = "gptqmodel"
    needs_calibration = False
    description = (
        "HQQ (hqq's solver): 4-bit weight-only, no calibration, no forward passes; AWQ GEMM layout, served by vLLM, "
        "transformers."
    )
    Options = HQQOptions
    requirements = (
        Requirement("hqq", "hqq", "hqq"),
        Requirement("gptqmodel", "gptqmodel", "hqq"),
        Requirement("torch", "torch", "core"),
    )

    def format_card(self, options: dict[str, Any], repo_id: str, revision: str | None = None) -> FormatCard:
        bits = bits_of(self.format, options)
        return FormatCard(
            format=self.format,
            library_name="transformers",
            tags=["awq", "hqq"],
            bits=bits,
            bit_width=f"{bits}-bit" if bits else None,
            load=[
                transformers_snippet(repo_id, revision, needs="gptqmodel optimum"),
                vllm_snippet(
                    repo_id,
                    revision,
                    "an AWQ GEMM checkpoint, detected from `quantization_config`; vLLM picks its AWQ-Marlin kernel",
                ),
            ],
        )

    def validate(self, options: BaseModel, source: SourceModel, device: str) -> None:
        assert isinstance(options, HQQOptions)
        if options.group_size not in GROUP_SIZES:
            raise OptionsError(
                f"group size {options.group_size} is not one the AWQ GEMM container's kernels take "
                f"({', '.join(str(s) for s in GROUP_SIZES)}).",
                group_size_hint(source.config, tuple(s for s in GROUP_SIZES if s > 0)),
            )
        check_group_size(source.config, options.group_size)
        validate_gptqmodel_architecture(source)

    def quantize(self, inputs: QuantizeInputs) -> dict[str, Any]:
        opts = inputs.options
        assert isinstance(opts, HQQOptions)
        configure_gptqmodel_env()
        import torch

        quiet_gptqmodel()
        from transformers import AutoModelForCausalLM

        with inputs.reporter.step("loading model"):
            # The source's own dtype: the solver reads each weight upcast to float32, nothing is rounded twice.
            model = AutoModelForCausalLM.from_pretrained(
                inputs.source.path, dtype="auto", trust_remote_code=inputs.source.trust_remote_code
            )
        targets = quantized_linears(model, inputs.source)
        stats = {"layers": 0, "weights": 0, "error": 0.0, "rtn_error": 0.0, "float_zero_error": 0.0, "iterations": 0}
        label = f"HQQ {opts.bits}-bit g{opts.group_size} on {len(targets)} linear layers"
        with inputs.reporter.step(label, total=len(targets)) as step:
            for name, linear in targets:
                weight = linear.weight.detach().to(device=inputs.device, dtype=torch.float32)
                result = solve(weight, opts, scale_dtype=getattr(torch, opts.dtype))
                packed = PackedAWQLinear.from_solution(linear, result, opts.bits, opts.group_size)
                _replace(model, name, packed)
                stats["layers"] += 1
                stats["weights"] += weight.numel()
                stats["error"] += result.abs_error * weight.numel()
                stats["rtn_error"] += result.rtn_abs_error * weight.numel()
                stats["float_zero_error"] += result.float_zero_abs_error * weight.numel()
                stats["iterations"] = max(stats["iterations"], result.iterations)
                step.advance(1)
        with inputs.reporter.step("saving AWQ GEMM checkpoint"):
            model.to(getattr(torch, opts.dtype))
            model.config.quantization_config = awq_quantization_config(opts)
            model.save_pretrained(inputs.out_dir)
            _clean_config(inputs.out_dir)
            save_tokenizer(inputs)
        n = max(int(stats["weights"]), 1)
        # Mean absolute weight error over every quantized weight: stored, round-to-nearest, hqq's float zero points.
        return {
            "solver": "hqq.core.optimize.optimize_weights_proximal, zero points rounded, scales re-fitted",
            "quantized_layers": int(stats["layers"]),
            "mean_abs_error": round(float(stats["error"]) / n, 8),
            "rtn_mean_abs_error": round(float(stats["rtn_error"]) / n, 8),
            "hqq_float_zero_mean_abs_error": round(float(stats["float_zero_error"]) / n, 8),
            "scale_refit_iterations_max": int(stats["iterations"]),
        }


class Solution:
    """One layer's quantization: integer codes and zero points, scales, and what they cost."""

    def __init__(
        self,
        codes: torch.Tensor,
        zeros: torch.Tensor,
        scales: torch.Tensor,
        abs_error: float,
        rtn_abs_error: float,
        float_zero_abs_error: float,
        iterations: int,
    ) -> None:
        self.codes = codes  # [out, in] int32 in [0, 2^bits - 1]
        self.zeros = zeros  # [out, groups] int32 in [0, 2^bits - 1]
        self.scales = scales  # [out, groups], the stored dtype
        self.abs_error = abs_error  # mean |W - dequantized| with the stored scales
        self.rtn_abs_error = rtn_abs_error  # the same for round-to-nearest (min-max scale, rounded zero)
        self.float_zero_abs_error = float_zero_abs_error  # hqq's own result (float zero points), before rounding
        self.iterations = iterations


def solve(weight: torch.Tensor, opts: HQQOptions, *, scale_dtype: Any) -> Solution:
    """hqq's half-quadratic solver on the groups of ``weight`` ([out, in]), then zero points put on the integer grid.

    1. hqq's ``optimize_weights_proximal`` as it is (its min-max start, its l_p shrinkage, its early stop): a float
       zero point per group. hqq works with the inverse scale (``q = round(W * inv + z)``, ``W ≈ (q - z) / inv``).
    2. The zero point rounded to the integer grid the container stores, and the scale, the one variable left free,
       re-fitted: the least-squares scale on the codes, the codes again, until the mean error stops falling.
    3. Per group, the better (mean absolute error) of that and round-to-nearest (min-max scale over a range that
       includes 0, rounded zero): no group is worse than round-to-nearest. The codes are computed last, against the
       scale as stored (float16).
    """
    import torch
    from hqq.core.optimize import optimize_weights_proximal

    out_features, in_features = weight.shape
    group = in_features if opts.group_size == -1 else opts.group_size
    groups = in_features // group
    max_q = float(2**opts.bits - 1)
    w = weight.reshape(-1, group).float()  # one row per (output channel, group): hqq's axis=1
    w_min = w.min(dim=1, keepdim=True).values
    w_max = w.max(dim=1, keepdim=True).values
    # hqq's Quantizer.quantize: min-max inverse scale, guarded against flat groups and float16 overflow
    denom = w_max - w_min
    inv = torch.where(denom.abs() <= 1e-4, torch.ones_like(denom), max_q / denom).clamp(max=2e4)
    start_zero = -w_min * inv

    def quantize(scale: torch.Tensor, zero: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        codes = torch.round(w / scale + zero).clamp(0, max_q)
        return codes, (codes - zero) * scale

    def group_error(scale: torch.Tensor, zero: torch.Tensor) -> torch.Tensor:
        return (w - quantize(scale, zero)[1]).abs().mean(dim=1, keepdim=True)

    # 1. hqq's solver, float zero points
    params = {"lp_norm": opts.lp_norm, "beta": opts.beta, "kappa": 1.01, "iters": opts.iterations}
    _, inv_h, zero_h = optimize_weights_proximal(w, inv.clone(), start_zero.clone(), [0, max_q], 1, w.device, params)
    inv_h, zero_h = inv_h.float(), zero_h.float()  # hqq solves in float16 on CUDA
    float_error = float((w - (torch.round(w * inv_h + zero_h).clamp(0, max_q) - zero_h) / inv_h).abs().mean())

    # 2. integer zero points; the scale re-fitted by least squares on the codes it gives, until the mean error
    # stops falling (a half-quadratic re-fit, hqq's shrinkage on the error first, measured no better and 3x slower)
    zero = torch.round(zero_h).clamp(0, max_q)
    scale = 1.0 / inv_h
    codes, dequantized = quantize(scale, zero)
    best_scale, best_err = scale.clone(), (w - dequantized).abs().mean(dim=1, keepdim=True)
    iterations = 0
    for _ in range(opts.iterations):
        iterations += 1
        centred = codes - zero
        norm = (centred * centred).sum(dim=1, keepdim=True)
        fitted = (w * centred).sum(dim=1, keepdim=True) / norm.clamp(min=1e-12)
        scale = torch.where((norm > 0) & (fitted > 0), fitted, scale)
        codes, dequantized = quantize(scale, zero)
        err = (w - dequantized).abs().mean(dim=1, keepdim=True)
        better = err < best_err
        gain = float((best_err - torch.where(better, err, best_err)).sum())
        best_scale = torch.where(better, scale, best_scale)
        best_err = torch.where(better, err, best_err)
        if gain <= 1e-4 * float(best_err.sum()):
            break

    # 3. never worse than round-to-nearest, judged with the scales as stored. Its range includes 0, which an integer
    # zero point in [0, max_q] puts on the grid anyway: a group of one sign (or constant) is then not clipped.
    lo, hi = w_min.clamp(max=0), w_max.clamp(min=0)
    rtn_scale = torch.where(hi - lo <= 1e-8, torch.ones_like(lo), (hi - lo) / max_q).to(scale_dtype).float()
    rtn_zero = torch.round(-lo / rtn_scale).clamp(0, max_q)
    solved_scale = best_scale.to(scale_dtype).float()
    rtn_err = group_error(rtn_scale, rtn_zero)
    use_solved = group_error(solved_scale, zero) <= rtn_err
    final_scale = torch.where(use_solved, solved_scale, rtn_scale)
    final_zero = torch.where(use_solved, zero, rtn_zero)
    codes, dequantized = quantize(final_scale, final_zero)
    return Solution(
        codes=codes.reshape(out_features, in_features).to(torch.int32),
        zeros=final_zero.reshape(out_features, groups).to(torch.int32),
        scales=final_scale.to(scale_dtype).reshape(out_features, groups),
        abs_error=float((w - dequantized).abs().mean()),
        rtn_abs_error=float(rtn_err.mean()),
        float_zero_abs_error=float_error,
        iterations=iterations,
    )


def _packed_linear_class() -> Any:
    import torch

    class _PackedAWQLinear(torch.nn.Module):
        """Holds an AWQ GEMM layer's tensors (``qweight``, ``qzeros``, ``scales``, ``bias``) for saving."""

        def __init__(self, in_features: int, out_features: int) -> None:
            super().__init__()
            self.in_features = in_features
            self.out_features = out_features

    return _PackedAWQLinear


# AWQ's GEMM layout interleaves each 8 output columns in this order inside one int32 (AutoAWQ's and GPTQModel's
# AWQ_ORDER), the first of them in the lowest 4 bits.
AWQ_ORDER = (0, 2, 4, 6, 1, 3, 5, 7)


def pack_awq_4bit(codes: Any) -> Any:
    """Pack 4-bit codes [rows, cols] (integers in 0..15, cols a multiple of 8) into AWQ's GEMM int32 words
    [rows, cols / 8]; anything else is a ValueError (never cut to 4 bits).

    Written here rather than imported: GPTQModel moved its ``pack_awq`` between releases (7.3 has none), and the
    layout is the format's, not the library's (``tests/test_hqq.py`` checks it against GPTQModel's unpacking)."""
    import torch

    if codes.dim() != 2:
        raise ValueError(f"AWQ 4-bit packing takes a 2-D tensor [rows, cols], got shape {tuple(codes.shape)}")
    rows, cols = codes.shape
    if cols % 8:
        raise ValueError(f"AWQ 4-bit packing needs a multiple of 8 columns, got {cols}")
    # A code outside 0..15 (or a fraction) would be cut to its low 4 bits: another weight, silently.
    if codes.dtype.is_floating_point or codes.dtype.is_complex or codes.dtype == torch.bool:
        raise ValueError(f"AWQ 4-bit packing takes integer codes, got {codes.dtype}")
    if codes.numel() and (int(codes.min()) < 0 or int(codes.max()) > 15):
        raise ValueError(f"AWQ 4-bit codes must lie in 0..15, got {int(codes.min())}..{int(codes.max())}")
    nibbles = codes.to(torch.int64).reshape(rows, cols // 8, 8)[..., list(AWQ_ORDER)]
    shifts = torch.arange(0, 32, 4, dtype=torch.int64, device=codes.device)
    words = (nibbles << shifts).sum(dim=-1)  # the nibbles do not overlap: the sum is their bitwise or
    return torch.where(words >= 2**31, words - 2**32, words).to(torch.int32)


class PackedAWQLinear:
    """Build the saved form of one layer in AWQ's GEMM layout (``pack_awq_4bit``)."""

    @staticmethod
    def from_solution(linear: Any, result: Solution, bits: int, group_size: int) -> Any:
        if bits != 4:
            raise ValueError(f"HQQ writes 4-bit AWQ checkpoints only, got bits={bits}")
        module = _packed_linear_class()(linear.in_features, linear.out_features)
        # AWQ's layout is [in, out]: codes per input row, one zero/scale row per group of input rows.
        qweight = pack_awq_4bit(result.codes.t().contiguous().cpu())
        qzeros = pack_awq_4bit(result.zeros.t().contiguous().cpu())
        module.register_buffer("qweight", qweight.contiguous())
        module.register_buffer("qzeros", qzeros.contiguous())
        module.register_buffer("scales", result.scales.t().contiguous().cpu())
        if linear.bias is not None:
            module.register_buffer("bias", linear.bias.detach().cpu().clone())
        return module


def quantized_linears(model: Any, source: SourceModel) -> list[tuple[str, Any]]:
    """The decoder blocks' linear layers GPTQModel's definition of this architecture quantizes (and so replaces
    by AWQ layers on load), as (qualified name, module), in block order."""
    import torch
    from gptqmodel.models.auto import MODEL_MAP
    from gptqmodel.quantization.config import FORMAT, METHOD, QuantizeConfig

    model_type = source.model_type or ""
    definition = MODEL_MAP.get(model_type)
    if definition is None:
        raise ModelError(
            f"GPTQModel has no definition of architecture '{model_type}', so it could not load an AWQ checkpoint "
            "of it.",
            "Pick a model GPTQModel supports (Llama, Qwen, Mistral, ...), or another method (bnb-nf4, gguf).",
        )
    qcfg = QuantizeConfig(quant_method=METHOD.AWQ, format=FORMAT.GEMM, bits=4, group_size=64, sym=False)
    names = [n for subset in definition.simple_layer_modules(model.config, qcfg) for n in subset]
    blocks_path = definition.extract_layers_node()[0]
    blocks = model.get_submodule(blocks_path)
    found: list[tuple[str, Any]] = []
    for index, block in enumerate(blocks):
        for name in names:
            try:
                module = block.get_submodule(name)
            except AttributeError:
                continue
            if isinstance(module, torch.nn.Linear):
                found.append((f"{blocks_path}.{index}.{name}", module))
    odd = [n for n, m in found if m.out_features % PACK_FACTOR]
    if odd:
        raise ModelError(
            f"{odd[0]} has {dict(found)[odd[0]].out_features} outputs; the AWQ GEMM layout packs 8 per int32.",
            "Use another method for this model (gptq, bnb-nf4, gguf).",
        )
    if not found:
        raise ModelError(
            f"no linear layers found in {blocks_path} to quantize.",
            "Check that the folder holds a decoder model of a supported architecture.",
        )
    return found


def _replace(model: Any, name: str, module: Any) -> None:
    parent, _, child = name.rpartition(".")
    setattr(model.get_submodule(parent) if parent else model, child, module)


def awq_quantization_config(opts: HQQOptions) -> dict[str, Any]:
    """AutoAWQ's ``quantization_config``, which transformers, GPTQModel and vLLM read."""
    return {
        "quant_method": "awq",
        "bits": opts.bits,
        "group_size": opts.group_size,
        "zero_point": True,
        "version": "gemm",
        "modules_to_not_convert": None,
    }


def _clean_config(folder: Any) -> None:
    """config.json's quantization_config exactly as AutoAWQ writes it (transformers may add its own defaults)."""
    path = folder / "config.json"
    config = json.loads(path.read_text())
    qcfg = config.get("quantization_config") or {}
    keep = ("quant_method", "bits", "group_size", "zero_point", "version", "modules_to_not_convert")
    config["quantization_config"] = {k: qcfg.get(k) for k in keep}
    path.write_text(json.dumps(config, indent=2) + "\n")
