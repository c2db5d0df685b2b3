"""compressed-tensors artifacts timed through real low-precision kernels on a CUDA GPU.

transformers loads compressed-tensors checkpoints by decompressing their weights to 16-bit, so a timing through it
is FP16's speed with the format's name on it; llmopt refuses that. Two schemes have kernels here that are the ones a
serving engine runs for them:

- **FP8 dynamic** (llm-compressor's ``FP8_DYNAMIC``: float8 e4m3 weights with one scale per output channel, inputs
  quantized per token at run time): each quantized ``Linear`` becomes an ``Fp8Linear`` that quantizes its input
  per token and multiplies with ``torch._scaled_mm`` (cuBLASLt / CUTLASS FP8 GEMM with row-wise scales, on GPUs
  with FP8 units: compute capability 8.9 and later). vLLM runs this scheme through a CUTLASS FP8 GEMM with the same
  per-token and per-channel scales.
- **W4A16** (``pack-quantized`` 4-bit integer weights, symmetric, a scale per group of inputs, 16-bit
  activations): the tensors are rewritten, losslessly, in GPTQ's layout in a temporary folder (the same 4-bit codes,
  scales and group order) and loaded through GPTQModel's Marlin kernel, which is what vLLM runs W4A16 with
  (``MarlinLinearKernel``).

Everything else in compressed-tensors (INT8 W8A8, NVFP4, asymmetric or 8-bit weights) is refused with the reason,
and on a CPU nothing is timed: neither kernel runs there.
"""

from __future__ import annotations

import contextlib
import json
import shutil
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar

FP8_MAX = 448.0  # largest finite float8 e4m3fn value
GPTQ_ZERO_V1 = 0x77777777  # GPTQ's v1 layout stores the symmetric zero point 8 as 7, eight 4-bit fields per int32


@dataclass(frozen=True)
class SpeedScheme:
    """What a compressed-tensors checkpoint is, for timing: ``kind`` fp8-dynamic or w4a16 (None: no kernel here,
    ``reason`` says why), and for w4a16 its group size (-1: one group per row) and whether it has a group order."""

    kind: str | None
    reason: str = ""
    group_size: int = -1
    ignore: tuple[str, ...] = ()

    @property
    def kernel(self) -> str:
        return {
            "fp8-dynamic": "fp8 scaled_mm (per-token input and per-channel weight scales)",
            "w4a16": "gptq_marlin (W4A16 rewritten in GPTQ's layout, lossless)",
        }.get(self.kind or "", "")


def _config(path: Path) -> dict[str, Any]:
    try:
        data = json.loads((path / "config.json").read_text())
    except (OSError, ValueError):
        return {}
    qc = data.get("quantization_config") if isinstance(data, dict) else None
    return qc if isinstance(qc, dict) else {}


def speed_scheme(path: Path) -> SpeedScheme | None:
    """None for a folder that is not compressed-tensors; else which kernel times it (or why none does)."""
    qc = _config(path)
    if str(qc.get("quant_method", "")).lower() != "compressed-tensors":
        return None
    groups = qc.get("config_groups") or {}
    if not isinstance(groups, dict) or len(groups) != 1:
        return SpeedScheme(None, "it has more than one quantization scheme (config_groups)")
    group = next(iter(groups.values()))
    weights = group.get("weights") or {}
    acts = group.get("input_activations")
    fmt = str(group.get("format") or qc.get("format") or "")
    ignore = tuple(str(x) for x in (qc.get("ignore") or []))
    bits, wtype = weights.get("num_bits"), weights.get("type")
    if (
        fmt == "float-quantized"
        and wtype == "float"
        and bits == 8
        and weights.get("strategy") == "channel"
        and isinstance(acts, dict)
        and acts.get("type") == "float"
        and acts.get("num_bits") == 8
        and acts.get("dynamic") is True
        and acts.get("strategy") == "token"
    ):
        return SpeedScheme("fp8-dynamic", ignore=ignore)
    if (
        fmt == "pack-quantized"
        and wtype == "int"
        and bits == 4
        and weights.get("symmetric") is True
        and weights.get("strategy") in ("group", "channel")
        and not acts
    ):
        group_size = int(weights.get("group_size") or -1) if weights.get("strategy") == "group" else -1
        return SpeedScheme("w4a16", group_size=group_size, ignore=ignore)
    what = f"{fmt or 'unknown format'}, {bits}-bit {wtype} weights" + (
        f", {acts.get('num_bits')}-bit {acts.get('type')} activations" if isinstance(acts, dict) else ""
    )
    return SpeedScheme(None, f"llmopt has no kernel for this scheme ({what}); FP8 dynamic and W4A16 it has")


def refusal(path: Path, device: str) -> str | None:
    """Why this compressed-tensors folder's speed cannot be measured on ``device`` (None: it can, or it is no
    compressed-tensors folder)."""
    scheme = speed_scheme(path)
    if scheme is None:
        return None
    if scheme.kind is None:
        return scheme.reason
    if not device.startswith("cuda"):
        return f"its {scheme.kind} kernels run on NVIDIA GPUs only (asked: {device})"
    if "," in device:
        return "it is timed on one GPU (asked for several)"
    if scheme.kind == "fp8-dynamic":
        import torch

        index = int(device.split(":")[1]) if ":" in device else 0
        if torch.cuda.is_available() and torch.cuda.get_device_capability(index) < (8, 9):
            name = torch.cuda.get_device_name(index)
            return f"{name} has no FP8 units (FP8 GEMMs need compute capability 8.9 or later: Ada, Hopper, Blackwell)"
    return None


# --- FP8 dynamic ----------------------------------------------------------------------------------------------


def _fp8_linear_class() -> Any:
    import torch

    class Fp8Linear(torch.nn.Module):
        """y = x W^T + b with W in float8 e4m3 (a scale per output channel) and x quantized per token at run time,
        multiplied by ``torch._scaled_mm``. Rows of x whose largest magnitude is 0 get scale 1 (their codes are 0)."""

        # does _scaled_mm give float16 with row-wise scales here (per device)?
        out_dtype_ok: ClassVar[dict[str, bool]] = {}

        def __init__(self, weight: Any, weight_scale: Any, bias: Any | None) -> None:
            super().__init__()
            self.out_features, self.in_features = int(weight.shape[0]), int(weight.shape[1])
            # _scaled_mm wants the second operand column-major: W^T of a row-major W is
            self.register_buffer("weight", weight.contiguous())
            self.register_buffer("weight_scale", weight_scale.reshape(1, -1).to(torch.float32).contiguous())
            self.register_buffer("bias", None if bias is None else bias.detach().clone())

        def forward(self, x: Any) -> Any:
            shape = x.shape
            flat = x.reshape(-1, self.in_features)
            amax = flat.abs().amax(dim=-1, keepdim=True).to(torch.float32)
            scale = torch.where(amax > 0, amax / FP8_MAX, torch.ones_like(amax))
            codes = (flat.to(torch.float32) / scale).clamp(-FP8_MAX, FP8_MAX).to(torch.float8_e4m3fn)
            key = str(x.device)
            out_dtype = x.dtype if Fp8Linear.out_dtype_ok.get(key, True) else torch.bfloat16
            weight_t: Any = self.weight.t()  # type: ignore[operator]
            weight_scale: Any = self.weight_scale
            try:
                y = torch._scaled_mm(codes, weight_t, scale_a=scale, scale_b=weight_scale, out_dtype=out_dtype)
            except RuntimeError:
                if out_dtype == torch.bfloat16:
                    raise
                # row-wise scaling with a float16 output is not built into every torch: bfloat16 then a cast
                Fp8Linear.out_dtype_ok[key] = False
                y = torch._scaled_mm(codes, weight_t, scale_a=scale, scale_b=weight_scale, out_dtype=torch.bfloat16)
            y = y.to(x.dtype)
            bias: Any = self.bias
            if bias is not None:
                y = y + bias
            return y.reshape(*shape[:-1], self.out_features)

    return Fp8Linear


def _tensors(path: Path, suffixes: tuple[str, ...]) -> dict[str, Any]:
    """The tensors of ``path``'s safetensors files whose names end with one of ``suffixes``."""
    from safetensors import safe_open

    found: dict[str, Any] = {}
    for file in sorted(path.glob("*.safetensors")):
        with safe_open(str(file), framework="pt") as f:
            for name in f.keys():  # noqa: SIM118 (safe_open is no dict)
                if name.endswith(suffixes):
                    found[name] = f.get_tensor(name)
    return found


def install_fp8(model: Any, path: Path) -> int:
    """Replace every linear layer stored in FP8 in ``path`` by an ``Fp8Linear`` holding the stored float8 weights
    and scales (transformers loaded them decompressed to 16-bit). Returns how many were replaced."""
    import torch

    stored = _tensors(path, (".weight", ".weight_scale"))
    cls = _fp8_linear_class()
    replaced = 0
    for name, module in list(model.named_modules()):
        weight = stored.get(f"{name}.weight")
        scale = stored.get(f"{name}.weight_scale")
        if weight is None or scale is None or weight.dtype != torch.float8_e4m3fn:
            continue
        if not isinstance(module, torch.nn.Linear):
            continue
        device = module.weight.device
        new = cls(weight.to(device), scale.to(device), module.bias)
        parent_name, _, child = name.rpartition(".")
        setattr(model.get_submodule(parent_name) if parent_name else model, child, new)
        replaced += 1
    return replaced


# --- W4A16 -> GPTQ --------------------------------------------------------------------------------------------


def w4a16_as_gptq(src: Path, dst: Path) -> int:
    """Write ``src`` (compressed-tensors pack-quantized W4A16) to ``dst`` in GPTQModel's GPTQ layout, losslessly.

    compressed-tensors packs each row's signed 4-bit codes q in [-8, 7] as q + 8, eight to an int32 along the input
    dimension, the first in the lowest bits (``pack_to_int32``): ``weight_packed`` [out, in/8]. GPTQ packs the same
    unsigned codes eight to an int32 along the input dimension too, but stores [in/8, out]: ``qweight`` is
    ``weight_packed`` transposed. The scales [out, groups] become [groups, out]; the zero point of a symmetric
    checkpoint is 8 (stored as 7, GPTQ's v1 layout); ``g_idx`` is the stored group order or i // group_size.
    Returns how many layers were rewritten."""
    import torch
    from safetensors import safe_open
    from safetensors.torch import save_file

    scheme = speed_scheme(src)
    if scheme is None or scheme.kind != "w4a16":
        raise ValueError(f"{src} is no W4A16 compressed-tensors checkpoint")
    dst.mkdir(parents=True, exist_ok=True)
    rewritten = 0
    desc_act = False
    group_size = scheme.group_size
    for file in sorted(src.glob("*.safetensors")):
        out: dict[str, Any] = {}
        with safe_open(str(file), framework="pt") as f:
            names = list(f.keys())
            prefixes = [n[: -len(".weight_packed")] for n in names if n.endswith(".weight_packed")]
            parts = ("weight_packed", "weight_scale", "weight_shape", "weight_g_idx")
            skip = {f"{p}.{part}" for p in prefixes for part in parts}
            for name in names:
                if name not in skip:
                    out[name] = f.get_tensor(name)
            for prefix in prefixes:
                packed = f.get_tensor(f"{prefix}.weight_packed").to(torch.int32)
                scale = f.get_tensor(f"{prefix}.weight_scale")
                rows, cols = (int(x) for x in f.get_tensor(f"{prefix}.weight_shape").tolist())
                if cols % 8 or rows % 8 or packed.shape != (rows, cols // 8):
                    raise ValueError(f"{prefix}: {rows}x{cols} weights do not fit GPTQ's 4-bit layout")
                groups = int(scale.shape[1])
                size = cols if scheme.group_size == -1 else scheme.group_size
                if cols % size or groups != cols // size or tuple(scale.shape) != (rows, groups):
                    raise ValueError(
                        f"{prefix}: scales {tuple(scale.shape)} do not fit {cols} inputs in groups of {size}"
                    )
                out[f"{prefix}.qweight"] = packed.t().contiguous()
                out[f"{prefix}.scales"] = scale.t().contiguous().to(torch.float16)
                out[f"{prefix}.qzeros"] = torch.full((groups, rows // 8), GPTQ_ZERO_V1, dtype=torch.int32)
                g_idx_name = f"{prefix}.weight_g_idx"
                if g_idx_name in names:
                    out[f"{prefix}.g_idx"] = f.get_tensor(g_idx_name).to(torch.int32).contiguous()
                    desc_act = True
                else:
                    out[f"{prefix}.g_idx"] = (torch.arange(cols, dtype=torch.int32) // size).contiguous()
                group_size = size
                rewritten += 1
        save_file(out, str(dst / file.name), metadata={"format": "pt"})
    if not rewritten:
        raise ValueError(f"{src} holds no packed 4-bit layers")
    for extra in src.iterdir():
        if extra.is_file() and extra.suffix != ".safetensors" and extra.name not in ("config.json", "llmopt.json"):
            shutil.copy2(extra, dst / extra.name)
    config = json.loads((src / "config.json").read_text())
    qcfg = {
        "bits": 4,
        "group_size": group_size,
        "desc_act": desc_act,
        "sym": True,
        "lm_head": False,
        "quant_method": "gptq",
        "checkpoint_format": "gptq",
        "format": "gptq",
        "method": "gptq",
        "pack_dtype": "int32",
        "meta": {"quantizer": ["llmopt: rewritten from compressed-tensors pack-quantized W4A16"]},
    }
    config["quantization_config"] = qcfg
    (dst / "config.json").write_text(json.dumps(config, indent=2) + "\n")
    (dst / "quantize_config.json").write_text(json.dumps(qcfg, indent=2) + "\n")
    return rewritten


@contextlib.contextmanager
def gptq_copy(src: Path) -> Iterator[Path]:
    """A temporary GPTQ-layout copy of a W4A16 checkpoint, removed afterwards."""
    with tempfile.TemporaryDirectory(prefix="llmopt-w4a16-") as tmp:
        folder = Path(tmp) / src.name
        w4a16_as_gptq(src, folder)
        yield folder
