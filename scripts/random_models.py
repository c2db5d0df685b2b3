"""Random-weight Llama models and artifacts for speed work (speed does not depend on weight values).

- ``llama_config(shape)``: the 1B shape (hidden 2048, 22 layers, GQA 32/4, MLP 5632, vocab 49152), the 8B
  shape (hidden 4096, 32 layers, GQA 32/8, MLP 14336, vocab 128256), or a tiny one for tests.
- ``build_fp16``: the model with random weights, built on the device.
- ``save_fp16``: a Hugging Face folder (safetensors + a small word-level tokenizer).
- ``write_random_gptq``: a GPTQ checkpoint (GPTQModel's v1 ``gptq`` format, 4-bit symmetric, no act-order)
  whose packed weights and scales are random: written directly, no calibration. Quantizing 8B random
  weights with GPTQModel would take many minutes and measure nothing more.
- ``write_random_awq``: the same for AWQ (AutoAWQ's GEMM layout, 4-bit with zero points), as llmopt's
  ``awq`` backend writes it.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

SHAPES: dict[str, dict[str, int]] = {
    "tiny": dict(hidden_size=128, intermediate_size=256, num_hidden_layers=2, num_attention_heads=4,
                 num_key_value_heads=2, vocab_size=512),
    "1b": dict(hidden_size=2048, intermediate_size=5632, num_hidden_layers=22, num_attention_heads=32,
               num_key_value_heads=4, vocab_size=49152),
    "8b": dict(hidden_size=4096, intermediate_size=14336, num_hidden_layers=32, num_attention_heads=32,
               num_key_value_heads=8, vocab_size=128256),
}  # fmt: skip
QUANTIZED = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


def llama_config(shape: str, **overrides: Any) -> Any:
    from transformers import LlamaConfig

    params = {
        **SHAPES[shape],
        "max_position_embeddings": 8192,
        "rope_theta": 500000.0,
        "tie_word_embeddings": False,
        "bos_token_id": 1,
        "eos_token_id": 2,
        **overrides,
    }
    cfg = LlamaConfig(**params)
    cfg.architectures = ["LlamaForCausalLM"]
    return cfg


def build_fp16(config: Any, device: str, seed: int = 0) -> Any:
    """Random fp16 LlamaForCausalLM on ``device`` (std 0.02 like the usual init; values do not matter)."""
    import torch
    from transformers import LlamaForCausalLM

    torch.manual_seed(seed)
    with torch.device(device):
        model = LlamaForCausalLM._from_config(config, dtype=torch.float16)
    return model.eval()


def write_tokenizer(folder: Path, vocab_size: int) -> None:
    """A word-level tokenizer with a made-up word for every id (the loaders want one; a served model's generated
    ids must decode to text, or an OpenAI-compatible stream carries no text to time)."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {"<unk>": 0, "<s>": 1, "</s>": 2, **{f"w{i}": i for i in range(3, vocab_size)}}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="<unk>", bos_token="<s>", eos_token="</s>")
    fast.save_pretrained(folder)


def save_fp16(model: Any, folder: Path) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(folder)
    write_tokenizer(folder, model.config.vocab_size)
    return folder


def _copy_unquantized(model: Any, tensors: dict[str, Any]) -> None:
    for name, tensor in model.state_dict().items():
        owner = name.rsplit(".", 2)[-2] if name.count(".") >= 2 else ""
        if owner in QUANTIZED and name.startswith("model.layers."):
            continue
        tensors[name] = tensor.detach().contiguous()


def _write_checkpoint(model: Any, folder: Path, tensors: dict[str, Any], qcfg: dict[str, Any]) -> Path:
    from safetensors.torch import save_file

    save_file(
        {k: v.contiguous() for k, v in tensors.items()},
        str(folder / "model.safetensors"),
        metadata={"format": "pt"},
    )
    config = model.config.to_dict()
    config["quantization_config"] = qcfg
    config["dtype"] = "float16"
    config.pop("torch_dtype", None)
    (folder / "config.json").write_text(json.dumps(config, indent=2))
    (folder / "quantize_config.json").write_text(json.dumps(qcfg, indent=2))
    write_tokenizer(folder, model.config.vocab_size)
    return folder


def _random_scales(rows: int, cols: int, gen: Any, device: Any, scale: float) -> Any:
    import torch

    r = torch.rand((rows, cols), device=device, generator=gen, dtype=torch.float32)
    return (r * scale + scale / 10).to(torch.float16)


def write_random_awq(model: Any, folder: Path, *, group_size: int = 128, seed: int = 0, scale: float = 2e-3) -> Path:
    """AWQ checkpoint (AutoAWQ GEMM layout: qweight int32 [in, out/8], qzeros int32 [in/g, out/8], scales
    fp16 [in/g, out]; 4-bit, zero points) with random packed weights and zero points."""
    import torch

    folder.mkdir(parents=True, exist_ok=True)
    gen = torch.Generator(device=model.device).manual_seed(seed)
    tensors: dict[str, Any] = {}
    for name, module in model.named_modules():
        if name.rsplit(".", 1)[-1] in QUANTIZED and name.startswith("model.layers."):
            k, n = module.in_features, module.out_features
            if k % group_size or n % 8:
                raise ValueError(f"{name}: {k}x{n} does not fit group size {group_size}")
            dev = module.weight.device
            for suffix, shape in (("qweight", (k, n // 8)), ("qzeros", (k // group_size, n // 8))):
                tensors[f"{name}.{suffix}"] = torch.randint(
                    -(2**31), 2**31 - 1, shape, dtype=torch.int32, device=dev, generator=gen
                )
            tensors[f"{name}.scales"] = _random_scales(k // group_size, n, gen, dev, scale)
    _copy_unquantized(model, tensors)
    qcfg = {
        "bits": 4,
        "group_size": group_size,
        "zero_point": True,
        "version": "gemm",
        "format": "gemm",
        "checkpoint_format": "gemm",
        "quant_method": "awq",
        "method": "awq",
        "desc_act": False,
        "lm_head": False,
        "pack_dtype": "int32",
        "meta": {"quantizer": ["llmopt-random-weights"]},
    }
    return _write_checkpoint(model, folder, tensors, qcfg)


def write_random_gptq(
    model: Any,
    folder: Path,
    *,
    bits: int = 4,
    group_size: int = 128,
    seed: int = 0,
    scale: float = 2e-3,
    lm_head: bool = False,
) -> Path:
    """GPTQ checkpoint with random packed weights, taking the unquantized tensors (embeddings, norms,
    lm_head) from ``model``. Layout as GPTQModel writes it: qweight int32 [in/8, out], qzeros int32
    [in/g, out/8] (v1 zero point 8 stored as 7), scales fp16 [in/g, out], g_idx int32 [in].

    ``lm_head=True``: the output head is packed too (4-bit at ``group_size``), with the config llmopt's
    ``--quantize-lm-head`` writes (``lm_head: true`` and a ``dynamic`` rule giving the head its bits and group)."""
    import torch

    if bits != 4:
        raise ValueError("only 4-bit is built here")
    folder.mkdir(parents=True, exist_ok=True)
    gen = torch.Generator(device=model.device).manual_seed(seed)
    pack = 32 // bits
    tensors: dict[str, Any] = {}
    for name, module in model.named_modules():
        in_block = name.rsplit(".", 1)[-1] in QUANTIZED and name.startswith("model.layers.")
        if in_block or (lm_head and name == "lm_head"):
            k, n = module.in_features, module.out_features
            if k % group_size or n % pack:
                raise ValueError(f"{name}: {k}x{n} does not fit group size {group_size}")
            dev = module.weight.device
            tensors[f"{name}.qweight"] = torch.randint(
                -(2**31), 2**31 - 1, (k // pack, n), dtype=torch.int32, device=dev, generator=gen
            )
            tensors[f"{name}.qzeros"] = torch.full(
                (k // group_size, n // pack), 0x77777777, dtype=torch.int32, device=dev
            )
            tensors[f"{name}.scales"] = _random_scales(k // group_size, n, gen, dev, scale)
            tensors[f"{name}.g_idx"] = (torch.arange(k, device=dev, dtype=torch.int32) // group_size).contiguous()
    _copy_unquantized(model, tensors)
    if lm_head:
        tensors.pop("lm_head.weight", None)
    qcfg = {
        "bits": bits,
        "group_size": group_size,
        "desc_act": False,
        "sym": True,
        "lm_head": lm_head,
        **({"dynamic": {"lm_head": {"bits": bits, "group_size": group_size, "sym": True}}} if lm_head else {}),
        "quant_method": "gptq",
        "checkpoint_format": "gptq",
        "format": "gptq",
        "method": "gptq",
        "pack_dtype": "int32",
        "meta": {"quantizer": ["llmopt-random-weights"]},
    }
    return _write_checkpoint(model, folder, tensors, qcfg)
