"""HQQ backend: the solver on toy tensors, the AWQ GEMM packing, options, and one e2e run on SmolLM2 cut to 2 layers."""

from __future__ import annotations

import json
import math
import re
from pathlib import Path
from typing import Any

import pytest

from llmopt.backends.base import Requirement, describe_backend, format_card, get_backend
from llmopt.backends.hqq import HQQBackend, HQQOptions
from llmopt.errors import EXIT_INPUT, EXIT_UNAVAILABLE, BackendUnavailableError, OptionsError
from tests.helpers import cli_in_process as run_cli
from tests.helpers import dense_matches_the_kernel, fake_model, first_layers
from tests.helpers import smollm2_source as source


def toy_weight(out_features: int = 64, in_features: int = 256, seed: int = 0) -> Any:
    """Heavy-tailed like a trained layer's weights (Student-t, 3 degrees of freedom), a few outliers per row."""
    torch = pytest.importorskip("torch")
    gen = torch.Generator().manual_seed(seed)
    normal = torch.randn(out_features, in_features, generator=gen)
    chi2 = torch.randn(3, out_features, in_features, generator=gen).pow(2).sum(0) / 3
    return (normal / chi2.sqrt() * 0.02).float()


def rtn_abs_error(weight: Any, group: int) -> float:
    """Round-to-nearest asymmetric 4-bit, min-max scale, integer zero point: the floor any 4-bit method must beat."""
    w = weight.reshape(-1, group)
    lo, hi = w.min(1, keepdim=True).values, w.max(1, keepdim=True).values
    scale = ((hi - lo) / 15).half().float()
    zero = (-lo / scale).round().clamp(0, 15)
    q = (w / scale + zero).round().clamp(0, 15)
    return float((w - (q - zero) * scale).abs().mean())


# --- the solver ------------------------------------------------------------------------------------------


@pytest.mark.parametrize("group", [32, 64, -1])
def test_solver_beats_round_to_nearest_with_integer_zero_points(group: int) -> None:
    pytest.importorskip("hqq")
    import torch

    from llmopt.backends.hqq import solve

    weight = toy_weight()
    result = solve(weight, HQQOptions(group_size=group), scale_dtype=torch.float16)
    width = 256 if group == -1 else group
    groups = 256 // width
    assert result.codes.shape == (64, 256) and result.codes.dtype == torch.int32
    assert result.zeros.shape == (64, groups) and result.zeros.dtype == torch.int32
    assert result.scales.shape == (64, groups) and result.scales.dtype == torch.float16
    assert int(result.codes.min()) >= 0 and int(result.codes.max()) <= 15
    assert int(result.zeros.min()) >= 0 and int(result.zeros.max()) <= 15
    # what the container stores, dequantized: (code - zero) * scale per group
    scales = result.scales.float().repeat_interleave(width, dim=1)
    zeros = result.zeros.float().repeat_interleave(width, dim=1)
    dequantized = (result.codes.float() - zeros) * scales
    error = float((weight - dequantized).abs().mean())
    assert error == pytest.approx(result.abs_error, rel=1e-5)
    rtn = rtn_abs_error(weight, width)
    assert result.rtn_abs_error == pytest.approx(rtn, rel=1e-5)
    assert error < 0.99 * rtn, (error, rtn)  # measured: 2.9% (g32), 3.0% (g64), 10.7% (rows) below


def test_solver_keeps_flat_and_one_sided_groups_exact_enough() -> None:
    """A constant group (max == min) and an all-positive group: hqq's guard against a zero range, zero points
    clamped to the grid, and nothing infinite or NaN."""
    pytest.importorskip("hqq")
    import torch

    from llmopt.backends.hqq import solve

    weight = toy_weight(8, 128)
    weight[0, :64] = 0.5  # flat
    weight[1, :64] = weight[1, :64].abs() + 0.1  # no negative weight: the zero point would fall below the grid
    result = solve(weight, HQQOptions(group_size=64), scale_dtype=torch.float16)
    assert torch.isfinite(result.scales.float()).all()
    assert int(result.zeros.min()) >= 0 and int(result.zeros.max()) <= 15
    flat = (result.codes[0, :64].float() - result.zeros[0, 0].float()) * result.scales[0, 0].float()
    assert float((flat - 0.5).abs().max()) < 1e-3
    assert result.abs_error <= result.rtn_abs_error


def test_packing_is_what_gptqmodel_unpacks() -> None:
    """GPTQModel's own AWQ dequantization (what its kernels and llmopt's CPU scoring read) of the packed layer gives
    back (code - zero) * scale of the solver."""
    pytest.importorskip("hqq")
    pytest.importorskip("gptqmodel")
    import torch
    from gptqmodel.quantization.awq.utils.packing_utils import dequantize_gemm

    from llmopt.backends.hqq import PackedAWQLinear, solve

    linear = torch.nn.Linear(128, 64, bias=True)
    with torch.no_grad():
        linear.weight.copy_(toy_weight(64, 128, seed=1))
    result = solve(linear.weight.detach(), HQQOptions(group_size=32), scale_dtype=torch.float16)
    packed = PackedAWQLinear.from_solution(linear, result, 4, 32)
    assert packed.qweight.shape == (128, 8) and packed.qweight.dtype == torch.int32
    assert packed.qzeros.shape == (4, 8) and packed.scales.shape == (4, 64)
    assert torch.equal(packed.bias, linear.bias.detach())
    unpacked = dequantize_gemm(packed.qweight, packed.qzeros, packed.scales.float(), 4, 32).T
    scales = result.scales.float().repeat_interleave(32, dim=1)
    zeros = result.zeros.float().repeat_interleave(32, dim=1)
    assert torch.allclose(unpacked, (result.codes.float() - zeros) * scales)


def test_awq_packing_layout_is_the_formats() -> None:
    """Eight codes 0..7 land in one word in AWQ's interleaved order, the first in the lowest nibble; codes of 15
    fill the sign bit; the packer equals GPTQModel's own pack_awq where the installed GPTQModel has one (7.6; 7.3
    has none, which broke -m hqq there)."""
    import torch

    from llmopt.backends.hqq import pack_awq_4bit

    words = pack_awq_4bit(torch.tensor([[0, 1, 2, 3, 4, 5, 6, 7], [15] * 8]))
    assert words.dtype == torch.int32 and words.shape == (2, 1)
    assert words[0, 0].item() == 0x75316420
    assert words[1, 0].item() == -1  # 0xFFFFFFFF
    with pytest.raises(ValueError, match="multiple of 8"):
        pack_awq_4bit(torch.zeros(2, 12, dtype=torch.int32))
    packing_utils = pytest.importorskip("gptqmodel.quantization.awq.utils.packing_utils")
    if not hasattr(packing_utils, "pack_awq"):
        pytest.skip("this GPTQModel has no pack_awq to compare with")
    codes = torch.randint(0, 16, (96, 64), generator=torch.Generator().manual_seed(0), dtype=torch.int32)
    theirs, _ = packing_utils.pack_awq(codes, codes[:3], 4)
    assert torch.equal(pack_awq_4bit(codes), theirs)


@pytest.mark.parametrize(
    ("codes", "expected"),
    [
        ([[16, 0, 0, 0, 0, 0, 0, 0]], "must lie in 0..15, got 0..16"),  # would have packed as 0
        ([[-1, 0, 0, 0, 0, 0, 0, 0]], "must lie in 0..15, got -1..0"),  # would have packed as 15
        ([[1.7, 0, 0, 0, 0, 0, 0, 0]], "integer codes, got torch.float32"),  # would have packed as 1
        ([0, 1, 2, 3, 4, 5, 6, 7], "2-D tensor"),
        ([[[0] * 8]], "2-D tensor"),
    ],
)
def test_awq_packing_refuses_codes_it_would_cut(codes: Any, expected: str) -> None:
    """A code that is not a 4-bit integer is refused, not cut to its low 4 bits (another weight, silently)."""
    import torch

    from llmopt.backends.hqq import pack_awq_4bit

    with pytest.raises(ValueError, match=re.escape(expected)):
        pack_awq_4bit(torch.tensor(codes))


def test_awq_packing_of_a_transposed_view_is_its_copys() -> None:
    import torch

    from llmopt.backends.hqq import pack_awq_4bit

    codes = torch.randint(0, 16, (16, 24), generator=torch.Generator().manual_seed(1), dtype=torch.int32)
    assert torch.equal(pack_awq_4bit(codes.t()), pack_awq_4bit(codes.t().contiguous()))


# --- options and fast checks ---------------------------------------------------------------------------


def test_defaults_are_hqqs() -> None:
    opts = HQQBackend().parse_options({})
    assert isinstance(opts, HQQOptions)
    assert (opts.bits, opts.group_size, opts.iterations, opts.lp_norm, opts.beta) == (4, 64, 20, 0.7, 10.0)
    assert opts.dtype == "float16"


def test_needs_no_calibration() -> None:
    backend = HQQBackend()
    assert backend.wants_calibration(backend.parse_options({})) is False


@pytest.mark.parametrize(
    ("raw", "expected"),
    [
        ({"desc_act": True}, "'desc_act' is not an option of hqq"),  # GPTQ's
        ({"zero_point": False}, "'zero_point' is not an option of hqq"),  # AWQ's: always on here
        ({"quant_type": "q4_k_m"}, "'quant_type' is not an option of hqq"),  # GGUF's
        ({"bits": 8}, "bits"),
        ({"lp_norm": 1.5}, "lp_norm"),
        ({"iterations": 0}, "iterations"),
        ({"beta": float("inf")}, "beta"),
    ],
)
def test_bad_options_are_refused(raw: dict[str, Any], expected: str) -> None:
    with pytest.raises(OptionsError) as exc:
        HQQBackend().parse_options(raw)
    assert expected in str(exc.value) and exc.value.exit_code == EXIT_INPUT


def test_group_size_that_does_not_divide_names_the_layer(tmp_path: Path) -> None:
    backend = HQQBackend()
    with pytest.raises(OptionsError) as exc:
        backend.validate(backend.parse_options({"group_size": 128}), source(tmp_path), "cpu")
    assert "does not divide the input width 576 of q_proj" in str(exc.value)


def test_group_size_no_kernel_takes_is_refused(tmp_path: Path) -> None:
    backend = HQQBackend()
    with pytest.raises(OptionsError, match="group size 48 is not one the AWQ GEMM container's kernels take"):
        backend.validate(backend.parse_options({"group_size": 48}), source(tmp_path), "cpu")


def test_missing_hqq_names_the_install_command(monkeypatch: pytest.MonkeyPatch) -> None:
    real = Requirement.present
    monkeypatch.setattr(Requirement, "present", lambda self: self.module != "hqq" and real(self))
    with pytest.raises(BackendUnavailableError) as exc:
        get_backend("hqq")
    assert "missing Python package 'hqq': pip install 'llmopt[hqq]'  (or: pip install hqq)" in str(exc.value)
    assert exc.value.exit_code == EXIT_UNAVAILABLE


def test_format_card_says_how_to_serve_it() -> None:
    backend = describe_backend("hqq")
    card = format_card("hqq", backend.format, {"bits": 4, "group_size": 64}, "org/x")
    assert (card.format, card.library_name, card.bits, card.bit_width) == ("awq", "transformers", 4, "4-bit")
    assert card.tags == ["awq", "hqq"]
    vllm = [s for s in card.load if s.language == "bash"]
    assert vllm and vllm[0].code == "vllm serve org/x" and "AWQ-Marlin" in vllm[0].intro


def test_model_card_of_an_hqq_artifact(tmp_path: Path) -> None:
    """Published like the others: base_model_relation quantized, the tags, and how to serve it."""
    pytest.importorskip("huggingface_hub")
    import yaml

    from llmopt.artifact import Artifact
    from llmopt.model_card import render_card
    from tests.test_publish import make_artifact

    art = make_artifact(tmp_path, fmt="awq", backend="hqq", options={"bits": 4, "group_size": 64})
    card = render_card(Artifact.open(art), "org/smol-hqq", base_model="HuggingFaceTB/SmolLM2-135M-Instruct")
    front = yaml.safe_load(card.split("---")[1])
    assert front["base_model_relation"] == "quantized"
    assert front["base_model"] == "HuggingFaceTB/SmolLM2-135M-Instruct"
    assert {"awq", "hqq", "4-bit", "quantized"} <= set(front["tags"])
    assert "vllm serve org/smol-hqq" in card and "pip install gptqmodel optimum" in card


def test_a_recipe_of_hqq_alone_needs_no_calibration_section() -> None:
    """`llmopt run`: an hqq variant plans without calibration text; an option of another method is refused there too."""
    from llmopt.errors import RecipeError
    from llmopt.recipe import parse_recipe

    recipe = {
        "name": "hqq-only",
        "model": {"source": "m"},
        "evaluation": {"dataset": "eval.txt"},
        "variants": [{"name": "hqq4", "method": "hqq", "options": {"group_size": 64}}],
    }
    parsed = parse_recipe(recipe)
    assert parsed.variants[0].needs_calibration() is False
    recipe["variants"] = [{"name": "hqq4", "method": "hqq", "options": {"damp_percent": 0.1}}]
    with pytest.raises(RecipeError, match="'damp_percent' is not an option of hqq"):
        parse_recipe(recipe)


# --- through the CLI -------------------------------------------------------------------------------------


def test_cli_option_of_another_method_exits_2(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    code, err = run_cli(
        ["quantize", str(fake_model(tmp_path / "m")), "-m", "hqq", "--desc-act", "-o", str(tmp_path / "o")], capsys
    )
    assert code == EXIT_INPUT
    assert err.startswith("error: ") and "Traceback" not in err
    assert "'desc_act' is not an option of hqq" in err and "valid options of hqq" in err
    assert not (tmp_path / "o").exists()


def test_cli_missing_hqq_exits_4(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    real = Requirement.present
    monkeypatch.setattr(Requirement, "present", lambda self: self.module != "hqq" and real(self))
    code, err = run_cli(["quantize", str(fake_model(tmp_path / "m")), "-m", "hqq", "-o", str(tmp_path / "o")], capsys)
    assert code == EXIT_UNAVAILABLE, err
    assert "pip install 'llmopt[hqq]'" in err and "Traceback" not in err
    assert not (tmp_path / "o").exists()


# --- e2e on SmolLM2-135M cut to 2 layers -----------------------------------------------------------------------


@pytest.mark.e2e
def test_hqq_on_the_first_two_layers_through_the_cli(
    assets: dict[str, Path], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """No calibration: quantize (seconds), then eval against its FP16 through the CLI, and reload the artifact."""
    pytest.importorskip("hqq")
    model = first_layers(assets["model"], tmp_path / "smollm2-2l", 2)
    out = tmp_path / "hqq"
    report_path = tmp_path / "eval.json"
    code, err = run_cli(["quantize", str(model), "-m", "hqq", "--device", "cpu", "-o", str(out)], capsys)
    assert code == 0, err
    qcfg = json.loads((out / "config.json").read_text())["quantization_config"]
    assert qcfg == {
        "quant_method": "awq",
        "bits": 4,
        "group_size": 64,
        "zero_point": True,
        "version": "gemm",
        "modules_to_not_convert": None,
    }
    manifest = json.loads((out / "llmopt.json").read_text())
    assert (manifest["backend"], manifest["format"], manifest["runner"]) == ("hqq", "awq", "gptqmodel")
    assert manifest["calibration"] is None
    resolved = manifest["options"]["_resolved"]
    assert resolved["quantized_layers"] == 14
    assert resolved["mean_abs_error"] < resolved["rtn_mean_abs_error"]
    assert "hqq" in manifest["environment"]["packages"]
    code, err = run_cli(
        ["eval", str(out), "--baseline", str(model), "--dataset", str(assets["eval_text"]), "--context", "256",
         "--max-tokens", "1024", "--device", "cpu", "--json-file", str(report_path)],
        capsys,
    )  # fmt: skip
    assert code == 0, err
    report = json.loads(report_path.read_text())
    ppl, base = report["artifact"]["perplexity"], report["baseline"]["perplexity"]
    # A 2-layer cut scores ~2e7: only the distance to its own FP16 means something.
    assert math.isfinite(ppl) and 0.8 * base < ppl < 1.3 * base, (ppl, base)
    assert report["artifact"]["size_bytes"] < report["baseline"]["size_bytes"]
    assert report["artifact"]["kernel"] == "dense float32 (dequantized 14 awq_torch layers)"
    # reloads through GPTQModel's own AWQ kernel, which computes what the dense scoring computed
    dense_matches_the_kernel(out)
