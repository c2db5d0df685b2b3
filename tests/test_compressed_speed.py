"""compressed-tensors artifacts timed through real kernels (llmopt/runners/compressed.py), checked on CPU.

The kernels themselves run on the GPU machine; here: which schemes are timed and which refused (with the reason,
before any work), the FP8 layer's arithmetic against a float32 reference (``torch._scaled_mm`` runs on CPU too),
and the W4A16 -> GPTQ rewrite bit for bit: a hand-packed compressed-tensors checkpoint of a tiny Llama, rewritten,
loaded through GPTQModel, gives back every layer's code x scale exactly."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path
from typing import Any

import pytest

from llmopt.errors import BackendUnavailableError
from llmopt.runners.compressed import refusal, speed_scheme
from tests.helpers import random_models

pytestmark = pytest.mark.skipif(importlib.util.find_spec("torch") is None, reason="needs torch")

FP8 = {
    "quant_method": "compressed-tensors",
    "format": "float-quantized",
    "ignore": ["lm_head"],
    "config_groups": {
        "group_0": {
            "targets": ["Linear"],
            "weights": {"num_bits": 8, "type": "float", "strategy": "channel", "symmetric": True, "dynamic": False},
            "input_activations": {"num_bits": 8, "type": "float", "strategy": "token", "dynamic": True},
            "format": "float-quantized",
        }
    },
}


def w4a16(group_size: int = 32) -> dict[str, Any]:
    return {
        "quant_method": "compressed-tensors",
        "format": "pack-quantized",
        "ignore": ["lm_head"],
        "config_groups": {
            "group_0": {
                "targets": ["Linear"],
                "weights": {"num_bits": 4, "type": "int", "strategy": "group", "group_size": group_size,
                            "symmetric": True, "dynamic": False},
                "input_activations": None,
                "format": "pack-quantized",
            }
        },
    }


def folder_with(tmp: Path, qc: dict[str, Any]) -> Path:
    tmp.mkdir(parents=True, exist_ok=True)
    (tmp / "config.json").write_text(json.dumps({"model_type": "llama", "quantization_config": qc}))
    return tmp


def test_fp8_dynamic_and_w4a16_are_timed_the_rest_refused_with_the_reason(tmp_path: Path) -> None:
    assert speed_scheme(folder_with(tmp_path / "fp8", FP8)).kind == "fp8-dynamic"  # type: ignore[union-attr]
    scheme = speed_scheme(folder_with(tmp_path / "w4", w4a16(64)))
    assert scheme is not None and scheme.kind == "w4a16" and scheme.group_size == 64
    int8 = json.loads(json.dumps(FP8))
    group = int8["config_groups"]["group_0"]
    group["weights"]["type"] = group["input_activations"]["type"] = "int"
    group["format"] = int8["format"] = "int-quantized"
    w8a8 = speed_scheme(folder_with(tmp_path / "w8a8", int8))
    assert w8a8 is not None and w8a8.kind is None and "int-quantized, 8-bit int weights" in w8a8.reason
    asym = w4a16()
    asym["config_groups"]["group_0"]["weights"]["symmetric"] = False
    assert speed_scheme(folder_with(tmp_path / "asym", asym)).kind is None  # type: ignore[union-attr]
    plain = tmp_path / "plain"
    plain.mkdir()
    (plain / "config.json").write_text(json.dumps({"model_type": "llama"}))
    assert speed_scheme(plain) is None and refusal(plain, "cpu") is None


def test_on_a_cpu_nothing_compressed_is_timed(tmp_path: Path) -> None:
    from llmopt.evaluate.throughput import refuse_decompressed_speed

    for name, qc in (("fp8", FP8), ("w4", w4a16())):
        folder = folder_with(tmp_path / name, qc)
        assert "NVIDIA GPUs only" in (refusal(folder, "cpu") or "")
        with pytest.raises(BackendUnavailableError) as info:
            refuse_decompressed_speed(folder, "cpu")
        assert "FP16's speed" in info.value.message and "NVIDIA GPUs only" in info.value.message
        assert info.value.exit_code == 4
        assert "several" in (refusal(folder, "cuda:0,1") or "")


def test_the_fp8_layer_is_the_quantized_product(tmp_path: Path) -> None:
    """Per-token input codes times per-channel weight codes, with both scales: what the layer computes, to the
    rounding of the 16-bit output."""
    import torch

    from llmopt.runners.compressed import FP8_MAX, _fp8_linear_class

    gen = torch.Generator().manual_seed(0)
    w = torch.randn(48, 64, generator=gen)
    w_scale = w.abs().amax(dim=1, keepdim=True) / FP8_MAX
    w_codes = (w / w_scale).to(torch.float8_e4m3fn)
    bias = torch.randn(48, generator=gen)
    layer = _fp8_linear_class()(w_codes, w_scale, bias)
    x = torch.randn(2, 5, 64, generator=gen)
    x[0, 0] = 0.0  # an all-zero row: scale 1, codes 0, output = bias
    with torch.no_grad():
        y = layer(x.to(torch.bfloat16)).float()
    flat = x.to(torch.bfloat16).float().reshape(-1, 64)  # what the layer was given
    x_scale = flat.abs().amax(dim=1, keepdim=True) / FP8_MAX
    x_scale = torch.where(x_scale > 0, x_scale, torch.ones_like(x_scale))
    x_deq = (flat / x_scale).to(torch.float8_e4m3fn).float() * x_scale
    ref = (x_deq @ (w_codes.float() * w_scale).t() + bias).reshape(2, 5, 48)
    assert y.shape == (2, 5, 48)
    assert torch.allclose(y, ref, rtol=2e-2, atol=2e-2), (y - ref).abs().max()
    assert torch.allclose(y[0, 0], bias, atol=1e-2)
    # against the unquantized product: FP8's rounding only
    assert ((y - (x @ w.t() + bias)).norm() / (x @ w.t() + bias).norm()).item() < 0.1


def pack_int4_rows(codes: Any) -> Any:
    """compressed-tensors' pack_to_int32 for 4 bits, written out: signed codes + 8, eight to an int32 along each
    row, the first in the lowest bits."""
    import torch

    unsigned = (codes.to(torch.int64) + 8).view(codes.shape[0], -1, 8)
    words = (unsigned << torch.arange(0, 32, 4, dtype=torch.int64)).sum(dim=-1)
    return torch.where(words >= 2**31, words - 2**32, words).to(torch.int32)


def test_our_packing_is_compressed_tensors_own() -> None:
    helpers = pytest.importorskip("compressed_tensors.compressors.pack_quantized.helpers")
    import torch

    codes = torch.randint(-8, 8, (16, 64), generator=torch.Generator().manual_seed(1), dtype=torch.int8)
    assert torch.equal(pack_int4_rows(codes), helpers.pack_to_int32(codes, 4))


def test_w4a16_rewritten_for_marlin_keeps_every_code_and_scale(tmp_path: Path) -> None:
    """Each layer of the rewritten checkpoint, dequantized by GPTQModel (its torch kernel, on CPU), is exactly
    code x scale of the compressed-tensors checkpoint: the rewrite loses nothing."""
    pytest.importorskip("gptqmodel")
    import torch
    from safetensors.torch import save_file

    from llmopt.runners.compressed import w4a16_as_gptq
    from llmopt.runners.hf import HFRunner

    rm = random_models()
    model = rm.build_fp16(rm.llama_config("tiny"), "cpu").to(torch.float16)
    src = tmp_path / "w4a16"
    rm.save_fp16(model, src)
    gen = torch.Generator().manual_seed(0)
    tensors: dict[str, Any] = {}
    expected: dict[str, Any] = {}
    for name, module in model.named_modules():
        if name.rsplit(".", 1)[-1] in rm.QUANTIZED and name.startswith("model.layers."):
            out_f, in_f = module.weight.shape
            codes = torch.randint(-8, 8, (out_f, in_f), generator=gen, dtype=torch.int8)
            scales = (torch.rand(out_f, in_f // 32, generator=gen) * 1e-2 + 1e-3).to(torch.float16)
            tensors[f"{name}.weight_packed"] = pack_int4_rows(codes)
            tensors[f"{name}.weight_scale"] = scales
            tensors[f"{name}.weight_shape"] = torch.tensor([out_f, in_f])
            expected[name] = codes.float() * scales.float().repeat_interleave(32, dim=1)
    for name, tensor in model.state_dict().items():
        if not any(name.startswith(f"{q}.") for q in expected):
            tensors[name] = tensor.contiguous()
    for old in src.glob("*.safetensors"):
        old.unlink()
    save_file(tensors, str(src / "model.safetensors"), metadata={"format": "pt"})
    config = json.loads((src / "config.json").read_text())
    config["quantization_config"] = w4a16(32)
    (src / "config.json").write_text(json.dumps(config))

    dst = tmp_path / "gptq"
    assert w4a16_as_gptq(src, dst) == len(expected)
    qcfg = json.loads((dst / "config.json").read_text())["quantization_config"]
    assert (qcfg["quant_method"], qcfg["bits"], qcfg["group_size"], qcfg["sym"]) == ("gptq", 4, 32, True)
    runner = HFRunner(dst, "cpu", loader="gptqmodel")
    try:
        assert runner.kernel is not None and "dense float32" in runner.kernel
        modules = dict(runner.model.named_modules())
        for name, weight in expected.items():
            got = modules[name].weight.detach().float()
            assert torch.equal(got, weight), name
    finally:
        runner.close()


def test_a_checkpoint_that_is_not_w4a16_is_not_rewritten(tmp_path: Path) -> None:
    from llmopt.runners.compressed import w4a16_as_gptq

    with pytest.raises(ValueError, match="no W4A16"):
        w4a16_as_gptq(folder_with(tmp_path / "fp8", FP8), tmp_path / "out")
    assert not (tmp_path / "out").exists()


def _fp8_checkpoint(tmp_path: Path, bias: bool = False) -> tuple[Any, Any]:
    """A tiny random Llama whose decoder linear layers are stored in FP8 in tmp_path (codes and scales, as
    llm-compressor writes them), and the model as transformers' decompression leaves it (16-bit weights equal to
    code x scale)."""
    import torch
    from safetensors.torch import save_file

    from llmopt.runners.compressed import FP8_MAX

    rm = random_models()
    model = rm.build_fp16(rm.llama_config("tiny", attention_bias=bias), "cpu").to(torch.bfloat16)
    tensors: dict[str, Any] = {}
    for name, module in model.named_modules():
        if name.rsplit(".", 1)[-1] in rm.QUANTIZED and name.startswith("model.layers."):
            w = module.weight.detach().float()
            scale = w.abs().amax(dim=1, keepdim=True) / FP8_MAX
            codes = (w / scale).to(torch.float8_e4m3fn)
            tensors[f"{name}.weight"] = codes
            tensors[f"{name}.weight_scale"] = scale.to(torch.bfloat16)
            with torch.no_grad():  # what transformers' decompression leaves in the model
                module.weight.copy_((codes.float() * scale).to(torch.bfloat16))
    save_file(tensors, str(tmp_path / "model.safetensors"))
    return model, tensors


def test_install_fp8_replaces_the_stored_fp8_layers_of_a_loaded_model(tmp_path: Path) -> None:
    """What a speed measurement does after transformers loaded the checkpoint: every linear layer stored in FP8
    becomes an FP8 layer with the stored codes and scales (q/k/v and gate/up merged); the rest (the head) stays."""
    import copy

    import torch

    from llmopt.runners.compressed import install_fp8

    model, tensors = _fp8_checkpoint(tmp_path)
    reference = copy.deepcopy(model)
    installed = install_fp8(model, tmp_path)
    layers = len(model.model.layers)
    assert installed.replaced == len(tensors) // 2 == 7 * layers
    assert installed.merged == 5 * layers
    assert type(model.model.layers[0].self_attn.q_proj).__name__ == "Fp8SiblingLinear"
    assert type(model.model.layers[0].self_attn.o_proj).__name__ == "Fp8Linear"
    assert isinstance(model.lm_head, torch.nn.Linear)
    # the merged weights are stored once: 7 linear layers' codes a decoder layer, not more
    fp8_bytes = sum(b.numel() for b in model.buffers() if b.dtype == torch.float8_e4m3fn)
    assert fp8_bytes == sum(t.numel() for n, t in tensors.items() if n.endswith(".weight"))
    ids = torch.randint(0, model.config.vocab_size, (1, 12), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        got = model(input_ids=ids).logits.float()
        ref = reference(input_ids=ids).logits.float()
    # the same weights; only the inputs' per-token FP8 rounding differs
    assert ((got - ref).norm() / ref.norm()).item() < 0.1


@pytest.mark.parametrize("bias", [False, True])
def test_merged_siblings_compute_what_separate_layers_do(tmp_path: Path, bias: bool) -> None:
    """One merged product for q/k/v (and gate/up) gives each layer exactly its separate product: the same codes
    of the same input, the same weight rows; with biases too (Qwen2's q/k/v have them)."""
    import copy

    import torch

    from llmopt.runners.compressed import install_fp8

    model, _ = _fp8_checkpoint(tmp_path, bias=bias)
    separate = copy.deepcopy(model)
    assert install_fp8(model, tmp_path).merged > 0
    assert install_fp8(separate, tmp_path, merge=False).merged == 0
    assert type(separate.model.layers[0].self_attn.q_proj).__name__ == "Fp8Linear"
    ids = torch.randint(0, model.config.vocab_size, (2, 9), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        assert torch.equal(model(input_ids=ids).logits, separate(input_ids=ids).logits)
        # a sibling called alone, on an input no sibling has seen, multiplies with its own rows
        attn, attn_sep = model.model.layers[0].self_attn, separate.model.layers[0].self_attn
        x = torch.randn(3, attn.k_proj.in_features, generator=torch.Generator().manual_seed(2)).to(torch.bfloat16)
        assert torch.equal(attn.v_proj(x), attn_sep.v_proj(x))
        assert torch.equal(attn.k_proj(x), attn_sep.k_proj(x))
        assert attn.q_proj.shared.x is not None  # k's product left q and v theirs: v took its own, q's waits
        y = torch.randn(3, attn.k_proj.in_features).to(torch.bfloat16)
        assert torch.equal(attn.q_proj(y), attn_sep.q_proj(y))  # another input: not the waiting slice


def test_a_sibling_never_returns_a_stale_product(tmp_path: Path) -> None:
    """A waiting slice belongs to the input it was computed on as it was then: an input changed in place since,
    or a buffer refilled, is multiplied again (found by a hostile tester: q(x); x.mul_(2); k(x) gave k's output of
    the old x). The weights are read from the leader's buffers, so whatever moves or replaces them is seen."""
    import copy

    import torch

    from llmopt.runners.compressed import install_fp8

    model, _ = _fp8_checkpoint(tmp_path)
    separate = copy.deepcopy(model)
    install_fp8(model, tmp_path)
    install_fp8(separate, tmp_path, merge=False)
    attn, ref = model.model.layers[0].self_attn, separate.model.layers[0].self_attn
    mlp, ref_mlp = model.model.layers[0].mlp, separate.model.layers[0].mlp
    gen = torch.Generator().manual_seed(3)
    with torch.no_grad():
        x = torch.randn(2, 5, attn.q_proj.in_features, generator=gen).to(torch.bfloat16)
        assert torch.equal(attn.q_proj(x), ref.q_proj(x))
        x.mul_(2)
        assert torch.equal(attn.k_proj(x), ref.k_proj(x))
        buf = torch.randn(4, mlp.gate_proj.in_features, generator=gen).to(torch.bfloat16)
        mlp.gate_proj(buf)
        buf.copy_(torch.randn(4, mlp.gate_proj.in_features, generator=gen).to(torch.bfloat16))
        assert torch.equal(mlp.up_proj(buf), ref_mlp.up_proj(buf))
        # the merged weights live in the leader's buffers: replace them and every sibling uses the new ones
        leader = attn.q_proj
        leader.weight = torch.zeros_like(leader.weight)
        y = torch.randn(3, attn.q_proj.in_features, generator=gen).to(torch.bfloat16)
        assert torch.count_nonzero(attn.v_proj(y)) == 0


def test_install_fp8_removes_the_decompression_hook(tmp_path: Path) -> None:
    """compressed-tensors leaves a forward pre-hook that decompresses its layers at the first call; once they are
    replaced it has nothing to do but re-dispatch the model, so it goes."""
    from llmopt.runners.compressed import install_fp8

    model, _ = _fp8_checkpoint(tmp_path)
    calls: list[int] = []

    def ct_decompress_hook(module: Any, args: Any) -> None:
        calls.append(1)

    def other_hook(module: Any, args: Any) -> None:
        calls.append(2)

    model.register_forward_pre_hook(ct_decompress_hook)
    model.register_forward_pre_hook(other_hook)
    install_fp8(model, tmp_path)
    import torch

    with torch.no_grad():
        model(input_ids=torch.tensor([[1, 2, 3]]))
    assert calls == [2]


@pytest.mark.gpu
def test_the_triton_quantization_is_torchs_bit_for_bit() -> None:
    """On a CUDA GPU the per-token quantization is one Triton launch; its codes and scales equal torch's ops'
    exactly, for the widths of real layers (4096, 14336), odd widths, rows of zeros and large values."""
    import torch

    from llmopt.runners.compressed import _quant_kernel, quantize_rows, quantize_rows_torch

    if not torch.cuda.is_available():
        pytest.skip("needs a CUDA GPU")
    assert _quant_kernel() is not None
    gen = torch.Generator(device="cuda").manual_seed(0)
    for rows, cols in [(1, 4096), (8, 14336), (33, 576), (5, 100), (2, 1)]:
        for dtype in (torch.float16, torch.bfloat16):
            x = (torch.randn(rows, cols, generator=gen, device="cuda") * 3).to(dtype)
            x[0, :] = 0
            if cols > 3:
                x[-1, 3] = 60000 if dtype == torch.float16 else 1e30
            codes, scale = quantize_rows(x)
            ref_codes, ref_scale = quantize_rows_torch(x)
            assert torch.equal(scale, ref_scale), (rows, cols, dtype)
            assert torch.equal(codes.view(torch.uint8), ref_codes.view(torch.uint8)), (rows, cols, dtype)


def test_w4a16_is_timed_with_the_marlin_settings_of_a_gptq_checkpoint(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The W4A16 path renamed the runner's kernel before measuring; the runner picks its Marlin settings (the
    atomicAdd reduction) by that name, so W4A16 was timed without them: 1.06x FP16 at batch 1 on the H200 where the
    same kernel on a GPTQ checkpoint gave 1.25x. The name is given after the measurement now."""
    import contextlib

    import llmopt.evaluate.throughput as throughput
    import llmopt.runners as runners
    import llmopt.runners.compressed as compressed
    from llmopt.specs import ThroughputSpec

    folder = folder_with(tmp_path / "w4a16", w4a16(128))
    seen: list[str] = []

    class FakeRunner:
        name, dtype, load_seconds, placement = "gptqmodel", "float16", 0.0, None
        kernel = "gptq_marlin"

        def causal_lm(self) -> Any:
            return None

        def bench(self, settings: Any, reporter: Any = None) -> dict[str, Any]:
            seen.append(self.kernel)  # what the runner's bench decides its Marlin settings by
            return {"decode": {}}

        def footprint_bytes(self) -> int:
            return 0

        def close(self) -> None:
            pass

    monkeypatch.setattr(throughput, "refuse_decompressed_speed", lambda path, device: None)
    monkeypatch.setattr(compressed, "gptq_copy", lambda path: contextlib.nullcontext(path))
    monkeypatch.setattr(runners, "load_runner", lambda *a, **k: FakeRunner())
    result = throughput.bench_model(folder, "cuda:0", ThroughputSpec(), isolate=False)
    assert seen == ["gptq_marlin"]
    assert result["kernel"] == "gptq_marlin: W4A16 rewritten in GPTQ's layout, lossless"
