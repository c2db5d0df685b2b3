"""Throughput: the engine's arithmetic and plumbing on CPU with tiny random models; GPU paths behind a marker.

No test here asserts a speed: speed is proven by benchmarks/bench_gpu.py and docs/BENCHMARKS.md. What is
checked is that the static-cache decoder computes what ``generate()`` computes, that the report has the
fields the gate and the tables read, and that bad options fail before any model loads.
"""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path
from typing import Any, ClassVar

import pytest

from llmopt.cli import main
from llmopt.errors import EXIT_INPUT, InputError
from llmopt.evaluate.gate import GateSpec, apply_gate
from llmopt.evaluate.throughput import (
    ThroughputSettings,
    compare,
    parse_int_list,
    throughput_section,
)
from llmopt.stats import cost_per_million_tokens, percentile, summary
from tests.evaldata import scored
from tests.helpers import random_models

ROOT = Path(__file__).resolve().parents[1]
needs_torch = pytest.mark.skipif(
    importlib.util.find_spec("torch") is None or importlib.util.find_spec("transformers") is None,
    reason="needs torch + transformers (pip install -e '.[all,test]')",
)
TINY = ThroughputSettings(batch_sizes=[1, 2], prompt_lens=[8, 12], gen_len=4, warmup=0, repetitions=2)


def tiny_model(device: str = "cpu", **overrides: Any) -> Any:
    import torch

    rm = random_models()
    model = rm.build_fp16(rm.llama_config("tiny", **overrides), device)
    return model.to(torch.float32)


@pytest.fixture(scope="module")
def tiny_folder(tmp_path_factory: pytest.TempPathFactory) -> Path:
    if importlib.util.find_spec("torch") is None:
        pytest.skip("needs torch")
    folder = tmp_path_factory.mktemp("tiny") / "model"
    random_models().save_fp16(tiny_model(), folder)
    return folder


def run_cli(args: list[str], capsys: pytest.CaptureFixture[str]) -> tuple[int, str, str]:
    with pytest.raises(SystemExit) as exc:
        main(args)
    out, err = capsys.readouterr()
    return (exc.value.code if isinstance(exc.value.code, int) else 1), out, err


# --- arithmetic ---------------------------------------------------------------------------------


def test_summary_is_median_with_spread() -> None:
    s = summary([4.0, 1.0, 3.0, 2.0, 100.0])
    assert s == {"median": 3.0, "min": 1.0, "max": 100.0, "q1": 2.0, "q3": 4.0, "n": 5}
    assert summary([7.0])["median"] == 7.0 and summary([7.0])["q3"] == 7.0


def test_percentiles_interpolate_like_numpy() -> None:
    values = [float(v) for v in range(1, 101)]
    assert percentile(values, 50) == pytest.approx(50.5)
    assert percentile(values, 99) == pytest.approx(99.01)
    assert percentile([2.0], 95) == 2.0


def test_cost_per_million_tokens() -> None:
    # $3.60/h at 1000 tok/s: 3.6M tokens an hour, so $1 per million.
    assert cost_per_million_tokens(1000.0, 3.6) == pytest.approx(1.0)
    assert cost_per_million_tokens(None, 3.6) is None and cost_per_million_tokens(10.0, None) is None


def test_int_lists_and_settings_validate() -> None:
    assert parse_int_list("1, 8,32", "--batch-sizes") == [1, 8, 32]
    assert parse_int_list(None, "--batch-sizes") is None
    for bad in ("1,x", "0,8", ""):
        with pytest.raises(InputError):
            parse_int_list(bad, "--batch-sizes")
    assert ThroughputSettings(batch_sizes=[32, 1, 8, 8]).batch_sizes == [1, 8, 32]
    with pytest.raises(ValueError):
        ThroughputSettings(prompt_lens=[0])
    with pytest.raises(ValueError):
        ThroughputSettings(decode_mode="fast")


def test_defaults_depend_on_the_device() -> None:
    gpu, cpu = ThroughputSettings().resolved("cuda:0"), ThroughputSettings().resolved("cpu")
    assert gpu.batch_sizes == [1, 8, 32] and gpu.prompt_lens == [128, 512, 2048] and gpu.gen_len == 128
    assert cpu.batch_sizes and max(cpu.batch_sizes) <= 4 and cpu.context_len == 32
    assert ThroughputSettings(gen_len=7).resolved("cuda:0").gen_len == 7


def _fake_result(rate: dict[str, float], prefill: dict[str, float]) -> dict[str, Any]:
    return {
        "decode": {b: {"tokens_per_s": {"median": v}} for b, v in rate.items()},
        "prefill": {p: {"tokens_per_s": {"median": v}} for p, v in prefill.items()},
        "ttft_ms": 10.0,
        "peak_memory_bytes": 100,
        "size_bytes": 50,
    }


def test_compare_and_gate_read_decode_speedup() -> None:
    base = _fake_result({"1": 100.0, "8": 600.0}, {"128": 1000.0})
    art = _fake_result({"1": 280.0, "8": 900.0}, {"128": 800.0})
    section = throughput_section(base, art, ThroughputSettings(), "cpu")
    assert section["decode_speedup"] == {"1": pytest.approx(2.8), "8": pytest.approx(1.5)}
    assert section["prefill_speedup"]["128"] == pytest.approx(0.8)
    assert section["settings"]["batch_sizes"] == [1, 4]  # resolved for the device
    report = {**scored(1.0), "throughput": section}
    assert apply_gate(GateSpec(min_decode_speedup=2.5, at_batch=1), report).passed
    failed = apply_gate(GateSpec(min_decode_speedup=2.0, at_batch=8), report)
    assert not failed.passed and "1.50x at batch 8" in failed.checks[0].message
    missing = apply_gate(GateSpec(min_decode_speedup=1.0, at_batch=32), report)
    assert not missing.passed and "not measured" in missing.checks[0].message
    # A failed point has no median: no speedup, never a crash.
    art["decode"]["8"] = {"error": "OutOfMemoryError: ..."}
    assert compare(base, art, ThroughputSettings())["decode_speedup"]["8"] is None


# --- CLI input errors (no model is loaded) ----------------------------------------------------


def test_speed_gate_needs_throughput(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    args = ["eval", str(tmp_path), "--baseline", str(tmp_path), "--dataset", "x.txt"]
    code, _, err = run_cli([*args, "--min-decode-speedup", "2"], capsys)
    assert code == EXIT_INPUT and "--throughput" in err
    code, _, err = run_cli([*args, "--batch-sizes", "1,8"], capsys)
    assert code == EXIT_INPUT and "only apply to throughput" in err
    code, _, err = run_cli([*args, "--no-marlin-atomics"], capsys)
    assert code == EXIT_INPUT and "--no-marlin-atomics only apply to throughput" in err and "--throughput" in err
    code, _, err = run_cli([*args, "--throughput", "--batch-sizes", "8", "--min-decode-speedup", "2"], capsys)
    assert code == EXIT_INPUT and "--at-batch 1 is not among" in err
    code, _, err = run_cli([*args, "--throughput", "--batch-sizes", "1,zero"], capsys)
    assert code == EXIT_INPUT and "comma-separated" in err


def test_bench_bad_options(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    code, _, err = run_cli(["bench", str(tmp_path), "--decode-mode", "fastest"], capsys)
    assert code == EXIT_INPUT and "--decode-mode" in err
    code, _, err = run_cli(["bench", str(tmp_path / "missing"), "--gen-len", "1"], capsys)
    assert code == EXIT_INPUT and "--gen-len" in err


# --- the engine on CPU ------------------------------------------------------------------------


@needs_torch
def test_static_decoder_decodes_what_generate_does() -> None:
    import torch

    from llmopt.runners.decoder import StaticDecoder

    model = tiny_model()
    prompt = torch.randint(3, 500, (2, 10), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        reference = model.generate(
            prompt, attention_mask=torch.ones_like(prompt), max_new_tokens=9, min_new_tokens=9, do_sample=False
        )[:, 10:]
        decoder = StaticDecoder(model, "cpu", 2, 10 + 9 + 1)
        first = decoder.prefill(prompt)
        decoder.prepare("eager", first, 10)
        tokens = torch.cat([first, decoder.tokens(first, 10, 8)], dim=1)
        # Rewinding replays the same tokens: timed repetitions decode the same thing.
        again = decoder.tokens(first, 10, 8)
    assert torch.equal(tokens, reference)
    assert torch.equal(again, tokens[:, 1:])


@needs_torch
def test_graph_replay_is_checked_against_eager() -> None:
    import torch

    from llmopt.runners.decoder import GraphMismatchError, check_replay

    ref = torch.randn(2, 1000, generator=torch.Generator().manual_seed(3))
    assert check_replay(ref + 1e-3 * torch.randn(2, 1000), ref) is True
    # A graph that lost its matmuls (the quantized GEMMs were dropped) computes something else.
    with pytest.raises(GraphMismatchError, match="differ from eager"):
        check_replay(torch.randn(2, 1000), ref)
    with pytest.raises(GraphMismatchError, match="finite at different places"):
        check_replay(torch.where(ref > 2, torch.inf, ref), ref)
    with pytest.raises(GraphMismatchError, match="shape"):
        check_replay(ref[:1], ref)
    assert check_replay(torch.zeros(2, 1000), torch.full((2, 1000), torch.nan)) is False


@needs_torch
def test_weight_bytes_per_step() -> None:
    from llmopt.runners.engine import weight_bytes_per_step

    untied = tiny_model()
    every = sum(t.numel() * t.element_size() for t in [*untied.parameters(), *untied.buffers()])
    embedding = untied.get_input_embeddings().weight
    assert weight_bytes_per_step(untied) == every - embedding.numel() * embedding.element_size()
    tied = tiny_model(tie_word_embeddings=True)
    tied.tie_weights()
    assert tied.get_output_embeddings().weight.data_ptr() == tied.get_input_embeddings().weight.data_ptr()
    # Tied: the head reads the matrix, once.
    assert weight_bytes_per_step(tied) == sum(
        t.numel() * t.element_size() for t in {t.data_ptr(): t for t in [*tied.parameters(), *tied.buffers()]}.values()
    )


@needs_torch
def test_copy_bandwidth_is_measured_once_and_cached() -> None:
    from llmopt.runners.engine import copy_bandwidth

    first = copy_bandwidth("cpu")
    second = copy_bandwidth("cpu")
    assert first["bytes_per_s"] > 0 and second["cached"] and second["bytes_per_s"] == first["bytes_per_s"]


@needs_torch
def test_measure_model_on_cpu_reports_every_field() -> None:
    from llmopt.runners.engine import measure_model

    result = measure_model(tiny_model(), "cpu", TINY.model_copy(update={"gpu_hourly_cost": 2.0}))
    assert set(result["decode"]) == {"1", "2"} and set(result["prefill"]) == {"8", "12"}
    for point in result["decode"].values():
        assert point["tokens_per_s"]["n"] == 2 and point["tokens_per_s"]["median"] > 0
        assert point["itl_ms"]["p50"] <= point["itl_ms"]["p99"]
        assert point["decode_mode"] == "eager-static"
    assert result["decode_mode"] == "eager-static" and result["decode_mode_note"] is None
    assert result["ttft_ms"] == result["prefill"]["8"]["ttft_ms"]["median"]
    assert result["roofline"]["fraction_at_batch_1"] > 0
    assert result["cost_per_million_tokens"]["1"] > 0
    for point in result["decode"].values():  # where the wall time went, per point
        assert point["repetitions"] == 2 and set(point["seconds"]) == {"prepare", "timed"}
    assert set(result["seconds"]) == {"prefill", "decode"}
    with pytest.raises(InputError, match="needs a CUDA GPU"):
        measure_model(tiny_model(), "cpu", TINY.model_copy(update={"decode_mode": "graph"}))


@needs_torch
def test_bench_cli_with_baseline_and_attention(tiny_folder: Path, capsys: pytest.CaptureFixture[str]) -> None:
    args = ["bench", str(tiny_folder), "--baseline", str(tiny_folder), "--attn", "eager,sdpa,flash_attention_2"]
    args += ["--batch-sizes", "1", "--prompt-lens", "8", "--gen-len", "3", "--repetitions", "1", "--warmup", "0"]
    code, out, _ = run_cli([*args, "--device", "cpu", "--json", "-"], capsys)
    assert code == 0
    result = json.loads(out)
    runs = {r["attn_implementation"]: r for r in result["runs"]}
    assert {"eager", "sdpa"} <= set(runs)
    if importlib.util.find_spec("flash_attn") is None:
        assert result["skipped_attention"] == {"flash_attention_2": "not installed here"}
    for run in runs.values():
        assert run["model"]["attn_implementation"] == run["attn_implementation"]
        assert run["decode_speedup"]["1"] > 0 and run["model"]["size_bytes"] == run["baseline"]["size_bytes"]


@needs_torch
def test_eval_with_throughput_feeds_the_gate(
    tiny_folder: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    from llmopt.api import quantize

    if importlib.util.find_spec("bitsandbytes") is None:
        pytest.skip("needs bitsandbytes")
    artifact = quantize(str(tiny_folder), "bnb-int8", tmp_path / "int8", device="cpu")
    text = tmp_path / "text.txt"
    text.write_text(" ".join(f"w{i % 400 + 3}" for i in range(200)))
    args = ["eval", str(artifact.path), "--baseline", str(tiny_folder), "--dataset", str(text), "--context", "32"]
    args += ["--throughput", "--batch-sizes", "1", "--prompt-lens", "8", "--gen-len", "3", "--repetitions", "1"]
    args += ["--warmup", "0", "--device", "cpu", "--no-cache"]
    code, out, _ = run_cli([*args, "--min-decode-speedup", "1000", "--json", "-"], capsys)
    report = json.loads(out)
    section = report["throughput"]
    assert section["schema"] == "llmopt.throughput/1"
    assert section["artifact"]["decode_mode"] == "eager-static"
    assert section["decode_speedup"]["1"] > 0
    assert code == 3  # a 1000x speedup is not there: the gate fails with exit code 3
    assert report["gate"]["checks"][0]["name"] == "min_decode_speedup"
    # The human-readable table renders too.
    code, out, _ = run_cli([*args, "--min-decode-speedup", "0.0001"], capsys)
    assert code == 0 and "decode tok/s b1" in out and "gate pass" in out


# --- GPU (run on the GPU machine: pytest -m gpu tests/test_throughput.py) ------------------------


@needs_torch
@pytest.mark.skipif(importlib.util.find_spec("gptqmodel") is None, reason="needs gptqmodel")
@pytest.mark.parametrize("method", ["gptq", "awq"])
def test_random_quantized_checkpoints_load_and_run(method: str, tmp_path: Path) -> None:
    """The benchmark's random-weight checkpoints are in the layouts GPTQModel loads (and the runner measures)."""
    import torch

    from llmopt.runners.hf import HFRunner

    rm = random_models()
    model = rm.build_fp16(rm.llama_config("tiny"), "cpu")
    writer = rm.write_random_gptq if method == "gptq" else rm.write_random_awq
    folder = writer(model, tmp_path / method, group_size=128)
    qcfg = json.loads((folder / "config.json").read_text())["quantization_config"]
    assert qcfg["quant_method"] == method and qcfg["bits"] == 4 and qcfg["group_size"] == 128
    # On CPU GPTQ is scored as its dequantized weights in float32 (no kernel named), AWQ asked through awq_torch.
    runner = HFRunner(folder, "cpu", loader="gptqmodel", kernel=None if method == "gptq" else "torch")
    try:
        dense = "dense float32 (dequantized 14 gptq_torch layers)"
        assert runner.kernel == (dense if method == "gptq" else "awq_torch")
        with torch.no_grad():
            logits = runner.model(input_ids=torch.tensor([[1, 5, 9, 3]])).logits
        assert logits.shape == (1, 4, 512) and bool(torch.isfinite(logits).all())
        assert (runner.model.model.layers[0].self_attn.q_proj.__class__.__name__ == "Linear") == (method == "gptq")
    finally:
        runner.close()


@pytest.mark.gpu
@pytest.mark.parametrize("mode", ["graph", "compile"])
def test_graphed_decoding_matches_eager_on_gpu(mode: str) -> None:
    import torch

    from llmopt.runners.decoder import StaticDecoder

    model = tiny_model("cuda:0")
    prompt = torch.randint(3, 500, (2, 10), device="cuda:0", generator=torch.Generator("cuda:0").manual_seed(2))
    with torch.no_grad():
        eager = StaticDecoder(model, "cuda:0", 2, 32)
        first = eager.prefill(prompt)
        eager.prepare("eager", first, 10)
        expected = eager.tokens(first, 10, 12)
        graphed = StaticDecoder(model, "cuda:0", 2, 32)
        assert torch.equal(graphed.prefill(prompt), first)
        graphed.prepare(mode, first, 10)
        assert graphed.verified is True
        assert torch.equal(graphed.tokens(first, 10, 12), expected)
        assert all(t > 0 for t in graphed.run(first, 10, 12))


@pytest.mark.gpu
def test_measure_model_on_gpu_uses_a_compiled_graph() -> None:
    from llmopt.runners.engine import measure_model

    result = measure_model(tiny_model("cuda:0").half(), "cuda:0", TINY)
    assert result["decode_mode"] == "compile+cudagraph", result.get("decode_mode_note")
    assert result["peak_memory_bytes"] > 0 and result["roofline"]["copy_bandwidth_bytes_per_s"] > 1e11


# --- GPTQ-Marlin atomicAdd reduction (speed only) -----------------------------------------------


def test_marlin_atomic_shapes_are_the_kv_projections_of_an_8b_llama() -> None:
    from llmopt.runners.marlin import atomic_reduce_shape

    # (in, out) of q, k, v, o, gate, up, down of the 8B shape: only k/v (4096 -> 1024) qualify.
    shapes = {"q": (4096, 4096), "k": (4096, 1024), "v": (4096, 1024), "o": (4096, 4096)}
    shapes |= {"gate": (4096, 14336), "up": (4096, 14336), "down": (14336, 4096)}
    assert [n for n, (i, o) in shapes.items() if atomic_reduce_shape(i, o)] == ["k", "v"]
    # A 1B shape (hidden 2048, GQA 32/4): k/v are 2048 -> 256.
    assert atomic_reduce_shape(2048, 256) and not atomic_reduce_shape(2048, 2048)


@needs_torch
@pytest.mark.skipif(importlib.util.find_spec("gptqmodel") is None, reason="needs gptqmodel")
def test_marlin_atomics_switch_narrow_layers_and_restore_them(monkeypatch: pytest.MonkeyPatch) -> None:
    """GPTQModel's own MarlinLinear class (built without CUDA: its constructor needs the kernel) is switched
    to use_atomics=True inside the block, only where the shape qualifies, and gets its forward back."""
    import gptqmodel.utils.marlin as gm
    import torch
    from gptqmodel.nn_modules.qlinear.marlin import MarlinLinear

    from llmopt.runners.marlin import marlin_atomic_reduce

    def layer(k: int, n: int) -> Any:
        m = MarlinLinear.__new__(MarlinLinear)
        torch.nn.Module.__init__(m)
        m.in_features, m.out_features = k, n
        m.scales = torch.zeros(1, dtype=torch.float16)
        m._marlin_tile_padding, m.adapter, m.fp32, m.bias = None, None, True, None
        for name in ("qweight", "qzeros", "g_idx", "g_idx_sort_indices", "workspace", "weight_type", "is_k_full"):
            setattr(m, name, name)
        return m

    calls: list[dict[str, Any]] = []

    def fake_apply(**kwargs: Any) -> str:
        calls.append(kwargs)
        return "atomic"

    monkeypatch.setattr(gm, "apply_gptq_marlin_linear", fake_apply)
    model = torch.nn.ModuleDict({"k": layer(4096, 1024), "q": layer(4096, 4096), "plain": torch.nn.Linear(4, 4)})
    x = torch.zeros(1, 4096, dtype=torch.float16)
    with marlin_atomic_reduce(model, enabled=False) as switched:
        assert switched == 0 and "forward" not in vars(model["k"])
    with marlin_atomic_reduce(model) as switched:
        assert switched == 1
        assert "forward" in vars(model["k"]) and "forward" not in vars(model["q"])
        assert model["k"](x) == "atomic"
    assert calls[0]["use_atomics"] is True and calls[0]["output_size_per_partition"] == 1024
    assert calls[0]["use_fp32_reduce"] is True and calls[0]["input"] is x
    assert "forward" not in vars(model["k"])  # GPTQModel's own forward again


def test_marlin_atomics_option(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    from llmopt.cli.bench import throughput_settings

    on = throughput_settings(True, "1", "8", 4, 0, 1, "auto", None)
    off = throughput_settings(True, "1", "8", 4, 0, 1, "auto", None, marlin_atomics=False)
    assert on is not None and on.marlin_atomics and off is not None and not off.marlin_atomics
    code, out, _ = run_cli(["bench", "--help"], capsys)
    assert code == 0 and "--no-marlin-atomics" in out


@needs_torch
@pytest.mark.skipif(importlib.util.find_spec("gptqmodel") is None, reason="needs gptqmodel")
def test_cpu_scoring_goes_dense_but_timing_keeps_the_kernel(tmp_path: Path) -> None:
    """On CPU an AWQ artifact is scored as dense float32 weights; a speed measurement loads its real kernel."""
    import torch

    from llmopt.runners import load_runner

    rm = random_models()
    model = rm.build_fp16(rm.llama_config("tiny"), "cpu")
    folder = rm.write_random_awq(model, tmp_path / "awq", group_size=128)
    scored = load_runner("gptqmodel", folder, "cpu")
    timed = load_runner("gptqmodel", folder, "cpu", for_speed=True)
    try:
        assert scored.dtype == "float32" and str(scored.kernel).startswith("dense float32 (dequantized ")  # type: ignore[attr-defined]
        assert timed.dtype == "float16" and not str(timed.kernel).startswith("dense")  # type: ignore[attr-defined]
        layer = timed.model.model.layers[0].self_attn.q_proj  # type: ignore[attr-defined]
        assert type(layer).__name__ != "Linear"
        assert type(scored.model.model.layers[0].self_attn.q_proj) is torch.nn.Linear  # type: ignore[attr-defined]
    finally:
        scored.close()
        timed.close()


def test_bench_table_names_rows_readably(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """The bench table cut a long model path to '/ro…/pe…': rows are named by the folder's own name (an artifact's
    with its method), whole, however many columns the table has."""
    from llmopt.cli.bench import model_label, render_bench

    deep = tmp_path / "runs" / "2026-12-01" / "experiments" / "peft-merged-llama-8b-instruct"
    deep.mkdir(parents=True)
    art = tmp_path / "artifacts" / "int8"
    art.mkdir(parents=True)
    (art / "llmopt.json").write_text(json.dumps({"backend": "bnb-int8"}))
    assert model_label(str(deep)) == "peft-merged-llama-8b-instruct"
    assert model_label(str(art)) == "int8 (bnb-int8)"
    assert model_label("HuggingFaceTB/SmolLM2-135M") == "HuggingFaceTB/SmolLM2-135M"
    point = {"tokens_per_s": {"median": 10.0, "min": 9.0, "max": 11.0}, "itl_ms": {"p50": 1.0, "p99": 2.0}}
    speed = {
        "decode": {b: point for b in ("1", "8", "32")},
        "prefill": {p: {"tokens_per_s": {"median": 100.0}} for p in ("128", "512", "2048")},
        "ttft_ms": 3.0,
        "decode_mode": "compile+cudagraph",
    }
    render_bench(
        {
            "model": str(deep),
            "baseline": str(art),
            "device": "cpu",
            "settings": {"prompt_lens": [128], "gen_len": 16, "repetitions": 1},
            "runs": [{"attn_implementation": "sdpa", "model": speed, "baseline": speed}],
        }
    )
    out = capsys.readouterr().out
    assert "peft-merged-llama-8b-instruct" in out
    assert "baseline: int8 (bnb-int8)" in out


def test_one_time_marlin_build_is_announced(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The first GPTQ/AWQ speed measurement on a GPU compiled GPTQModel's Marlin kernels for ~170 s without a
    word; the run now says so, and where they are kept, only while that cache is empty."""
    from llmopt.evaluate.throughput import one_time_build_notice

    root = tmp_path / "marlin"
    monkeypatch.setenv("GPTQMODEL_MARLIN_FP16_BUILD_ROOT", str(root))
    notice = one_time_build_notice("gptqmodel", "cuda:0", None)
    assert notice is not None and "builds its Marlin kernels once" in notice and str(root) in notice
    assert one_time_build_notice("gptqmodel", "cpu", None) is None
    assert one_time_build_notice("hf", "cuda:0", None) is None
    assert one_time_build_notice("gptqmodel", "cuda:0", "exllama_v2") is None
    (root / "build-x").mkdir(parents=True)
    (root / "build-x" / "gptqmodel_marlin_fp16_ops.so").write_bytes(b"\0")
    assert one_time_build_notice("gptqmodel", "cuda:0", None) is None


def test_int8_outlier_layers_are_measured_eagerly_without_a_doomed_capture() -> None:
    """bitsandbytes LLM.int8() with an outlier threshold cannot be captured (data-dependent shapes, a host sync);
    on an H200 the compile + capture attempt cost ~80 s of every int8 measurement before falling back to eager."""
    pytest.importorskip("bitsandbytes")
    import bitsandbytes as bnb
    import torch

    from llmopt.runners.decoder import has_int8_outlier_path

    assert has_int8_outlier_path(torch.nn.Sequential(bnb.nn.Linear8bitLt(8, 8, has_fp16_weights=False, threshold=6.0)))
    assert not has_int8_outlier_path(
        torch.nn.Sequential(bnb.nn.Linear8bitLt(8, 8, has_fp16_weights=False, threshold=0.0))
    )
    assert not has_int8_outlier_path(torch.nn.Sequential(torch.nn.Linear(8, 8)))


class _SlowDecoder:
    """Stands in for StaticDecoder.run: each run takes ``seconds`` of wall time (counted, not slept)."""

    def __init__(self, seconds: float, monkeypatch: pytest.MonkeyPatch, full: int = 4) -> None:
        import llmopt.runners.engine as engine

        self.runs = 0
        self.lengths: list[int] = []
        self.clock = 0.0
        self.step = seconds / full  # ``seconds`` is a run of ``full`` tokens
        monkeypatch.setattr(engine.time, "perf_counter", lambda: self.clock)

    def run(self, first: Any, position: int, steps: int) -> list[float]:
        self.runs += 1
        self.lengths.append(steps)
        self.clock += self.step * steps
        return [self.step] * steps


@pytest.mark.parametrize(
    ("seconds", "warmup", "reps", "runs", "timed"),
    [
        (0.1, 2, 5, 7, 5),  # fast: the plan as asked
        (12.0, 2, 5, 3, 2),  # an eager int8 step on a GPU: 1 warm-up + 2 (never fewer than 2)
        (6.0, 2, 5, 5, 4),  # 30 s budget / 6 s - 1 = 4 timed after one warm-up
        (12.0, 0, 5, 2, 2),  # no warm-up asked: the first timed run sets the cut
    ],
)
def test_slow_points_are_cut_to_the_time_budget(
    seconds: float, warmup: int, reps: int, runs: int, timed: int, monkeypatch: pytest.MonkeyPatch
) -> None:
    from llmopt.runners.engine import _timed_runs

    dec = _SlowDecoder(seconds, monkeypatch)
    settings = ThroughputSettings(batch_sizes=[1], prompt_lens=[8], gen_len=4, warmup=warmup, repetitions=reps)
    per_step, rates, n = _timed_runs(dec, None, 8, 4, 1, settings)  # type: ignore[arg-type]
    assert (dec.runs, n, len(rates), len(per_step)) == (runs, timed, timed, timed * 4)


@pytest.mark.parametrize(
    ("seconds", "lengths"), [(17.0, [8, 108, 108]), (0.2, [8, 128, 128, 128, 128, 128, 128, 128])]
)
def test_the_first_warm_up_is_a_short_probe_that_prices_a_run(
    seconds: float, lengths: list[int], monkeypatch: pytest.MonkeyPatch
) -> None:
    """An eager int8 point on the H200 (17 s a 128-token run): the old full warm-up cost as much as a timed run,
    and two whole runs would overrun the 30 s budget, so the two timed runs are shortened to fit (108 tokens).
    A fast point keeps its two full warm-ups (after the probe) and five repetitions of the whole length."""
    from llmopt.runners.engine import _timed_runs

    dec = _SlowDecoder(seconds, monkeypatch, full=128)
    settings = ThroughputSettings(batch_sizes=[1], prompt_lens=[8], gen_len=128, warmup=2, repetitions=5)
    per_step, rates, n = _timed_runs(dec, None, 8, 128, 1, settings)  # type: ignore[arg-type]
    assert dec.lengths == lengths
    timed = lengths[-1]
    assert n == len(rates) == (2 if seconds > 1 else 5)
    assert len(per_step) == timed * n
    assert rates == [pytest.approx(128 / seconds)] * n  # the same tokens/s, whatever the run's length
    if seconds > 1:
        assert dec.clock == pytest.approx(17.0 * (8 + 2 * 108) / 128) and dec.clock <= 30  # was 3 x 17 s


@pytest.mark.parametrize(("budget", "timed"), [(10.0, 33), (4.0, 32), (60.0, 128)])
def test_shortened_runs_never_go_below_32_tokens(
    budget: float, timed: int, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A 10 s budget for that int8 point gives runs of 33 tokens; a 4 s one would give ~11: the floor is 32
    (a per-token rate over fewer steps is mostly the first steps). A budget that holds two whole runs keeps them."""
    from llmopt.runners.engine import _timed_runs

    dec = _SlowDecoder(17.0, monkeypatch, full=128)
    settings = ThroughputSettings(
        batch_sizes=[1], prompt_lens=[8], gen_len=128, warmup=2, repetitions=5, max_seconds_per_point=budget
    )
    _, _, n = _timed_runs(dec, None, 8, 128, 1, settings)  # type: ignore[arg-type]
    assert dec.lengths[1:] == [timed] * n and n == (3 if budget == 60.0 else 2)


class _FakeDecoder:
    """StaticDecoder's surface; ``prepare`` fails for the modes in ``failing`` as a failed CUDA-graph capture does."""

    failing: ClassVar[tuple[str, ...]] = ()
    prepared: ClassVar[list[str]] = []

    def __init__(self, model: Any, device: str, batch: int, cache_len: int) -> None:
        self.verified = True

    def prefill(self, prompt: Any) -> Any:
        return prompt[:, -1:]

    def prepare(self, mode: str, first: Any, position: int) -> None:
        type(self).prepared.append(mode)
        if mode in self.failing:
            raise RuntimeError("CUDA error: operation failed due to a previous error during capture")

    def run(self, first: Any, position: int, steps: int) -> list[float]:
        return [1e-3] * steps

    def close(self) -> None:
        pass


def _tiny_llama() -> Any:
    from transformers import LlamaConfig

    return type("M", (), {"config": LlamaConfig(hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                                                num_attention_heads=2, num_key_value_heads=1, vocab_size=64)})()


@pytest.mark.parametrize("asked", ["graph", "compile"])
def test_an_explicit_decode_mode_that_cannot_capture_fails_with_its_cause_not_as_a_bug(
    asked: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """On the H200 a recipe with decode_mode graph lost bnb-int8's speed to 'AcceleratorError ... please report
    it' (exit 1). An explicit mode has nothing to fall back to: say so, and name auto/eager."""
    import llmopt.runners.engine as engine
    from llmopt.errors import BackendUnavailableError

    monkeypatch.setattr(engine, "mode_chain", lambda requested, device: [requested])
    monkeypatch.setattr(engine, "has_int8_outlier_path", lambda model: False)
    monkeypatch.setattr(engine, "reset_compiler", lambda: None)
    monkeypatch.setattr(engine, "teach_compiler_kernels", lambda: None)
    monkeypatch.setattr(_FakeDecoder, "failing", (asked,))
    monkeypatch.setattr(engine, "StaticDecoder", _FakeDecoder)
    settings = ThroughputSettings(batch_sizes=[1], prompt_lens=[8], gen_len=4, decode_mode=asked)
    with pytest.raises(BackendUnavailableError) as err:
        engine.measure_decode(_tiny_llama(), "cpu", settings)
    assert "previous error during capture" in err.value.message
    assert "auto" in (err.value.hint or "") and "eager" in (err.value.hint or "")


def test_int8_with_outliers_is_measured_eagerly_under_an_explicit_graph_mode_and_says_so(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """A recipe's decode mode applies to every variant: bnb-int8 under decode_mode graph is measured eagerly with a
    note naming the asked mode, instead of a doomed capture."""
    import llmopt.runners.engine as engine

    monkeypatch.setattr(engine, "mode_chain", lambda requested, device: [requested])
    monkeypatch.setattr(engine, "has_int8_outlier_path", lambda model: True)
    monkeypatch.setattr(_FakeDecoder, "failing", ("graph",))
    monkeypatch.setattr(_FakeDecoder, "prepared", [])
    monkeypatch.setattr(engine, "StaticDecoder", _FakeDecoder)
    settings = ThroughputSettings(batch_sizes=[1, 2], prompt_lens=[8], gen_len=4, decode_mode="graph")
    result = engine.measure_decode(_tiny_llama(), "cpu", settings)
    assert _FakeDecoder.prepared == ["eager", "eager"]
    assert result["decode_mode"] == "eager-static"
    assert "decode mode graph was asked" in result["decode_mode_note"]
