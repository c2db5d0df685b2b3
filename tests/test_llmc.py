"""llm-compressor backends (compressed-tensors): options, GPU rules and pins without the library; real runs on
SmolLM2 cut to its first layers where llm-compressor is installed (skipped with the reason where it is not)."""

from __future__ import annotations

import importlib.util
import json
import math
import os
import stat
from pathlib import Path
from typing import Any

import pytest

from llmopt.backends.base import Requirement, get_backend
from llmopt.backends.llmc import (
    GPU_NEEDS,
    LlmcFP8DynamicBackend,
    LlmcNVFP4Backend,
    LlmcW4A16Backend,
    W4A16Options,
    _explain,
    card_facts,
    gpu_problem,
)
from llmopt.errors import EXIT_INPUT, EXIT_UNAVAILABLE, BackendUnavailableError, ModelError, OptionsError
from llmopt.source import SourceModel
from tests.helpers import SMOLLM2_CONFIG, first_layers

HAS_LLMC = importlib.util.find_spec("llmcompressor") is not None
needs_llmc = pytest.mark.skipif(
    not HAS_LLMC,
    reason="llm-compressor is not installed (pip install 'llmopt[llmc]'; it pins transformers<=5.17, so CI's "
    "environment may not have it)",
)
METHODS = ("llmc-fp8-dynamic", "llmc-w8a8-int8", "llmc-w4a16", "llmc-nvfp4")


def source(tmp_path: Path) -> SourceModel:
    return SourceModel(spec="m", path=tmp_path, config=dict(SMOLLM2_CONFIG))


# --- GPU rules (decided before any work) -------------------------------------------------------------


@pytest.mark.parametrize(
    ("method", "capability", "refused"),
    [
        ("llmc-fp8-dynamic", (8, 0), True),  # A100: no FP8 units
        ("llmc-fp8-dynamic", (8, 9), False),  # L40S
        ("llmc-fp8-dynamic", (9, 0), False),  # H100/H200
        ("llmc-nvfp4", (9, 0), True),  # Hopper has no FP4 kernels
        ("llmc-nvfp4", (10, 0), False),  # B200
        ("llmc-w4a16", (7, 5), True),  # no Marlin before Ampere
        ("llmc-w4a16", (8, 0), False),
        ("llmc-w8a8-int8", (7, 0), True),
        ("llmc-w8a8-int8", (7, 5), False),
    ],
)
def test_gpu_rules(method: str, capability: tuple[int, int], refused: bool) -> None:
    problem = gpu_problem(method, capability, "GPU X")
    assert (problem is not None) == refused
    if problem:
        assert f"{capability[0]}.{capability[1]}" in problem and "GPU X" in problem


def test_every_method_has_a_gpu_rule() -> None:
    assert set(GPU_NEEDS) == set(METHODS)


def test_nvfp4_on_hopper_is_refused_before_work_with_what_would_work(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """An H100 (compute capability 9.0) asked for NVFP4: exit 4 naming Blackwell and the methods that run there."""
    pytest.importorskip("torch")
    import torch

    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda index=0: (9, 0))
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda index=0: "NVIDIA H100 80GB HBM3")
    backend = LlmcNVFP4Backend()
    with pytest.raises(BackendUnavailableError) as exc:
        backend.validate(backend.parse_options({}), source(tmp_path), "cuda:0")
    assert exc.value.exit_code == EXIT_UNAVAILABLE
    assert "Blackwell" in str(exc.value) and "H100" in str(exc.value)
    assert "llmc-fp8-dynamic" in (exc.value.hint or "")
    # FP8 is fine on the same GPU
    fp8 = LlmcFP8DynamicBackend()
    fp8.validate(fp8.parse_options({}), source(tmp_path), "cuda:0")


def test_fp8_on_a100_is_refused(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    pytest.importorskip("torch")
    import torch

    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda index=0: (8, 0))
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda index=0: "NVIDIA A100-SXM4-80GB")
    backend = LlmcFP8DynamicBackend()
    with pytest.raises(BackendUnavailableError, match=r"8\.9"):
        backend.validate(backend.parse_options({}), source(tmp_path), "cuda:0")


# --- options -----------------------------------------------------------------------------------------


def test_w4a16_defaults_are_llm_compressors() -> None:
    opts = LlmcW4A16Backend().parse_options({})
    assert isinstance(opts, W4A16Options)
    assert (opts.group_size, opts.sym, opts.actorder, opts.ignore) == (128, True, None, ["lm_head"])


@pytest.mark.parametrize(("method", "option"), [("llmc-fp8-dynamic", "bits"), ("llmc-w4a16", "quant_type")])
def test_an_option_of_another_method_is_refused(method: str, option: str) -> None:
    backend = get_backend(method, require_usable=False)
    with pytest.raises(OptionsError) as exc:
        backend.parse_options({option: 4})
    assert f"'{option}' is not an option of {method}" in str(exc.value)
    assert exc.value.exit_code == EXIT_INPUT


def test_w4a16_group_size_that_does_not_divide_the_model(tmp_path: Path) -> None:
    backend = LlmcW4A16Backend()
    with pytest.raises(OptionsError) as exc:
        backend.validate(backend.parse_options({}), source(tmp_path), "cpu")  # 128 does not divide 576
    assert "576" in str(exc.value) and "64" in str(exc.value)


def test_missing_llmcompressor_gives_the_exact_install_command(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(Requirement, "present", lambda self: self.module != "llmcompressor")
    assert LlmcW4A16Backend().check() == [
        "missing Python package 'llmcompressor': pip install 'llmopt[llmc]'  (or: pip install llmcompressor)"
    ]


def test_a_tracing_failure_becomes_a_model_error_with_the_way_out() -> None:
    opts = LlmcW4A16Backend().parse_options({})
    err = _explain(RuntimeError("Failed to trace model.layers.0 with torch.fx: symbolic value"), opts)  # type: ignore[arg-type]
    assert isinstance(err, ModelError) and "pipeline=basic" in (err.hint or "")
    other = RuntimeError("CUDA out of memory")
    assert _explain(other, opts) is other  # type: ignore[arg-type]


def test_card_facts() -> None:
    facts = card_facts("W4A16", "org/m-w4a16", revision="abc")
    assert facts.load[0].code == "vllm serve org/m-w4a16 --revision abc"
    assert "compressed-tensors" in facts.tags and "4-bit" in facts.tags
    assert facts.library_name == "transformers" and facts.bits == 4 and facts.quant_type == "W4A16"
    assert "Marlin" in facts.load[0].intro
    assert "compressed-tensors" in facts.load[1].intro  # transformers needs it to decompress


def test_the_model_card_of_an_llmc_artifact_says_how_to_serve_it() -> None:
    """The backend's facts reach the card through the registry (Backend.format_card), no format switch."""
    from llmopt.backends import format_card

    facts = format_card("llmc-fp8-dynamic", "compressed-tensors", {}, "org/m-fp8")
    assert facts.quant_type == "FP8_DYNAMIC" and facts.bits == 8
    assert facts.load[0].code == "vllm serve org/m-fp8"


# --- real runs on SmolLM2 cuts -----------------------------------------------------------------------


def _quantize(assets: dict[str, Path], tmp_path: Path, method: str, layers: int, **options: Any) -> Path:
    from llmopt import api

    cut = first_layers(assets["model"], tmp_path / "cut", layers)
    calibrated = method != "llmc-fp8-dynamic"
    out = tmp_path / method
    api.quantize(
        str(cut),
        method,
        out,
        options=options,
        calibration=str(assets["calibration_text"]) if calibrated else None,
        samples=4,
        seq_len=64,
        device="cpu",
    )
    return out


def _score(folder: Path) -> float:
    """Mean NLL of 128 evaluation-like tokens through llmopt's CPU runner."""
    from llmopt.runners.hf import HFRunner

    runner = HFRunner(folder, "cpu")
    try:
        ids = list(range(1000, 1128))
        nll = runner.nll([ids], [1])[0]
    finally:
        runner.close()
    return sum(nll) / len(nll)


def _qcfg(folder: Path) -> dict[str, Any]:
    cfg: dict[str, Any] = json.loads((folder / "config.json").read_text())["quantization_config"]
    return cfg


@needs_llmc
def test_fp8_dynamic_artifact_is_what_vllm_reads_and_scores_on_cpu(assets: dict[str, Path], tmp_path: Path) -> None:
    art = _quantize(assets, tmp_path, "llmc-fp8-dynamic", 2)
    q = _qcfg(art)
    # what vLLM's CompressedTensorsConfig reads to pick its FP8 W8A8 scheme (per-channel weights, per-token
    # dynamic activations)
    assert q["quant_method"] == "compressed-tensors" and q["format"] == "float-quantized"
    group = q["config_groups"]["group_0"]
    w, a = group["weights"], group["input_activations"]
    assert (w["type"], w["num_bits"], w["strategy"], w["dynamic"]) == ("float", 8, "channel", False)
    assert w["symmetric"] is True
    assert (a["type"], a["num_bits"], a["strategy"], a["dynamic"]) == ("float", 8, "token", True)
    assert q["ignore"] == ["lm_head"]
    manifest = json.loads((art / "llmopt.json").read_text())
    assert manifest["format"] == "compressed-tensors" and manifest["calibration"] is None
    # llm-compressor writes the weights with mode 0600; the artifact's files follow the umask like the others
    assert all(stat.S_IMODE(p.stat().st_mode) & 0o044 for p in art.glob("*.safetensors"))
    fp16, fp8 = _score(tmp_path / "cut"), _score(art)
    assert math.isfinite(fp8) and abs(fp8 - fp16) / fp16 < 0.05


@needs_llmc
def test_w4a16_through_llmopt_equals_llm_compressor_used_directly(assets: dict[str, Path], tmp_path: Path) -> None:
    """The wrapping loses nothing: the same scheme, calibration ids and oneshot give the same packed weights."""
    import torch
    from llmcompressor import oneshot
    from llmcompressor.modifiers.gptq import GPTQModifier
    from safetensors.torch import load_file
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from llmopt.backends.llmc import calibration_dataset, w4a16_scheme
    from llmopt.data import calibration_set

    art = _quantize(assets, tmp_path, "llmc-w4a16", 1, group_size=64)
    q = _qcfg(art)
    assert q["format"] == "pack-quantized"
    w = q["config_groups"]["group_0"]["weights"]
    assert (w["num_bits"], w["type"], w["strategy"], w["group_size"]) == (4, "int", "group", 64)
    assert q["config_groups"]["group_0"]["input_activations"] is None

    cut = tmp_path / "cut"
    tok = AutoTokenizer.from_pretrained(cut)
    calib = calibration_set(tok, str(assets["calibration_text"]), samples=4, seq_len=64, seed=0)
    model = AutoModelForCausalLM.from_pretrained(cut, dtype=torch.float32)
    oneshot(
        model=model,
        recipe=[GPTQModifier(ignore=["lm_head"], config_groups={"group_0": w4a16_scheme(64, True)})],
        **calibration_dataset(calib.samples),
    )
    model.to(torch.float16)
    direct = tmp_path / "direct"
    model.save_pretrained(direct, save_compressed=True)
    ours, theirs = load_file(art / "model.safetensors"), load_file(direct / "model.safetensors")
    assert set(ours) == set(theirs)
    assert any(k.endswith("weight_packed") for k in ours)
    for name in ours:
        assert torch.equal(ours[name], theirs[name]), name
    assert math.isfinite(_score(art))


@needs_llmc
def test_w8a8_int8_makes_a_loadable_artifact(assets: dict[str, Path], tmp_path: Path) -> None:
    art = _quantize(assets, tmp_path, "llmc-w8a8-int8", 1)
    q = _qcfg(art)
    assert q["format"] == "int-quantized"
    a = q["config_groups"]["group_0"]["input_activations"]
    assert (a["type"], a["num_bits"], a["strategy"], a["dynamic"]) == ("int", 8, "token", True)
    fp16, quant = _score(tmp_path / "cut"), _score(art)
    assert math.isfinite(quant) and abs(quant - fp16) / fp16 < 0.5
    assert os.path.isfile(art / "recipe.yaml")  # llm-compressor's own record of the recipe travels with it


@needs_llmc
def test_nvfp4_artifact_layout_and_cpu_score(assets: dict[str, Path], tmp_path: Path) -> None:
    """NVFP4 is made on a CPU (groups of 16, FP8 scales, a global scale per tensor) and scores there once its
    decompressed weights are cast to the model's float32: transformers 5.17 + compressed-tensors 0.19 decompress
    them to bfloat16, and without the cast the first matmul fails (docs/llmc.md)."""
    import torch
    from safetensors import safe_open
    from transformers import AutoModelForCausalLM

    art = _quantize(assets, tmp_path, "llmc-nvfp4", 1)
    q = _qcfg(art)
    assert q["format"] == "nvfp4-pack-quantized"
    w = q["config_groups"]["group_0"]["weights"]
    assert (w["type"], w["num_bits"], w["group_size"]) == ("float", 4, 16)
    with safe_open(str(art / "model.safetensors"), framework="pt") as f:
        names = set(f.keys())
    assert {"model.layers.0.mlp.down_proj.weight_packed", "model.layers.0.mlp.down_proj.weight_global_scale"} <= names

    ids = torch.tensor([list(range(1000, 1128))])
    model = AutoModelForCausalLM.from_pretrained(art, dtype=torch.float32).eval()
    with pytest.raises(RuntimeError, match="same dtype"), torch.no_grad():  # what the cast is for (ct 0.19)
        model(ids)

    # llmopt's CPU runner casts them (llmopt/runners/hf.py), and compressed-tensors' forward still rounds the
    # activations to FP4: turning that rounding off changes the score
    from llmopt.runners.hf import HFRunner

    runner = HFRunner(art, "cpu")
    try:
        row = list(range(1000, 1128))
        nvfp4 = runner.nll([row], [1])[0]
        quantized = [m for m in runner.model.modules() if getattr(m, "quantization_scheme", None) is not None]
        assert quantized and {m.weight.dtype for m in quantized} == {torch.float32}
        for m in quantized:
            m.quantization_enabled = False
        weights_only = runner.nll([row], [1])[0]
    finally:
        runner.close()
    fp16 = _score(tmp_path / "cut")
    mean = sum(nvfp4) / len(nvfp4)
    assert math.isfinite(mean) and mean != fp16 and abs(mean - fp16) / fp16 < 0.5
    assert nvfp4 != weights_only


def test_weights_decompressed_in_another_dtype_are_cast_after_decompression() -> None:
    """What compressed-tensors' first-forward hook does to NVFP4 (bfloat16 weights under a float32 model), faked
    with torch alone: the cast hook runs after it, once, on the modules it decompressed only, and keeps the
    values; where that hook was taken off without running (``install_fp8``), nothing is cast."""
    torch = pytest.importorskip("torch")
    from llmopt.runners.compressed import cast_after_decompression

    class Tiny(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.q = torch.nn.Linear(8, 4)  # quantized, decompressed by the hook below
            self.dense = torch.nn.Linear(4, 2)  # not quantized
            self.left = torch.nn.Linear(2, 2, dtype=torch.bfloat16)  # quantized, still compressed (unused here)
            self.plain = torch.nn.Linear(2, 2, dtype=torch.bfloat16)  # not quantized (unused here)
            for m in (self.q, self.left):
                m.quantization_scheme = object()  # what compressed-tensors puts on the modules it quantized
                m.quantization_status = "compressed"

        def forward(self, x: Any) -> Any:
            return self.dense(self.q(x))

    def model_with_decompress_hook() -> Any:
        model = Tiny()
        dense = model.q.weight.detach().clone()

        def ct_decompress_hook(module: Any, args: Any) -> None:  # compressed-tensors 0.19's, for NVFP4
            model.q.weight.data = dense.to(torch.bfloat16)
            model.q.bias.data = model.q.bias.data.to(torch.bfloat16)
            model.q.quantization_status = "decompressed"
            model.ct_decompress_hook.remove()
            del model.ct_decompress_hook

        model.ct_decompress_hook = model.register_forward_pre_hook(ct_decompress_hook)
        return model

    x = torch.randn(3, 8)
    with pytest.raises(RuntimeError, match="dtype"):
        model_with_decompress_hook()(x)
    model = model_with_decompress_hook()
    assert cast_after_decompression(model, torch.float32) is not None
    out = model(x)
    assert out.dtype == torch.float32
    assert model.q.weight.dtype == torch.float32 and model.q.bias.dtype == torch.float32
    assert torch.equal(model.q.weight, model.q.weight.to(torch.bfloat16).float())  # the decompressed values
    assert model.left.weight.dtype == torch.bfloat16 and model.plain.weight.dtype == torch.bfloat16
    assert not model._forward_pre_hooks  # both hooks ran once and are gone
    assert torch.equal(model(x), out)

    # the decompression hook taken off without running (the FP8 speed path): the cast hook leaves everything
    model = model_with_decompress_hook()
    assert cast_after_decompression(model, torch.float64) is not None
    model._forward_pre_hooks.pop(model.ct_decompress_hook.id)
    model(x)
    assert model.q.weight.dtype == torch.float32 and not model._forward_pre_hooks

    assert cast_after_decompression(torch.nn.Linear(2, 2), torch.float32) is None  # not a compressed-tensors load


def test_speed_of_a_decompressed_format_is_refused_not_faked(tmp_path: Path) -> None:
    """transformers decompresses compressed-tensors to 16-bit on load: `bench` / `eval --throughput` refuse
    (exit 4) before measuring anything instead of printing FP16's speed under the format's name."""
    from tests.helpers import fake_model, run_cli

    cfg = {**SMOLLM2_CONFIG, "quantization_config": {"quant_method": "compressed-tensors", "format": "float-quantized"}}
    model = fake_model(tmp_path / "ct", cfg)
    r = run_cli(["bench", "ct", "--device", "cpu"], cwd=tmp_path)
    assert r.returncode == 4, r.stderr[-1500:]
    assert "speed not measured" in r.stderr and "vllm serve" in r.stderr and "Traceback" not in r.stderr
    assert model.is_dir()


def test_layers_decompressed_at_load_are_cast_at_once() -> None:
    """A checkpoint decompressed while loading (run_compressed false, dequantize true) has no first-forward hook:
    its decompressed layers take the model's dtype right away; compressed ones and unquantized ones are left."""
    torch = pytest.importorskip("torch")
    from llmopt.runners.compressed import cast_after_decompression

    model = torch.nn.Sequential(torch.nn.Linear(8, 4), torch.nn.Linear(4, 2), torch.nn.Linear(2, 2))
    model[0].quantization_scheme, model[0].quantization_status = object(), "decompressed"
    model[1].quantization_scheme, model[1].quantization_status = object(), "compressed"
    for layer in model:
        layer.weight.data = layer.weight.data.to(torch.bfloat16)
    assert cast_after_decompression(model, torch.float32) is None
    assert [layer.weight.dtype for layer in model] == [torch.float32, torch.bfloat16, torch.bfloat16]
