"""Runner over a transformers model: FP16/FP32 folders, bitsandbytes, and GPTQ/AWQ via GPTQModel."""

from __future__ import annotations

import logging
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import TYPE_CHECKING, Any

from llmopt._thirdparty import configure_gptqmodel_env, quiet_gptqmodel
from llmopt.errors import BackendUnavailableError
from llmopt.runners.base import BaseRunner, LoadRequest

if TYPE_CHECKING:
    from llmopt.placement import Placement

# Kernels GPTQModel may pick on its own that need a download at first use (CUTLASS for Machete):
# on a CUDA device we ask for Marlin unless the user names a kernel.
_DEFAULT_CUDA_KERNEL = "marlin"


def default_dtype(device: str) -> str:
    # fp16 matmuls on CPU are slow and not always supported: score in fp32 there.
    return "float32" if device == "cpu" else "float16"


def _gptqmodel_backend(kernel: str | None, device: str, method: str | None = None) -> Any:
    """GPTQModel's kernel enum for a short name: 'marlin' is gptq_marlin for GPTQ, awq_marlin for AWQ."""
    from gptqmodel import BACKEND

    name = kernel or (_DEFAULT_CUDA_KERNEL if device.startswith("cuda") else "auto")
    # The method's own name first: GPTQModel also keeps generic legacy names ('marlin', 'torch').
    candidates = [f"{method or 'gptq'}_{name}", name]
    for cand in candidates:
        try:
            return BACKEND(cand)
        except ValueError:
            continue
    valid = ", ".join(b.value for b in BACKEND)
    raise BackendUnavailableError(f"GPTQModel has no kernel '{name}'.", f"Pick one of: {valid}")


def _quant_config(path: Path) -> dict[str, Any]:
    """``quantization_config`` of a model folder's config.json ({} when there is none or it is unreadable)."""
    import json

    try:
        config = json.loads((path / "config.json").read_text())
    except (OSError, ValueError):
        return {}
    qcfg = config.get("quantization_config") or {}
    return qcfg if isinstance(qcfg, dict) else {}


def quant_method(path: Path) -> str | None:
    method = _quant_config(path).get("quant_method")
    return str(method) if method else None


def cpu_dtype_for_gptqmodel(path: Path, kernel: str) -> str:
    """The dtype a GPTQModel-loaded artifact runs in on CPU through GPTQModel's own kernel (a named ``--kernel``, or a
    speed measurement; scoring with no kernel named goes dense float32 instead, see ``HFRunner``).

    float32 where GPTQModel has a float32 CPU kernel: GPTQ 4-bit through its auto pick (torch_fused).
    Everything else runs in float16: GPTQ 2/3/8-bit (only the plain torch kernel dequantizes them exactly, and
    it takes float16/bfloat16; the torch_int8 kernel that takes float32 re-quantizes the weights to per-channel
    int8, i.e. scores another model), an explicitly chosen kernel other than torch_fused, and AWQ (its kernels
    take nothing wider). bfloat16 is avoided: GPTQModel's own CPU choice, emulated and slow on CPUs without it.
    """
    qcfg = _quant_config(path)
    exact_fp32 = kernel in ("auto", "gptq_torch_fused", "torch_fused")
    if qcfg.get("quant_method") == "gptq" and qcfg.get("bits") == 4 and exact_fp32:
        return "float32"
    return "float16"


# GPTQModel's plain torch kernels, whose stored weights llmopt can dequantize itself on CPU.
_DENSE_ON_CPU = ("TorchLinear", "AwqTorchLinear")


def _bnb_compute_on_gpu(model: Any) -> dict[str, str]:
    """The dtypes a bitsandbytes model really computes in on a GPU (as loaded; nothing is changed)."""
    import torch

    unquantized = sorted(
        {
            str(p.dtype).removeprefix("torch.")
            for p in model.parameters()
            if type(p).__name__ not in _BNB_QUANTIZED_PARAMS and p.is_floating_point()
        }
    )
    compute = sorted(
        {
            str(m.compute_dtype).removeprefix("torch.")
            for m in model.modules()
            if type(m).__name__ == "Linear4bit" and isinstance(getattr(m, "compute_dtype", None), torch.dtype)
        }
    )
    out = {"unquantized": ",".join(unquantized)}
    if compute:
        out["matmul"] = f"4-bit layers: {','.join(compute)}"
    if any(type(m).__name__ == "Linear8bitLt" for m in model.modules()):
        out["matmul"] = "; ".join(filter(None, [out.get("matmul"), "int8 layers: LLM.int8() (float16 activations)"]))
    return out


def _dense_weight(module: Any) -> Any:
    """[out, in] float32 weight of a GPTQModel torch-kernel layer: ``scale * (q - zero)`` per group."""
    if type(module).__name__ == "AwqTorchLinear":
        from gptqmodel.quantization.awq.utils.packing_utils import dequantize_gemm

        weight = dequantize_gemm(module.qweight, module.qzeros, module.scales.float(), module.bits, module.group_size)
    else:
        from gptqmodel.nn_modules.qlinear import PackableQuantLinear

        module.scales = module.scales.float()
        # The class's generic unpacking (not the instance's compiled fast path), in float32.
        weight = PackableQuantLinear.dequantize_weight(module)
    return weight.float().T.contiguous()


def dequantize_to_float32(model: Any) -> int:
    """Replace GPTQModel's torch-kernel GPTQ/AWQ layers by dense float32 ``nn.Linear``s holding their weights.

    For scoring on CPU: GPTQ 2/3/8-bit and AWQ have no float32 kernel there, the float16 ones are slow on a CPU
    without fp16 units (~1 min per 512-token window for SmolLM2), and GPTQ 4-bit's float32 one (torch_fused)
    rounds like bfloat16. The weights are GPTQModel's own
    dequantization (``scale * (q - zero)`` per group) computed in float32, i.e. the values the artifact
    stores, without the float16 rounding of the kernel's matmul; everything else is cast to float32 like an
    FP16 baseline on CPU. Returns how many layers were replaced.
    """
    import torch

    replaced = 0
    modules = dict(model.named_modules())
    for name, module in list(modules.items()):
        if type(module).__name__ not in _DENSE_ON_CPU or getattr(module, "planar", False) or module.adapter:
            continue
        with torch.no_grad():
            dense = torch.nn.Linear(module.in_features, module.out_features, bias=module.bias is not None)
            dense.weight = torch.nn.Parameter(_dense_weight(module), requires_grad=False)
            if module.bias is not None:
                dense.bias = torch.nn.Parameter(module.bias.detach().float(), requires_grad=False)
        parent_name, _, child = name.rpartition(".")
        setattr(modules[parent_name] if parent_name else model, child, dense)
        replaced += 1
    if replaced:
        model.float()
    return replaced


def check_quantized_lm_head(model: Any, path: Path, loader: str) -> None:
    """Refuse a model whose checkpoint quantized the output head but whose loader left it a plain layer.

    A GPTQ checkpoint made with ``lm_head: true`` stores ``lm_head.qweight/qzeros/scales`` and no
    ``lm_head.weight``. GPTQModel builds the head as a quantized layer and loads those; transformers (through
    optimum) converts only the decoder blocks' linears, ignores the head's packed tensors and initializes a fresh
    random ``lm_head.weight`` with no more than a load-report line. Scoring that would measure a random head. Also
    refused: a head the loader made quantized while the checkpoint holds no packed tensors for it.
    """
    from llmopt.errors import ModelError
    from llmopt.source import safetensors_header

    head = model.get_output_embeddings()
    if head is None:  # a model whose head is no output embedding transformers knows: by its usual name
        head = getattr(model, "lm_head", None)
    if head is None:
        return
    name = next((n for n, m in model.named_modules() if m is head), "lm_head")
    quantized_layer = hasattr(head, "qweight")
    if not quantized_layer and not _quant_config(path):
        return  # a plain model
    # what the files hold decides, not the config's flag (config.json and quantize_config.json may disagree)
    stored: set[str] = set()
    for file in sorted(path.glob("*.safetensors")):
        stored.update(safetensors_header(file)[0])
    packed = f"{name}.qweight" in stored
    if packed and not quantized_layer:
        raise ModelError(
            f"{path} stores its output head quantized ({name}.qweight), but the {loader} loader built it as a plain "
            "layer that would score with random weights.",
            "Load it through GPTQModel (the artifact's gptqmodel runner, or GPTQModel.load), or vLLM.",
        )
    if quantized_layer and not packed:
        raise ModelError(
            f"{path} says its output head is quantized (lm_head: true) but no safetensors file holds "
            f"{name}.qweight: the loaded head would hold no stored weights.",
            "Re-make the artifact (llmopt quantize ... --quantize-lm-head), or copy its complete files.",
        )


_BNB_QUANTIZED_PARAMS = ("Int8Params", "Params4bit")


def bnb_float32_on_cpu(model: Any, dense: bool = True) -> dict[str, str]:
    """Make a bitsandbytes model loaded on CPU compute in float32, and say what its arithmetic is.

    transformers keeps a bitsandbytes checkpoint's unquantized tensors (embeddings, norms, lm_head, biases) in
    the dtype they were saved in (float16) whatever ``dtype`` is asked for, so on CPU the whole forward ran in
    float16, whose rounding differs between CPUs (the same int8 files scored +1.77% on one and +2.21% on
    another) while the report said float32. Here they become float32, and 4-bit layers compute in float32
    (``Linear4bit.compute_dtype``; the checkpoint's stored compute dtype is for GPUs). int8 layers stay
    LLM.int8(): bitsandbytes rounds the activations to float16 before quantizing them to int8 per row
    (exact at int8's resolution), multiplies in int8 with int32 sums, and keeps outlier columns in float32.
    """
    import torch

    kinds: set[str] = set()
    for module in model.modules():
        kind = type(module).__name__
        if kind == "Linear4bit":
            module.compute_dtype = torch.float32
            kinds.add("4bit")
        elif kind == "Linear8bitLt":
            kinds.add("int8")
        for param in list(module.parameters(recurse=False)):
            if type(param).__name__ in _BNB_QUANTIZED_PARAMS or not param.is_floating_point():
                continue
            if param.dtype != torch.float32:
                param.data = param.data.float()
        for name, buf in list(module.named_buffers(recurse=False)):
            if buf.is_floating_point() and buf.dtype != torch.float32:
                module._buffers[name] = buf.float()
    if "4bit" in kinds and dense:
        # Scoring: each 4-bit layer becomes a dense float32 Linear holding bitsandbytes' own dequantization of
        # its weights. bitsandbytes' CPU kernels are another arithmetic on every CPU kind: its fused gemm_4bit
        # op differs from the dequantized weights' float32 product by 2e-4 (relative, one SmolLM2 layer), and
        # on CPUs with AVX-512 bf16 it repacks the weights at the first forward and multiplies in bfloat16,
        # ~5x slower for a 512-token window (SmolLM2 nf4: 95 s against FP16's 19 s).
        from bitsandbytes.functional import dequantize_4bit

        modules = dict(model.named_modules())
        for name, module in list(modules.items()):
            if type(module).__name__ != "Linear4bit":
                continue
            with torch.no_grad():
                weight = dequantize_4bit(module.weight.data, module.weight.quant_state).float()
                linear = torch.nn.Linear(module.in_features, module.out_features, bias=module.bias is not None)
                linear.weight = torch.nn.Parameter(weight, requires_grad=False)
                if module.bias is not None:
                    linear.bias = torch.nn.Parameter(module.bias.detach().float(), requires_grad=False)
            parent, _, child = name.rpartition(".")
            setattr(modules[parent] if parent else model, child, linear)
    matmuls = []
    if "int8" in kinds:
        matmuls.append(
            "int8 layers: LLM.int8() (activations rounded to float16, quantized to int8 per row, int8 x int8 with "
            "int32 sums, dequantized to float32; outlier columns in float32)"
        )
    if "4bit" in kinds:
        matmuls.append(
            "4-bit layers: weights dequantized by bitsandbytes, float32 matmul"
            if dense
            else "4-bit layers: bitsandbytes' CPU kernel (float32 activations; bfloat16 on CPUs with AVX-512 bf16)"
        )
    return {"unquantized": "float32", "matmul": "; ".join(matmuls) or "float32"}


@contextmanager
def _gpu_memory_guard(device: str, windows: list[list[int]]) -> Iterator[None]:
    """CUDA out of memory while scoring with the KL divergence: say what took the memory and what to lower."""
    import torch

    try:
        yield
    except torch.OutOfMemoryError:
        from llmopt.errors import DeviceMemoryError

        torch.cuda.empty_cache()
        batch, length = len(windows), len(windows[0]) if windows else 0
        raise DeviceMemoryError(
            f"out of GPU memory on {device} while computing the KL divergence for {batch} window(s) of "
            f"{length} tokens (the logits and their float32 log-probs take batch x context x vocabulary x 4 bytes, "
            "several times over).",
            "Lower --batch-size (1 holds the least), then --context; or pass --no-kld to score perplexity alone.",
        ) from None


class HFRunner(BaseRunner):
    name = "hf"
    runs_tasks = True
    placement: Placement  # always planned, one device or several
    loader = "hf"  # how ``open`` loads: transformers, or GPTQModel (``GPTQModelRunner``)

    @classmethod
    def open(cls, request: LoadRequest) -> HFRunner:
        return cls(
            request.path,
            request.device,
            loader=cls.loader,
            kernel=request.kernel,
            dense_on_cpu=not request.for_speed,
            trust_remote_code=request.trust_remote_code,
        )

    def __init__(
        self,
        path: Path,
        device: str,
        *,
        loader: str = "hf",
        kernel: str | None = None,
        dense_on_cpu: bool = True,
        trust_remote_code: bool = False,
    ) -> None:
        """Load the model folder ``path`` on ``device``: any ``--device`` value (llmopt/placement.py).

        Several GPUs: the layers are split over them with an accelerate device_map (``self.placement``);
        input ids go to the input embedding's GPU and the logits are read where the output head put them.
        ``dense_on_cpu``: on CPU, with no kernel named, GPTQ/AWQ artifacts without a float32 kernel are
        scored as dense float32 weights (``dequantize_to_float32``); False keeps GPTQModel's kernel (timing).
        """
        import torch

        from llmopt.placement import observed_bytes, observed_layers, plan_placement, resolve_target
        from llmopt.source import check_remote_code

        check_remote_code(path, trust_remote_code)
        target = resolve_target(device)
        primary = target.primary
        self.dtype = default_dtype(primary)
        # Sizes are planned at the dtype the weights are loaded in (fp16 on GPU).
        self.placement = plan_placement(target, path, dtype_bytes=2 if self.dtype == "float16" else 4)
        self.device = self.placement.primary
        self.kernel = None  # only GPTQModel-loaded artifacts choose a kernel
        # What the arithmetic really is, where the one dtype above does not say it all (bitsandbytes).
        self.compute = None
        # bitsandbytes logs a warning on every int8 matmul with fp32 inputs (they are cast to fp16).
        logging.getLogger("bitsandbytes.autograd._functions").setLevel(logging.ERROR)
        start = time.perf_counter()
        if loader == "gptqmodel":
            configure_gptqmodel_env()
            quiet_gptqmodel()
            from gptqmodel import GPTQModel

            method = quant_method(path)
            backend = _gptqmodel_backend(kernel, self.device, method)
            if self.device == "cpu":
                self.dtype = cpu_dtype_for_gptqmodel(path, str(getattr(backend, "value", backend)))
            # On CPU, with no kernel asked for, every GPTQ/AWQ artifact is loaded through GPTQModel's plain torch
            # kernel (float16) and scored as dense float32 weights. GPTQ 4-bit too: GPTQModel's float32 CPU pick
            # (torch_fused) rounds like bfloat16 (2.0e-3 relative to float64 logits on SmolLM2 cut to 2 layers,
            # against 2.4e-7 dense) and was 1.6-1.8x slower per forward there.
            dense_cpu = dense_on_cpu and self.device == "cpu" and kernel is None
            if dense_cpu:
                backend = _gptqmodel_backend("torch", self.device, method)
                self.dtype = "float16"
            where: dict[str, Any] = {"device": self.device}
            if self.placement.device_map is not None:
                # An explicit map: GPTQModel loads each block on its GPU and hooks them (accelerate's
                # AlignDevicesHook). Given only device="cuda" it would deal layers round-robin over every
                # visible GPU instead, and given "cuda:N" it keeps the model on that one.
                where = {"device_map": self.placement.transformers_device_map()}
            self._wrapper: Any = GPTQModel.load(
                str(path),
                backend=backend,
                dtype=getattr(torch, self.dtype),
                trust_remote_code=trust_remote_code,
                **where,
            )
            self.model: Any = self._wrapper.model
            self.name = "gptqmodel"
            check_quantized_lm_head(self.model, path, "GPTQModel")
            self.kernel = getattr(backend, "value", str(backend))
            if dense_cpu:
                replaced = dequantize_to_float32(self.model)
                if replaced:
                    self.dtype = "float32"
                    self.kernel = f"dense float32 (dequantized {replaced} {self.kernel} layers)"
        else:
            from transformers import AutoModelForCausalLM

            self._wrapper = None
            self.model = AutoModelForCausalLM.from_pretrained(
                path,
                dtype=getattr(torch, self.dtype),
                device_map=self.placement.transformers_device_map(),
                trust_remote_code=trust_remote_code,
            )
            check_quantized_lm_head(self.model, path, "transformers")
            method = quant_method(path)
            if method == "bitsandbytes":
                if self.device == "cpu":
                    self.compute = bnb_float32_on_cpu(self.model, dense=dense_on_cpu)
                else:
                    self.compute = _bnb_compute_on_gpu(self.model)
            elif method == "compressed-tensors":
                from llmopt.runners.compressed import cast_after_decompression

                # NVFP4 decompresses to bfloat16 at the first forward whatever the model's dtype: cast it back
                cast_after_decompression(self.model, getattr(torch, self.dtype))
        self.model.eval()
        if self.device.startswith("cuda"):
            for dev in self.placement.devices:
                torch.cuda.synchronize(dev)
        self.load_seconds = time.perf_counter() - start
        if self.placement.mode == "split":
            # What the loaders really did, not what was planned.
            self.placement.layers_per_device = observed_layers(self.model)
            self.placement.bytes_per_device = observed_bytes(self.model)
        emb = self.model.get_input_embeddings() if hasattr(self.model, "get_input_embeddings") else None
        weight = getattr(emb, "weight", None)
        self.input_device = str(weight.device) if weight is not None and weight.device.type != "meta" else self.device

    @property
    def n_vocab(self) -> int:
        """Entries of the output layer (the width of the logits)."""
        head = self.model.get_output_embeddings() if hasattr(self.model, "get_output_embeddings") else None
        width = getattr(head, "out_features", None)
        return int(width if width is not None else self.model.config.vocab_size)

    def _log_probs(self, windows: list[list[int]]) -> tuple[Any, Any]:
        """float32 log-softmax [B, L-1, V] of the logits at 0..L-2 (row t predicts token t+1), and the targets."""
        import torch

        ids = torch.tensor(windows, dtype=torch.long, device=self.input_device)
        with torch.inference_mode():
            if self.device == "cpu" and len(windows) > 1:
                # One window at a time on CPU: its BLAS picks kernels by matrix shape, so a batch of windows can
                # round differently from the same windows alone (1e-8 relative on an AVX-512 Xeon), and scores
                # must not depend on --batch-size. A 512-token window already fills the cores.
                logits = torch.cat([self.model(input_ids=row[None], use_cache=False).logits for row in ids])
            else:
                logits = self.model(input_ids=ids, use_cache=False).logits
            # float32 log-softmax for stability. With layers split over GPUs the logits are on the output
            # head's GPU: the targets go there, not the logits.
            logp = torch.log_softmax(logits[:, :-1, :].float(), dim=-1)
            del logits
            return logp, ids[:, 1:].to(logp.device)

    def nll(self, windows: list[list[int]], score_from: list[int]) -> list[list[float]]:
        import torch

        logp, targets = self._log_probs(windows)
        with torch.inference_mode():
            token_nll = -logp.gather(-1, targets.unsqueeze(-1)).squeeze(-1)
        out = token_nll.cpu().tolist()
        return [row[max(s, 1) - 1 :] for row, s in zip(out, score_from, strict=True)]

    def kld_reference(self, windows: list[list[int]], score_from: list[int], k: int) -> list[tuple[Any, ...]]:
        """FP16's side of the KL divergence for each window's scored tokens (evaluate/kld.py)."""
        import torch

        from llmopt.evaluate.kld import reference_rows_torch

        with _gpu_memory_guard(self.device, windows):
            logp, targets = self._log_probs(windows)
            with torch.inference_mode():
                return [
                    reference_rows_torch(logp[b, max(s, 1) - 1 :], targets[b, max(s, 1) - 1 :], k)
                    for b, s in enumerate(score_from)
                ]

    def kld_compare(
        self, windows: list[list[int]], score_from: list[int], refs: list[tuple[Any, ...]]
    ) -> list[tuple[Any, Any, Any]]:
        """Per-token (KL, top-1 agreement, NLL) of each window's scored tokens against FP16's reference rows."""
        import torch

        from llmopt.evaluate.kld import compare_rows_torch

        with _gpu_memory_guard(self.device, windows):
            logp, targets = self._log_probs(windows)
            with torch.inference_mode():
                return [
                    compare_rows_torch(logp[b, max(s, 1) - 1 :], targets[b, max(s, 1) - 1 :], ref)
                    for b, (s, ref) in enumerate(zip(score_from, refs, strict=True))
                ]

    def footprint_bytes(self) -> int:
        return int(self.model.get_memory_footprint())

    def causal_lm(self) -> Any:
        return self.model

    def bench(self, settings: Any, reporter: Any = None) -> dict[str, Any]:
        """Serving speed of the loaded model: static KV cache, CUDA-graph decoding (engine.py)."""
        from llmopt.runners.engine import measure_model
        from llmopt.runners.marlin import marlin_atomic_reduce

        # GPTQ-Marlin: atomicAdd split-K reduction on the shapes where it is fast (runners/marlin.py),
        # for the speed measurement only; perplexity is scored with GPTQModel's ordered reduction.
        atomics = bool(getattr(settings, "marlin_atomics", True)) and self.kernel == "gptq_marlin"
        with marlin_atomic_reduce(self.model, atomics) as switched:
            # A split model is measured as "cuda:0,1": the engine then syncs every GPU and decodes eagerly.
            result = measure_model(self.model, self.placement.spec, settings, reporter)
        if switched:
            result["marlin_atomic_layers"] = switched
            note = f"GPTQ-Marlin reduced with atomicAdd on {switched} narrow layers (--no-marlin-atomics: off)"
            result["decode_mode_note"] = "; ".join(filter(None, [result.get("decode_mode_note"), note]))
        return result

    def close(self) -> None:
        import gc

        import torch

        del self.model
        self._wrapper = None
        gc.collect()
        if torch.cuda.is_available():
            torch.cuda.empty_cache()


class GPTQModelRunner(HFRunner):
    """GPTQ/AWQ checkpoints through GPTQModel's kernels (the ``gptqmodel`` runner)."""

    name = "gptqmodel"
    loader = "gptqmodel"
