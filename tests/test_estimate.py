"""`llmopt estimate`: parameter counts, weight / KV-cache memory, GPU fit and cost from config.json."""

from __future__ import annotations

import inspect
import json
import math
import struct
from pathlib import Path
from typing import Any

import pytest

from llmopt import estimate as est
from llmopt.errors import InputError

CONFIGS = Path(__file__).parent / "fixtures" / "configs"
LLAMA = CONFIGS / "llama-3.1-8b.json"
QWEN = CONFIGS / "qwen2.5-7b.json"


def arch_of(path: Path) -> est.Architecture:
    config, source = est.load_config(path)
    return est.architecture_from_config(config, source)


def run_cli(argv: list[str], capsys: pytest.CaptureFixture[str]) -> tuple[int, str, str]:
    from llmopt.cli import main

    with pytest.raises(SystemExit) as exc:
        main(argv)
    out, err = capsys.readouterr()
    code = exc.value.code
    return (code if isinstance(code, int) else 0), out, err


# ---------------------------------------------------------------- published totals


def test_llama_3_1_8b_parameters_and_kv_match_published() -> None:
    a = arch_of(LLAMA)
    p = est.parameter_count(a)
    assert p.total == 8_030_261_248
    assert not p.tied and p.lm_head == p.embedding == 128_256 * 4096
    assert est.kv_bytes_per_token(a, "fp16") == 131_072 == 2 * 32 * 8 * 128 * 2
    assert est.kv_bytes_per_token(a, "fp8") == 65_536
    assert est.kv_cache_bytes(a, batch=3, context=1000, kv_dtype="bf16") == 3 * 1000 * 131_072


def test_qwen2_5_7b_parameters_and_kv_match_published() -> None:
    a = arch_of(QWEN)
    assert a.qkv_bias and not a.o_bias
    assert a.layer_windows == [None] * 28  # sliding_window is in the file, but use_sliding_window is false
    names = {g.name for g in est.tensors(a)}
    assert "model.layers.*.self_attn.q_proj.bias" in names and "model.layers.*.self_attn.o_proj.bias" not in names
    assert est.parameter_count(a).total == 7_615_616_512
    assert est.kv_bytes_per_token(a, "fp16") == 2 * 28 * 4 * 128 * 2 == 57_344


# ---------------------------------------------------------------- weight formats


def _linear_numel_and_groups(a: est.Architecture, group: int) -> tuple[int, int, int]:
    numel = groups = rows_total = 0
    for g in est.tensors(a):
        if g.role == "linear":
            rows, cols = g.shape
            numel += rows * cols * g.count
            groups += rows * math.ceil(cols / group) * g.count
            rows_total += rows * g.count
    return numel, groups, rows_total


def test_weight_bytes_per_format_llama() -> None:
    a = arch_of(LLAMA)
    total = est.parameter_count(a).total
    assert est.weight_bytes(a, "bf16") == est.weight_bytes(a, "fp16") == 2 * total
    assert est.weight_bytes(a, "fp32") == 4 * total
    linear, groups, rows = _linear_numel_and_groups(a, 128)
    rest = total - linear
    # int4 g128: 4-bit values, per group an fp16 scale and a 4-bit zero; embeddings/lm_head/norms fp16
    assert est.weight_bytes(a, "int4", group_size=128) == linear // 2 + groups * 2 + groups // 2 + rest * 2
    # int8: 8-bit values and one fp16 scale per output row
    assert est.weight_bytes(a, "int8") == linear + rows * 2 + rest * 2
    one_d = sum(g.numel for g in est.tensors(a) if len(g.shape) == 1)
    assert est.weight_bytes(a, "gguf-q8_0") == math.ceil((total - one_d) * 8.5 / 8) + one_d * 4
    assert est.weight_bytes(a, "q4_0") == math.ceil((total - one_d) * 4.5 / 8) + one_d * 4
    m = est.weight_memory(a, "gguf-q4_k_m")
    assert not m.exact and 4.8 < m.bits_per_weight < 4.9


def test_unknown_weight_format_names_valid_ones() -> None:
    with pytest.raises(InputError, match="unknown weight format 'int5'") as exc:
        est.weight_bytes(arch_of(LLAMA), "int5")
    assert "int4" in (exc.value.hint or "")


# ---------------------------------------------------------------- every family against transformers


FAMILIES: list[tuple[str, dict[str, Any]]] = [
    ("llama", {}),
    ("llama", {"attention_bias": True, "mlp_bias": True}),
    ("mistral", {}),
    ("qwen2", {}),
    ("qwen3", {"head_dim": 24}),
    ("qwen3", {"head_dim": 24, "attention_bias": True}),
    ("gemma", {"head_dim": 32}),
    ("gemma2", {"head_dim": 32}),
    ("phi3", {"pad_token_id": 0}),
]


@pytest.mark.parametrize("tied", [False, True])
@pytest.mark.parametrize(("model_type", "extra"), FAMILIES)
def test_family_tensors_match_transformers(model_type: str, extra: dict[str, Any], tied: bool) -> None:
    """Build each family on the meta device (no memory, no download) and compare every tensor."""
    torch = pytest.importorskip("torch")
    transformers = pytest.importorskip("transformers")
    config = transformers.AutoConfig.for_model(
        model_type, vocab_size=1000, hidden_size=64, intermediate_size=96, num_hidden_layers=3,
        num_attention_heads=4, num_key_value_heads=2, tie_word_embeddings=tied, **extra,
    )  # fmt: skip
    with torch.device("meta"):
        model = transformers.AutoModelForCausalLM.from_config(config)
    real = {name: tuple(p.shape) for name, p in model.named_parameters()}
    a = est.architecture_from_config(config.to_dict())
    expected: dict[str, tuple[int, ...]] = {}
    for g in est.tensors(a):
        for i in range(g.count):
            expected[g.name.replace("*", str(i))] = g.shape
    assert expected == real
    assert est.parameter_count(a).total == sum(p.numel() for p in model.parameters())


def test_sliding_window_layers_cap_the_kv_cache() -> None:
    config = {
        "model_type": "gemma2", "vocab_size": 1000, "hidden_size": 64, "intermediate_size": 96,
        "num_hidden_layers": 4, "num_attention_heads": 4, "num_key_value_heads": 2, "head_dim": 16,
        "sliding_window": 100,
    }  # fmt: skip
    a = est.architecture_from_config(config)
    assert a.layer_windows == [100, None, 100, None]
    per_layer_token = 2 * 2 * 16 * 2
    assert est.kv_cache_bytes(a, batch=1, context=50) == 4 * 50 * per_layer_token
    assert est.kv_cache_bytes(a, batch=1, context=1000) == (2 * 1000 + 2 * 100) * per_layer_token


# ---------------------------------------------------------------- GPU fit and cost


def test_plan_h100_llama_bf16() -> None:
    e = est.estimate(LLAMA, gpu="H100-80GB", context=8192, batch=1, gpu_hourly_cost=2.0)
    w = 2 * 8_030_261_248
    assert e.plan_format == "bf16" and e.plan_weight_bytes == w  # from the config's torch_dtype
    kv_seq = 8192 * 131_072
    usable = 0.9 * 80 * 2**30
    tp1 = e.tensor_parallel[0]
    assert tp1.fits and tp1.max_batch == math.floor((usable - w) / kv_seq)
    tp8 = e.tensor_parallel[3]
    assert tp8.kv_bytes_per_sequence_per_gpu == kv_seq // 8  # 8 KV heads over 8 GPUs: one each
    assert e.min_gpus == 1
    ceiling = 3.35e12 / (w + kv_seq)
    assert e.decode_ceiling_batch1_tokens_per_s == pytest.approx(ceiling)
    assert e.cost is not None and e.cost.source == "bandwidth-ceiling"
    assert e.cost.usd_per_million_tokens == pytest.approx(2.0 / (ceiling * 3600) * 1e6)


def test_plan_needs_several_gpus_or_none() -> None:
    e = est.estimate(LLAMA, gpu="T4", context=4096, weights="fp16")  # 16 GB of weights on 16 GiB cards
    assert [f.fits for f in e.tensor_parallel] == [False, True, True, True]
    assert e.min_gpus == 2
    e = est.estimate(LLAMA, gpu="T4", context=131072, batch=64, weights="fp32")
    assert e.min_gpus is None and e.cost is None and any("do not fit" in n for n in e.notes)


def test_kv_heads_replicated_when_more_gpus_than_kv_heads() -> None:
    a = arch_of(QWEN)  # 4 KV heads, 28 attention heads
    fits = est.tensor_parallel_fits(
        a, weight_bytes_total=10**9, gpu=est.find_gpu("H200", est.load_gpu_catalog()), context=1024, batch=1,
        kv_dtype="fp16",
    )  # fmt: skip
    by_tp = {f.tp: f for f in fits}
    kv_seq = 1024 * 57_344
    assert by_tp[4].kv_bytes_per_sequence_per_gpu == kv_seq // 4
    assert not by_tp[8].valid  # 28 attention heads do not split over 8 GPUs


def _decode(rates: dict[int, float]) -> dict[str, Any]:
    return {str(b): {"tokens_per_s": {"median": r, "min": r * 0.9}} for b, r in rates.items()}


def test_cost_from_measured_throughput(tmp_path: Path) -> None:
    # what `llmopt eval --throughput --json` writes: the artifact's decode speed per batch
    report = tmp_path / "eval.json"
    report.write_text(json.dumps({"schema": "llmopt.eval/1", "throughput": {
        "schema": "llmopt.throughput/1", "device": "NVIDIA H100 80GB HBM3",
        "baseline": {"decode": _decode({1: 60.0, 8: 400.0})},
        "artifact": {"decode": _decode({1: 120.0, 8: 800.0})}}}))  # fmt: skip
    e = est.estimate(QWEN, gpu="H100", batch=8, gpu_hourly_cost=3.6, report=report)
    assert e.cost is not None and e.cost.source == "measured" and e.cost.tokens_per_s == 800.0
    assert e.cost.usd_per_million_tokens == pytest.approx(3.6 / (800 * 3600) * 1e6)
    assert "NVIDIA H100" in e.cost.source_detail and not e.notes

    # what `llmopt bench --json` writes; measured on another device: said so
    bench = tmp_path / "bench.json"
    bench.write_text(json.dumps({"schema": "llmopt.throughput/1", "device": "cpu (x86_64)",
                                 "runs": [{"model": {"decode": _decode({1: 50.0})}}]}))  # fmt: skip
    e = est.estimate(QWEN, gpu="H100", batch=1, gpu_hourly_cost=1.0, report=bench)
    assert e.cost is not None and e.cost.source == "measured" and e.cost.tokens_per_s == 50.0
    assert any("measured on cpu (x86_64), not on a H100-80GB" in n for n in e.notes)

    e = est.estimate(QWEN, gpu="H100", batch=4, gpu_hourly_cost=1.0, report=bench)  # measured at batch 1 only
    assert e.cost is not None and e.cost.source == "bandwidth-ceiling"
    assert "at batch [1], not at batch 4" in e.cost.source_detail

    none = tmp_path / "none.json"
    none.write_text(json.dumps({"schema": "llmopt.eval/1", "artifact": {"perplexity": 30.0}}))
    e = est.estimate(QWEN, gpu="H100", gpu_hourly_cost=1.0, report=none)
    assert e.cost is not None and e.cost.source == "bandwidth-ceiling"
    assert "no throughput section" in e.cost.source_detail

    newer = tmp_path / "newer.json"
    newer.write_text(json.dumps({"schema": "llmopt.eval/99", "throughput": {"decode": {"1": {"tokens_per_s": 9.0}}}}))
    with pytest.raises(InputError, match="written by a newer llmopt"):
        est.estimate(QWEN, gpu="H100", gpu_hourly_cost=1.0, report=newer)


# ---------------------------------------------------------------- GPU catalog


def test_catalog_extended_by_file_and_env(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    extra = tmp_path / "gpus.yaml"
    extra.write_text(
        "gpus:\n  - name: MI300X\n    memory_bytes: 206158430208\n    bandwidth_bytes_per_s: 5300000000000\n"
        "  - name: T4\n    memory_bytes: 1000\n    bandwidth_bytes_per_s: 1000\n"
    )
    catalog = est.load_gpu_catalog(extra)
    assert est.find_gpu("mi300x", catalog).bandwidth_bytes_per_s == 5_300_000_000_000
    assert catalog["T4"].memory_bytes == 1000  # a user entry replaces the built-in one
    assert est.find_gpu("h100", catalog).name == "H100-80GB"  # aliases
    monkeypatch.setenv(est.GPU_CATALOG_ENV, str(extra))
    assert "MI300X" in est.load_gpu_catalog()


def test_builtin_catalog_has_the_documented_gpus() -> None:
    catalog = est.load_gpu_catalog()
    assert set(catalog) == {"T4", "L4", "A10G", "A100-40GB", "A100-80GB", "H100-80GB", "H200", "B200"}
    assert catalog["H100-80GB"].bandwidth_bytes_per_s == 3_350_000_000_000
    assert catalog["H200"].memory_bytes == 141 * 2**30


# ---------------------------------------------------------------- CLI


def test_cli_table_and_json(capsys: pytest.CaptureFixture[str]) -> None:
    code, out, _ = run_cli(["estimate", str(LLAMA), "--gpu", "A100-80GB", "--context", "8192", "--batch", "4",
                            "--gpu-hourly-cost", "1.5", "--weights", "int4"], capsys)  # fmt: skip
    assert code == 0
    assert "8,030,261,248" in out and "131,072 bytes/token" in out and "per million tokens" in out
    assert "bandwidth-ceiling" in out
    code, out, _ = run_cli(["estimate", str(QWEN), "--json"], capsys)
    assert code == 0
    data = json.loads(out)
    assert data["parameters"]["total"] == 7_615_616_512
    assert data["kv_cache"]["bytes_per_token"] == 57_344
    assert data["gpu"]["name"] == "H100-80GB"


def test_cli_accepts_a_model_folder(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    (tmp_path / "config.json").write_text(LLAMA.read_text())
    code, out, _ = run_cli(["estimate", str(tmp_path), "--json"], capsys)
    assert code == 0 and json.loads(out)["parameters"]["total"] == 8_030_261_248


def test_cli_unknown_model_type(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    cfg = json.loads(LLAMA.read_text())
    cfg["model_type"] = "llamma"
    (tmp_path / "config.json").write_text(json.dumps(cfg))
    code, _, err = run_cli(["estimate", str(tmp_path / "config.json")], capsys)
    assert code == 2
    assert "model_type 'llamma' is not one llmopt can estimate (did you mean llama?)" in err
    assert "Supported: llama, mistral, qwen2, qwen3, gemma, gemma2, phi3" in err
    assert "Traceback" not in err


def test_cli_unknown_gpu_names_close_matches(capsys: pytest.CaptureFixture[str]) -> None:
    code, _, err = run_cli(["estimate", str(LLAMA), "--gpu", "H100-80G"], capsys)
    assert code == 2
    assert "unknown GPU 'H100-80G' (did you mean H100-80GB" in err and "--gpu-catalog" in err


def test_cli_missing_config(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    code, _, err = run_cli(["estimate", str(tmp_path)], capsys)
    assert code == 2 and f"{tmp_path} has no config.json" in err
    code, _, err = run_cli(["estimate", str(tmp_path / "nope" / "config.json")], capsys)
    assert code == 2 and "does not exist" in err


def test_cli_bad_kv_dtype(capsys: pytest.CaptureFixture[str]) -> None:
    code, _, err = run_cli(["estimate", str(LLAMA), "--kv-dtype", "int3"], capsys)
    assert code == 2
    assert "unknown KV-cache dtype 'int3'" in err and "fp16, bf16, fp8" in err


def test_cli_bad_config_values(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    cfg = json.loads(LLAMA.read_text())
    del cfg["hidden_size"]
    bad = tmp_path / "config.json"
    bad.write_text(json.dumps(cfg))
    code, _, err = run_cli(["estimate", str(bad)], capsys)
    assert code == 2 and "no positive integer 'hidden_size'" in err
    bad.write_text("{not json")
    code, _, err = run_cli(["estimate", str(bad)], capsys)
    assert code == 2 and "not a readable JSON file" in err


def test_cli_bad_catalog_and_report(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    cat = tmp_path / "gpus.yaml"
    cat.write_text("gpus:\n  - name: X1\n    memory_bytes: lots\n    bandwidth_bytes_per_s: 1\n")
    code, _, err = run_cli(["estimate", str(LLAMA), "--gpu-catalog", str(cat)], capsys)
    assert code == 2 and "gpus.0.memory_bytes" in err
    code, _, err = run_cli(["estimate", str(LLAMA), "--report", str(tmp_path / "missing.json"),
                            "--gpu-hourly-cost", "1"], capsys)  # fmt: skip
    assert code == 2 and "missing.json does not exist" in err


def test_cli_hub_id_unreachable(monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]) -> None:
    def no_network(repo_id: str) -> str:
        raise ConnectionError("[Errno -2] Name or service not known")

    from llmopt.estimate import architecture

    monkeypatch.setattr(architecture, "_download_config", no_network)
    code, _, err = run_cli(["estimate", "meta-llama/Llama-3.1-8B"], capsys)
    assert code == 2
    assert "could not fetch config.json of 'meta-llama/Llama-3.1-8B' from the Hugging Face Hub" in err
    assert "pass its path" in err


def test_no_torch_import_for_estimate() -> None:
    import subprocess
    import sys

    code = "import sys; import llmopt.estimate as e; e.estimate(sys.argv[1], gpu='L4'); print('torch' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code, str(LLAMA)], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False"


# ---------------------------------------------------------------- against the real model


def _safetensors_header(path: Path) -> tuple[dict[str, Any], int]:
    with open(path, "rb") as f:
        (n,) = struct.unpack("<Q", f.read(8))
        header = json.loads(f.read(n))
    header.pop("__metadata__", None)
    return header, path.stat().st_size - 8 - n


@pytest.mark.e2e
def test_smollm2_estimate_matches_safetensors(assets: dict[str, Path]) -> None:
    model = assets["model"]
    header, data_bytes = _safetensors_header(model / "model.safetensors")
    a = arch_of(model)
    expected = {}
    for g in est.tensors(a):
        for i in range(g.count):
            expected[g.name.replace("*", str(i))] = list(g.shape)
    assert expected == {name: meta["shape"] for name, meta in header.items()}
    assert est.parameter_count(a).total == sum(math.prod(m["shape"]) for m in header.values())
    assert {m["dtype"] for m in header.values()} == {"F16"}
    assert est.weight_bytes(a, "fp16") == data_bytes


@pytest.mark.e2e
def test_smollm2_kv_cache_matches_torch(assets: dict[str, Path]) -> None:
    import torch
    from transformers import AutoModelForCausalLM, DynamicCache, StaticCache

    model = AutoModelForCausalLM.from_pretrained(assets["model"], dtype=torch.float16)
    a = arch_of(assets["model"])
    batch, context = 2, 12
    ids = torch.randint(0, a.vocab_size, (batch, context))
    # transformers 5.24 renamed forward's `past_key_values` to `cache`; older 5.x know only the first
    arg = "cache" if "cache" in inspect.signature(model.forward).parameters else "past_key_values"
    with torch.inference_mode():
        dynamic = DynamicCache(config=model.config)
        model(input_ids=ids, use_cache=True, **{arg: dynamic})
        static = StaticCache(config=model.config, max_cache_len=40)
        model(input_ids=ids, use_cache=True, **{arg: static})

    def nbytes(cache: Any) -> int:
        return sum(layer.keys.nbytes + layer.values.nbytes for layer in cache.layers)

    assert len(dynamic.layers) == a.num_layers
    assert nbytes(dynamic) == est.kv_cache_bytes(a, batch=batch, context=context, kv_dtype="fp16")
    # a static cache allocates its whole length up front
    assert nbytes(static) == est.kv_cache_bytes(a, batch=batch, context=40, kv_dtype="fp16")
