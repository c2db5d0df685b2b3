"""GGUF backend and llama.cpp runner.

Unit tests need neither llama-cpp-python nor a model. The e2e tests need llama-cpp-python and the
converter set up by `python scripts/build_llamacpp.py`; they skip with that reason where it is missing.
"""

from __future__ import annotations

import importlib.util
import json
import struct
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from llmopt.backends import gguf as G
from llmopt.backends import gguf_toolchain as T
from llmopt.errors import EXIT_INPUT, BackendUnavailableError, ModelError, OptionsError
from llmopt.source import SourceModel

# --- unit: type names and options ------------------------------------------------------------------


@pytest.mark.parametrize(
    ("given", "expected"),
    [
        ("q4_k_m", "q4_k_m"),
        ("Q4_K_M", "q4_k_m"),
        ("q4-k-m", "q4_k_m"),
        ("q4_k", "q4_k_m"),
        ("IQ4_XS", "iq4_xs"),
    ],
)
def test_quant_type_names_are_normalized(given: str, expected: str) -> None:
    assert G.normalize_quant_type(given) == expected


@pytest.mark.parametrize(
    ("typo", "suggested"),
    [("q4km", "q4_k_m"), ("q4_k_n", "q4_k_m"), ("q8", "q8_0"), ("iq4xs", "iq4_xs"), ("q6k", "q6_k")],
)
def test_quant_type_typo_suggests_closest(typo: str, suggested: str) -> None:
    assert suggested in G.suggest_quant_types(typo)
    with pytest.raises(ValueError, match=f"did you mean .*'{suggested}'"):
        G.normalize_quant_type(typo)


def test_options_typo_is_an_options_error_naming_the_type() -> None:
    backend = G.GGUFBackend()
    with pytest.raises(OptionsError) as exc:
        backend.parse_options({"quant_type": "q4km"})
    assert "did you mean 'q4_k_m'" in str(exc.value)
    assert "Value error" not in str(exc.value)
    assert exc.value.exit_code == EXIT_INPUT


def test_options_reject_unknown_keys_and_bad_values() -> None:
    backend = G.GGUFBackend()
    with pytest.raises(OptionsError, match=r"'quant_typ' is not an option of gguf .*did you mean 'quant_type'"):
        backend.parse_options({"quant_typ": "q8_0"})
    with pytest.raises(OptionsError, match="threads"):
        backend.parse_options({"threads": 0})
    opts = backend.parse_options({"quant_type": "Q5_K", "imatrix": "AUTO"})
    assert isinstance(opts, G.GGUFOptions)
    assert (opts.quant_type, opts.imatrix) == ("q5_k_m", "auto")
    assert backend.parse_options({}).model_dump() == {
        "quant_type": "q4_k_m",
        "imatrix": "none",
        "threads": None,
        "pure": False,
    }


def test_calibration_is_wanted_only_for_imatrix_auto() -> None:
    backend = G.GGUFBackend()
    assert backend.wants_calibration(backend.parse_options({"imatrix": "auto"}))
    assert not backend.wants_calibration(backend.parse_options({}))
    assert not backend.wants_calibration(backend.parse_options({"imatrix": "some.imatrix"}))


def _source(tmp_path: Path, arch: str = "LlamaForCausalLM") -> SourceModel:
    return SourceModel(spec=str(tmp_path), path=tmp_path, config={"architectures": [arch], "model_type": "x"})


def test_types_needing_an_imatrix_fail_early_with_exit_code_2(tmp_path: Path) -> None:
    backend = G.GGUFBackend()
    for name in ("iq2_xxs", "iq1_s", "q2_k_s", "iq3_xxs"):
        opts = backend.parse_options({"quant_type": name})
        with pytest.raises(OptionsError, match=f"{name} needs an importance matrix") as exc:
            backend.validate(opts, _source(tmp_path), "cpu")
        assert exc.value.exit_code == EXIT_INPUT
        assert "--imatrix auto" in (exc.value.hint or "")


def test_imatrix_with_float_type_or_missing_file_is_rejected(tmp_path: Path) -> None:
    backend = G.GGUFBackend()
    with pytest.raises(OptionsError, match="f16 does not use an importance matrix"):
        backend.validate(backend.parse_options({"quant_type": "f16", "imatrix": "auto"}), _source(tmp_path), "cpu")
    missing = tmp_path / "nope.gguf"
    with pytest.raises(OptionsError, match="does not exist"):
        backend.validate(backend.parse_options({"imatrix": str(missing)}), _source(tmp_path), "cpu")
    junk = tmp_path / "junk.dat"
    junk.write_bytes(b"\x00\x00\x00\x00")
    with pytest.raises(OptionsError, match="not an imatrix file"):
        backend.validate(backend.parse_options({"imatrix": str(junk)}), _source(tmp_path), "cpu")


# --- unit: converter discovery and architectures ---------------------------------------------------


def _fake_toolchain(root: Path, version: str, archs: list[str], *, package: bool = True) -> Path:
    conv = root / version / "converter"
    conv.mkdir(parents=True)
    if package:
        (conv / "conversion").mkdir()
        body = ", ".join(f'"{a}": "mod"' for a in archs)
        (conv / "conversion" / "__init__.py").write_text(f"TEXT_MODEL_MAP: dict[str, str] = {{{body}}}\n")
        (conv / "convert_hf_to_gguf.py").write_text("# converter\n")
    else:
        decorators = "\n".join(f'@ModelBase.register("{a}")\nclass M{i}: ...' for i, a in enumerate(archs))
        (conv / "convert_hf_to_gguf.py").write_text(decorators + "\n")
    return conv


def test_converter_architectures_from_both_layouts(tmp_path: Path) -> None:
    new = _fake_toolchain(tmp_path / "a", "1", ["LlamaForCausalLM", "Qwen2ForCausalLM"])
    old = _fake_toolchain(tmp_path / "b", "1", ["LlamaForCausalLM", "GPT2LMHeadModel"], package=False)
    assert T.converter_architectures(new) == {"LlamaForCausalLM", "Qwen2ForCausalLM"}
    assert T.converter_architectures(old) == {"LlamaForCausalLM", "GPT2LMHeadModel"}


def test_unsupported_architecture_is_a_clear_model_error(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    _fake_toolchain(tmp_path / "tc", "9.9.9", ["LlamaForCausalLM", "MistralForCausalLM"])
    monkeypatch.setenv("LLMOPT_LLAMACPP_DIR", str(tmp_path / "tc"))
    monkeypatch.setattr(T, "installed_llama_cpp_version", lambda: "9.9.9")
    backend = G.GGUFBackend()
    opts = backend.parse_options({"quant_type": "q8_0"})
    backend.validate(opts, _source(tmp_path, "LlamaForCausalLM"), "cpu")  # supported: no error
    with pytest.raises(ModelError) as exc:
        backend.validate(opts, _source(tmp_path, "MistralForCausalLMX"), "cpu")
    msg = str(exc.value)
    assert "architecture 'MistralForCausalLMX' is not supported by llama.cpp's converter" in msg
    assert "MistralForCausalLM" in msg  # the close name it does support
    assert exc.value.exit_code == EXIT_INPUT


def test_missing_converter_names_the_build_script(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("LLMOPT_LLAMACPP_DIR", str(tmp_path))
    monkeypatch.setattr(T, "installed_llama_cpp_version", lambda: "9.9.9")
    with pytest.raises(BackendUnavailableError) as exc:
        T.require_toolchain()
    assert "scripts/build_llamacpp.py" in (exc.value.hint or "")
    opts = G.GGUFBackend().parse_options({"imatrix": "auto"})
    _fake_toolchain(tmp_path, "9.9.9", ["LlamaForCausalLM"])  # converter but no llama-imatrix
    with pytest.raises(BackendUnavailableError, match="llama-imatrix"):
        G.GGUFBackend().validate(opts, _source(tmp_path), "cpu")


# --- unit: imatrix files ---------------------------------------------------------------------------


def test_legacy_imatrix_file_is_normalized_by_calls(tmp_path: Path) -> None:
    pytest.importorskip("numpy")
    path = tmp_path / "m.dat"
    name = b"blk.0.attn_q.weight"
    blob = struct.pack("<i", 1) + struct.pack("<i", len(name)) + name + struct.pack("<ii", 4, 2)
    blob += struct.pack("<2f", 8.0, 2.0) + struct.pack("<i", 7) + struct.pack("<i", 3) + b"wiki"[:3]
    path.write_bytes(blob)
    values, datasets, chunks = G.load_imatrix(path)
    assert values == {"blk.0.attn_q.weight": [2.0, 0.5]}
    assert (datasets, chunks) == (["wik"], 7)


def test_gguf_imatrix_file_is_normalized_by_counts(tmp_path: Path) -> None:
    np = pytest.importorskip("numpy")
    gguf = pytest.importorskip("gguf")
    path = tmp_path / "imatrix.gguf"
    writer = gguf.GGUFWriter(str(path), arch="imatrix")
    writer.add_array("imatrix.datasets", ["calib.txt"])
    writer.add_uint32("imatrix.chunk_count", 5)
    writer.add_uint32("imatrix.chunk_size", 512)
    writer.add_tensor("blk.0.ffn_up.weight.in_sum2", np.array([[10.0, 20.0]], dtype=np.float32))
    writer.add_tensor("blk.0.ffn_up.weight.counts", np.array([[5.0]], dtype=np.float32))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    values, datasets, chunks = G.load_imatrix(path)
    assert values == {"blk.0.ffn_up.weight": [2.0, 4.0]}
    assert (datasets, chunks) == (["calib.txt"], 5)


def test_importing_the_modules_loads_neither_torch_nor_llama_cpp() -> None:
    code = (
        "import sys, llmopt, llmopt.backends.gguf, llmopt.runners.llamacpp, llmopt.runners.llamacpp_worker\n"
        "bad = [m for m in ('torch', 'llama_cpp', 'transformers', 'numpy') if m in sys.modules]\n"
        "assert not bad, bad\n"
    )
    subprocess.run([sys.executable, "-c", code], check=True)


def test_runner_finds_the_model_file_not_the_imatrix(tmp_path: Path) -> None:
    from llmopt.runners.llamacpp import find_gguf

    (tmp_path / "imatrix.gguf").write_bytes(b"GGUF")
    (tmp_path / "m-Q4_K_M.gguf").write_bytes(b"GGUF")
    assert find_gguf(tmp_path).name == "m-Q4_K_M.gguf"
    (tmp_path / "llmopt.json").write_text(json.dumps({"options": {"_resolved": {"gguf_file": "m-Q4_K_M.gguf"}}}))
    (tmp_path / "other.gguf").write_bytes(b"GGUF")
    assert find_gguf(tmp_path).name == "m-Q4_K_M.gguf"


# --- e2e on SmolLM2-135M ---------------------------------------------------------------------------


def _require_llamacpp() -> T.Toolchain:
    if importlib.util.find_spec("llama_cpp") is None:
        pytest.skip("llama-cpp-python is not installed (python scripts/build_llamacpp.py builds and installs it)")
    chain = T.find_toolchain()
    if chain is None:
        pytest.skip("llama.cpp's converter is not set up (run: python scripts/build_llamacpp.py)")
    return chain


@pytest.fixture(scope="module")
def gguf_f16(assets: dict[str, Path], tmp_path_factory: pytest.TempPathFactory) -> Path:
    _require_llamacpp()
    from llmopt.api import quantize

    out = tmp_path_factory.mktemp("gguf") / "f16"
    quantize(str(assets["model"]), "gguf", out, options={"quant_type": "f16"})
    return out


EVAL = {"context_length": 256, "max_tokens": 1024, "device": "cpu"}


@pytest.mark.e2e
def test_f16_gguf_scores_like_transformers(gguf_f16: Path, assets: dict[str, Path]) -> None:
    """The protocol is shared: same token ids, same windows -> the same perplexity within 0.1%."""
    from llmopt.api import evaluate

    files = set(json.loads((gguf_f16 / "llmopt.json").read_text())["files"])
    assert any(f.endswith("-F16.gguf") for f in files) and "tokenizer.json" in files
    report = evaluate(gguf_f16, str(assets["model"]), str(assets["eval_text"]), **EVAL)  # type: ignore[arg-type]
    assert report["artifact"]["runner"] == "llamacpp"
    assert report["settings"]["tokens_scored"] == 4 * 255  # 4 windows; no context for their first token
    assert abs(report["delta_pct"]) < 0.1, report["delta_pct"]


@pytest.mark.e2e
def test_q4_k_m_quantize_and_evaluate(assets: dict[str, Path], tmp_path: Path) -> None:
    """A k-quant through llama.cpp's quantizer, with an importance matrix computed from the calibration
    text where llama-imatrix is built, then evaluated through llama.cpp on the baseline's windows."""
    chain = _require_llamacpp()
    from llmopt.api import evaluate, quantize
    from llmopt.artifact import Artifact

    with_imatrix = chain.imatrix_tool is not None
    art = quantize(
        str(assets["model"]),
        "gguf",
        tmp_path / "q4",
        options={"quant_type": "q4_k_m", "imatrix": "auto" if with_imatrix else "none"},
        calibration=str(assets["calibration_text"]) if with_imatrix else None,
        samples=4,
        seq_len=128,
    )
    resolved: dict[str, Any] = art.manifest.options["_resolved"]
    assert art.manifest.format == "gguf" and art.manifest.runner == "llamacpp"
    assert resolved["gguf_file"].endswith("-Q4_K_M.gguf") and "Q4_K" in (resolved["tensor_types"] or {})
    assert not list(tmp_path.glob(".*")), "no temporary folders left behind"
    if with_imatrix:
        assert "imatrix.gguf" in art.manifest.files and resolved["imatrix"]["source"] == "auto"
        assert art.manifest.calibration is not None and art.manifest.calibration.samples == 4
    report = evaluate(art.path, str(assets["model"]), str(assets["eval_text"]), **EVAL)  # type: ignore[arg-type]
    assert 0 < report["size_ratio"] < 0.5
    assert 0 < report["delta_pct"] < 30, report["delta_pct"]
    assert Artifact.open(art.path).manifest.evaluation is not None


@pytest.mark.e2e
def test_runner_speed_and_bench_protocol(gguf_f16: Path) -> None:
    from llmopt.evaluate.throughput import ThroughputSettings
    from llmopt.runners.llamacpp import LlamaCppRunner

    runner = LlamaCppRunner(gguf_f16, "cpu")
    try:
        speed = runner.speed(prompt_len=16, gen_len=4, repeats=1)
        settings = ThroughputSettings(prompt_lens=[8], gen_len=2, batch_sizes=[1, 2], warmup=0, repetitions=1)
        bench = runner.bench(settings)
        assert runner.footprint_bytes() > 200_000_000  # 135M params in f16
    finally:
        runner.close()
    assert speed["prompt_tokens_per_s"] > 0 and speed["gen_tokens_per_s"] > 0
    assert speed["llama_perf_gen_tokens_per_s"] is not None
    assert bench["decode"]["1"]["tokens_per_s"]["median"] > 0 and "error" in bench["decode"]["2"]
    assert bench["prefill"]["8"]["tokens_per_s"]["median"] > 0


@pytest.mark.e2e
def test_cli_errors_exit_2_without_traceback(
    assets: dict[str, Path], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    _require_llamacpp()
    from llmopt.cli.main import main

    fake = tmp_path / "fake"
    fake.mkdir()
    config = json.loads((Path(assets["model"]) / "config.json").read_text())
    config["architectures"] = ["NotARealModelForCausalLM"]
    (fake / "config.json").write_text(json.dumps(config))
    header = json.dumps({"w": {"dtype": "F32", "shape": [1], "data_offsets": [0, 4]}}).encode()
    (fake / "model.safetensors").write_bytes(struct.pack("<Q", len(header)) + header + b"\x00" * 4)

    cases = [
        ([str(assets["model"]), "--quant-type", "q4km"], "did you mean 'q4_k_m'"),
        ([str(assets["model"]), "--quant-type", "iq2_xxs"], "needs an importance matrix"),
        ([str(fake), "--quant-type", "q8_0"], "architecture 'NotARealModelForCausalLM' is not supported"),
    ]
    for args, expected in cases:
        with pytest.raises(SystemExit) as exc:
            main(["quantize", *args, "--method", "gguf", "-o", str(tmp_path / "out"), "--device", "cpu", "-q"])
        err = capsys.readouterr().err
        assert exc.value.code == EXIT_INPUT, err
        assert expected in err and "Traceback" not in err
    assert not (tmp_path / "out").exists()


@pytest.mark.e2e
def test_smoke_decode_passes_on_this_cpu() -> None:
    """The build's smoke check, as the build script and `llmopt backends` run it: a tiny Llama, f16 and
    q8_0/q4_0/q4_1/q4_k_m, decoded by the installed llama.cpp in a child process, close to f16."""
    chain = _require_llamacpp()
    cmd = [sys.executable, "-m", "llmopt.runners.llamacpp_worker", "smoke", "--converter", str(chain.converter)]
    proc = subprocess.run(cmd, capture_output=True, text=True)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    result = json.loads(proc.stdout.strip().splitlines()[-1])
    assert result["ok"] and set(result["checked"]) == {"q8_0", "q4_0", "q4_1", "q4_k_m"}
    assert result["checked"]["q8_0"] < 0.04 < max(result["checked"].values()) < 0.35  # 4-bit differs, q8_0 barely
    assert result["cpu"]["model"]
    ok, text = T.decode_check(chain)
    assert ok and "decodes on this CPU" in text, text
