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

Scoring (not timing) goes through transformers' own loading; ``cast_after_decompression`` is the one fix it needs
there: NVFP4 weights come out of compressed-tensors' decompression in bfloat16 whatever the model's dtype.
"""

from __future__ import annotations

import contextlib
import json
import shutil
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

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


# --- scoring through transformers' decompression ---------------------------------------------------------------


def cast_after_decompression(model: Any, dtype: Any) -> Any | None:
    """Make the weights compressed-tensors decompresses on the first forward take the model's dtype ``dtype``.

    transformers leaves a compressed-tensors checkpoint compressed on load: compressed-tensors' ``compress_model``
    registers a forward pre-hook (its handle kept as ``model.ct_decompress_hook``) that decompresses every quantized
    module on the first forward, then removes itself and that attribute. compressed-tensors 0.19 decompresses NVFP4
    weights to bfloat16 whatever the model's dtype (its FP4 unpacking's default), so a float32 model (llmopt's CPU
    runner) or a float16 one fails at the first matmul ("expected m1 and m2 to have the same dtype").

    This registers a pre-hook after that one (pre-hooks run in the order they were registered) that runs once and
    casts the floating-point ``weight`` and ``bias`` of every module compressed-tensors decompressed to ``dtype``.
    The values stay the decompressed ones (FP4 code x FP8 group scale / global scale, rounded once to bfloat16 by
    compressed-tensors), and compressed-tensors' forward still rounds the activations as the scheme says, so a
    score measures the format's rounding, not its speed. The other schemes already decompress to the model's
    dtype: nothing differs, nothing is cast. Where the decompression did not run (its hook taken off by
    ``install_fp8``, which keeps the FP8 weights), the hook casts nothing.

    A checkpoint decompressed at load already (``run_compressed: false`` or ``dequantize: true`` in its
    quantization_config) has no such hook: its decompressed layers are cast right away.

    Returns the hook's handle (None when the layers were cast at once, or there was nothing to cast).
    """
    import torch

    def cast_decompressed() -> None:
        for sub in model.modules():
            if getattr(sub, "quantization_scheme", None) is None:
                continue
            if getattr(sub, "quantization_status", None) != "decompressed":  # compressed-tensors' str enum
                continue
            for name in ("weight", "bias"):
                param = getattr(sub, name, None)
                if isinstance(param, torch.Tensor) and param.is_floating_point() and param.dtype != dtype:
                    param.data = param.data.to(dtype)

    if getattr(model, "ct_decompress_hook", None) is None:
        cast_decompressed()  # decompressed at load (or nothing compressed-tensors quantized: nothing to cast)
        return None

    def cast(module: Any, args: Any) -> None:
        handle.remove()
        if getattr(model, "ct_decompress_hook", None) is not None:  # compressed-tensors' hook did not run
            return
        cast_decompressed()

    handle = model.register_forward_pre_hook(cast)
    return handle


# --- FP8 dynamic ---------------------------------------------------------------------------------------------

# Linear layers that read the same input, multiplied as one FP8 GEMM on one quantized input (what vLLM's
# QKVParallelLinear and MergedColumnParallelLinear do): per step, 4 quantizations and 4 GEMMs a Llama layer,
# not 7.
SIBLINGS = (("q_proj", "k_proj", "v_proj"), ("gate_proj", "up_proj"))

_QUANT_KERNEL: list[Any] = []  # [kernel or None], built on first use


def quantize_rows_torch(flat: Any) -> tuple[Any, Any]:
    """Each row of ``flat`` [M, K] as float8 e4m3 codes with its own float32 scale (amax / 448; 1 for a row of
    zeros), with torch's element-wise ops: about eight kernels."""
    import torch

    amax = flat.abs().amax(dim=-1, keepdim=True).to(torch.float32)
    scale = torch.where(amax > 0, amax / FP8_MAX, torch.ones_like(amax))
    codes = (flat.to(torch.float32) / scale).clamp(-FP8_MAX, FP8_MAX).to(torch.float8_e4m3fn)
    return codes, scale


def _quant_kernel() -> Any | None:
    """A Triton kernel doing ``quantize_rows_torch`` in one launch (one program a row: its largest magnitude,
    then its codes), or None where Triton or a CUDA device is missing. The scale is amax times the float32
    reciprocal of 448 (what torch's division by a number does), the codes an IEEE-rounded division, and the float8
    cast rounds to nearest even, as torch's do: the codes and scales are the same, bit for bit
    (tests/test_compressed_speed.py, on a GPU)."""
    if _QUANT_KERNEL:
        return _QUANT_KERNEL[0]
    kernel = None
    try:
        import torch
        import triton
        import triton.language as tl

        if torch.cuda.is_available():

            @triton.jit
            def _rows_to_fp8(x_ptr, q_ptr, s_ptr, n_cols, x_stride, INV_MAX: tl.constexpr, BLOCK: tl.constexpr):
                row = tl.program_id(0).to(tl.int64)
                offs = tl.arange(0, BLOCK)
                x_row = x_ptr + row * x_stride
                q_row = q_ptr + row * n_cols
                acc = tl.zeros([BLOCK], dtype=tl.float32)
                for start in range(0, n_cols, BLOCK):
                    cols = start + offs
                    v = tl.load(x_row + cols, mask=cols < n_cols, other=0.0).to(tl.float32)
                    acc = tl.maximum(acc, tl.abs(v))
                amax = tl.max(acc, axis=0)
                # torch divides by a Python number as a product with its float32 reciprocal: the same here
                scale = tl.where(amax > 0, amax * INV_MAX, 1.0)
                tl.store(s_ptr + row, scale)
                for start in range(0, n_cols, BLOCK):
                    cols = start + offs
                    mask = cols < n_cols
                    v = tl.load(x_row + cols, mask=mask, other=0.0).to(tl.float32)
                    q = tl.minimum(tl.maximum(tl.math.div_rn(v, scale), -448.0), 448.0)
                    tl.store(q_row + cols, q.to(tl.float8e4nv), mask=mask)

            kernel = _rows_to_fp8
    except Exception:  # no Triton, or one too old for these calls: torch's ops instead
        kernel = None
    _QUANT_KERNEL.append(kernel)
    return kernel


def quantize_rows(flat: Any) -> tuple[Any, Any]:
    """``quantize_rows_torch`` in one Triton launch on a CUDA device (not while torch.compile traces: its
    compiler fuses torch's ops itself), else torch's ops."""
    import torch

    kernel = _quant_kernel() if flat.is_cuda and not torch.compiler.is_compiling() else None
    if kernel is None or flat.stride(-1) != 1:
        return quantize_rows_torch(flat)
    rows, cols = int(flat.shape[0]), int(flat.shape[1])
    codes = torch.empty((rows, cols), dtype=torch.float8_e4m3fn, device=flat.device)
    scale = torch.empty((rows, 1), dtype=torch.float32, device=flat.device)
    if rows:
        block = 1024 if cols >= 1024 else max(16, 1 << (cols - 1).bit_length())
        kernel[(rows,)](flat, codes, scale, cols, flat.stride(0), INV_MAX=1.0 / FP8_MAX, BLOCK=block, num_warps=4)
    return codes, scale


_OUT_DTYPE_OK: dict[str, bool] = {}  # does _scaled_mm give float16 with row-wise scales here (per device)?


def fp8_matmul(flat: Any, weight: Any, weight_scale: Any, bias: Any | None, dtype: Any) -> Any:
    """flat [M, K] (16-bit) times ``weight`` [N, K] (float8, ``weight_scale`` [1, N]) transposed, + bias: the
    input quantized per token, multiplied by ``torch._scaled_mm``."""
    import torch

    codes, scale = quantize_rows(flat)
    key = str(flat.device)
    out_dtype = dtype if _OUT_DTYPE_OK.get(key, True) else torch.bfloat16
    # _scaled_mm wants the second operand column-major: W^T of a row-major W is
    try:
        y = torch._scaled_mm(codes, weight.t(), scale_a=scale, scale_b=weight_scale, out_dtype=out_dtype)
    except RuntimeError:
        if out_dtype == torch.bfloat16:
            raise
        # row-wise scaling with a float16 output is not built into every torch: bfloat16 then a cast
        _OUT_DTYPE_OK[key] = False
        y = torch._scaled_mm(codes, weight.t(), scale_a=scale, scale_b=weight_scale, out_dtype=torch.bfloat16)
    y = y.to(dtype)
    return y if bias is None else y + bias


def _fp8_linear_class() -> Any:
    import torch

    class Fp8Linear(torch.nn.Module):
        """y = x W^T + b with W in float8 e4m3 (a scale per output channel) and x quantized per token at run time,
        multiplied by ``torch._scaled_mm``. Rows of x whose largest magnitude is 0 get scale 1 (their codes are 0)."""

        def __init__(self, weight: Any, weight_scale: Any, bias: Any | None) -> None:
            super().__init__()
            self.out_features, self.in_features = int(weight.shape[0]), int(weight.shape[1])
            self.register_buffer("weight", weight.contiguous())
            self.register_buffer("weight_scale", weight_scale.reshape(1, -1).to(torch.float32).contiguous())
            self.register_buffer("bias", None if bias is None else bias.detach().clone())

        def forward(self, x: Any) -> Any:
            shape = x.shape
            flat = x.reshape(-1, self.in_features)
            y = fp8_matmul(flat, self.weight, self.weight_scale, self.bias, x.dtype)
            return y.reshape(*shape[:-1], self.out_features)

    return Fp8Linear


class _Shared:
    """What the layers of one sibling set share: their sizes, the layer holding the merged FP8 weights (the set's
    first: its buffers move with ``model.to``), and the outputs of the last merged product that the other siblings
    have yet to take (keyed by sibling index), for the input they were computed on (that tensor and its version:
    an input changed in place since is multiplied again)."""

    def __init__(self, sizes: list[int]) -> None:
        self.sizes = sizes
        self.leader: Any = None
        self.x: Any = None
        self.x_version = -1
        self.pending: dict[int, Any] = {}

    def take(self, index: int, x: Any) -> Any | None:
        """The waiting output of sibling ``index`` for this very ``x``, unchanged since; else None."""
        if self.x is not x or self.x_version != x._version or index not in self.pending:
            return None
        y = self.pending.pop(index)
        if not self.pending:
            self.x = None
        return y

    def leave(self, x: Any, outputs: dict[int, Any]) -> None:
        self.pending = outputs
        self.x = x if outputs else None
        self.x_version = x._version


def _fp8_sibling_class() -> Any:
    import torch

    class Fp8SiblingLinear(torch.nn.Module):
        """One of the linear layers of a sibling set (q/k/v, gate/up) in FP8, whose weights are stored once,
        merged, as buffers of the set's first layer (``weight`` [sum of outputs, in], ``weight_scale``, ``bias``;
        the others hold only their scale slice: such a model's state_dict is no checkpoint, it exists to be timed).
        The first sibling called with an input computes the merged product and leaves the others their slices; a
        sibling called with another input (or one changed in place), or while torch.compile traces, multiplies
        with its own rows of the merged weights."""

        def __init__(
            self, shared: _Shared, index: int, weight: Any = None, scale: Any = None, bias: Any = None
        ) -> None:
            super().__init__()
            self.index = index
            start = sum(shared.sizes[:index])
            self.out_features = shared.sizes[index]
            self.rows = (start, start + self.out_features)
            object.__setattr__(self, "shared", shared)  # not a submodule: the leader's tensors are counted once
            if weight is not None:  # the leader
                self.register_buffer("weight", weight)
                self.register_buffer("weight_scale", scale)
                self.register_buffer("bias", bias)
                shared.leader = self
            leader = shared.leader
            self.in_features = int(leader.weight.shape[1])
            own = leader.weight_scale[:, start : start + self.out_features].contiguous()
            self.register_buffer("own_scale", own, persistent=False)

        def forward(self, x: Any) -> Any:
            shared: _Shared = self.shared  # type: ignore[assignment]
            leader = shared.leader
            shape = x.shape
            flat = x.reshape(-1, self.in_features)
            a, b = self.rows
            if torch.compiler.is_compiling():
                bias = None if leader.bias is None else leader.bias[a:b]
                y = fp8_matmul(flat, leader.weight[a:b], self.own_scale, bias, x.dtype)
                return y.reshape(*shape[:-1], self.out_features)
            waiting = shared.take(self.index, x)
            if waiting is not None:
                return waiting
            full = fp8_matmul(flat, leader.weight, leader.weight_scale, leader.bias, x.dtype)
            outs = [part.reshape(*shape[:-1], part.shape[-1]) for part in full.split(shared.sizes, dim=-1)]
            shared.leave(x, {i: out for i, out in enumerate(outs) if i != self.index})
            return outs[self.index]

    return Fp8SiblingLinear


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


@dataclass(frozen=True)
class Fp8Install:
    """What ``install_fp8`` did: layers replaced, and how many of them are multiplied merged with siblings."""

    replaced: int
    merged: int

    def describe(self) -> str:
        text = f"{self.replaced} layers"
        return text + (f", {self.merged} of them merged with their siblings (q/k/v, gate/up)" if self.merged else "")


def install_fp8(model: Any, path: Path, merge: bool = True) -> Fp8Install:
    """Replace every linear layer stored in FP8 in ``path`` by an FP8 layer holding the stored float8 weights and
    scales (transformers loaded them as it does; they are dropped). With ``merge``, the sibling layers of a set
    (q/k/v, gate/up: same input, all in FP8, biases all or none) share one merged weight and one product.
    compressed-tensors' hook that would decompress the replaced layers at the first forward is removed."""
    import gc

    import torch

    stored = _tensors(path, (".weight", ".weight_scale"))
    found: dict[str, tuple[Any, Any, Any]] = {}
    for name, module in model.named_modules():
        weight = stored.get(f"{name}.weight")
        scale = stored.get(f"{name}.weight_scale")
        if weight is None or scale is None or weight.dtype != torch.float8_e4m3fn:
            continue
        if not isinstance(module, torch.nn.Linear):
            continue
        device = module.weight.device
        found[name] = (weight.to(device), scale.reshape(1, -1).to(device=device, dtype=torch.float32), module.bias)
    del stored
    single = _fp8_linear_class()
    sibling = _fp8_sibling_class()
    done: set[str] = set()
    merged = 0

    def put(name: str, new: Any) -> None:
        parent_name, _, child = name.rpartition(".")
        setattr(model.get_submodule(parent_name) if parent_name else model, child, new)
        done.add(name)

    if merge:
        parents = {name.rpartition(".")[0] for name in found}
        for parent in sorted(parents):
            for names in SIBLINGS:
                full = [f"{parent}.{n}" if parent else n for n in names]
                if not all(n in found for n in full):
                    continue
                parts = [found[n] for n in full]
                if len({p[0].shape[1] for p in parts}) != 1 or len({p[0].device for p in parts}) != 1:
                    continue
                biases = [p[2] for p in parts]
                if any(b is None for b in biases) and not all(b is None for b in biases):
                    continue
                weight = torch.cat([p[0] for p in parts], dim=0).contiguous()
                scale = torch.cat([p[1] for p in parts], dim=1).contiguous()
                bias = None if biases[0] is None else torch.cat([b.detach() for b in biases]).contiguous()
                shared = _Shared([int(p[0].shape[0]) for p in parts])
                for i, n in enumerate(full):
                    put(n, sibling(shared, i, weight, scale, bias) if i == 0 else sibling(shared, i))
                merged += len(full)
    for name, (weight, scale, bias) in found.items():
        if name not in done:
            put(name, single(weight, scale, bias))
    for key, hook in list(model._forward_pre_hooks.items()):
        if getattr(hook, "__name__", "") == "ct_decompress_hook":  # compressed-tensors' decompress-on-first-call
            del model._forward_pre_hooks[key]
    found.clear()
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()
    return Fp8Install(len(done), merged)


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
