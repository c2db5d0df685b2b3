"""The GGUF backend's vocabulary check (llmopt/backends/gguf_vocab.py) and prepare_assets' tokenizer fix.

A byte-level BPE tokenizer.json that says ``"byte_fallback": true`` with a ``Sequence`` decoder (what
transformers 5.17 wrote for SmolLM2 rebuilt from its GGUF) gives the same HF ids, but llama.cpp's converter
then writes a SentencePiece-style vocabulary (``tokenizer.ggml.model = "llama"``, no merges) on which
llama.cpp aborts (``std::out_of_range``) as soon as it tokenizes text. The backend must refuse such a
conversion with one clear message and keep nothing.

Unit tests need neither llama.cpp nor the model. The e2e tests use the real SmolLM2 asset and the llama.cpp
converter set up by `python scripts/build_llamacpp.py`; they skip with that reason where it is missing.
"""

from __future__ import annotations

import copy
import importlib.util
import json
import shutil
from pathlib import Path
from types import ModuleType
from typing import Any

import pytest

from llmopt.backends import gguf_vocab as V
from llmopt.errors import ModelError
from tests.test_gguf import _require_llamacpp

ROOT = Path(__file__).resolve().parents[1]


def _prepare_assets() -> ModuleType:
    spec = importlib.util.spec_from_file_location("prepare_assets", ROOT / "scripts" / "prepare_assets.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _tokenizer_json(*, byte_fallback: bool, pre: dict[str, Any] | None = None) -> dict[str, Any]:
    return {
        "version": "1.0",
        "added_tokens": [],
        "pre_tokenizer": pre
        or {"type": "ByteLevel", "add_prefix_space": False, "trim_offsets": True, "use_regex": True},
        "decoder": {"type": "ByteLevel", "add_prefix_space": True, "trim_offsets": True, "use_regex": True},
        "model": {"type": "BPE", "byte_fallback": byte_fallback, "vocab": {"a": 0, "b": 1}, "merges": [["a", "b"]]},
    }


# What transformers 5.17 wrote for SmolLM2 (its GGUF llama converter): byte fallback and a SentencePiece-style
# decoder around the byte-level one. llama.cpp's converter reads these two as a "llama" vocabulary.
SEQUENCE_DECODER = {
    "type": "Sequence",
    "decoders": [
        {"type": "ByteFallback"},
        {"type": "Fuse"},
        {"type": "Replace", "pattern": {"String": "\u2581"}, "content": " "},
        {"type": "ByteLevel", "add_prefix_space": False, "trim_offsets": False, "use_regex": True},
    ],
}


# --- unit: the tokenizer.json fix ------------------------------------------------------------------------


def test_prepare_assets_fix_sets_byte_fallback_false_for_a_gpt2_gguf_only() -> None:
    pa = _prepare_assets()
    broken = _tokenizer_json(byte_fallback=True)
    original = copy.deepcopy(broken)
    fixed = pa.fixed_tokenizer_json(broken, "gpt2")
    assert fixed is not None and fixed["model"]["byte_fallback"] is False
    assert broken == original, "the input dict is not changed"
    assert {k: v for k, v in fixed.items() if k != "model"} == {k: v for k, v in broken.items() if k != "model"}
    assert fixed["model"]["vocab"] == broken["model"]["vocab"] and fixed["model"]["merges"] == [["a", "b"]]
    assert pa.fixed_tokenizer_json(fixed, "gpt2") is None, "idempotent: nothing left to change"
    assert pa.fixed_tokenizer_json(_tokenizer_json(byte_fallback=False), "gpt2") is None
    # a SentencePiece-style GGUF ("llama") or an unknown one: byte fallback is real there, never touched
    assert pa.fixed_tokenizer_json(broken, "llama") is None
    assert pa.fixed_tokenizer_json(broken, None) is None


def test_byte_fallback_is_kept_where_it_is_real() -> None:
    metaspace = {"type": "Metaspace", "replacement": "\u2581", "prepend_scheme": "first", "split": False}
    assert V.without_byte_fallback(_tokenizer_json(byte_fallback=True, pre=metaspace)) is None
    nested = {"type": "Sequence", "pretokenizers": [{"type": "Split"}, {"type": "ByteLevel"}]}
    fixed = V.without_byte_fallback(_tokenizer_json(byte_fallback=True, pre=nested))
    assert fixed is not None and fixed["model"]["byte_fallback"] is False


# --- unit: the comparison and its message ----------------------------------------------------------------


def _decode(ids: list[int]) -> str:
    return "".join({1: "Hello", 2: " world", 3: " wor", 4: "ld"}[i] for i in ids)


def test_first_difference_names_position_and_both_pieces() -> None:
    answers = [{"meta": {"model": "gpt2"}}, {"ids": [1, 3, 4], "pieces": ["Hello", " wor", "ld"]}]
    problem = V.compare(["Hello world"], [[1, 2]], answers, 0, "", _decode, strict=1).problem
    assert problem is not None
    assert "sample text 1 of 1 ('Hello world')" in problem and "token 1 differs" in problem
    assert "HF tokenizer 2 ' world'" in problem and "llama.cpp 3 ' wor'" in problem and "2 vs 3 tokens" in problem
    same = [{"meta": {}}, {"ids": [1, 2], "pieces": ["Hello", " world"]}]
    assert V.compare(["Hello world"], [[1, 2]], same, 0, "", _decode, strict=1) == V.Verdict(None)


def test_a_crash_is_a_mismatch_naming_the_text_and_the_exception() -> None:
    stderr = (
        "llama_model_loader: loaded meta data\n"
        "terminate called after throwing an instance of 'std::out_of_range'\n  what():  unordered_map::at\n"
    )
    problem = V.compare(["Hello world", "b"], [[1, 2], [5]], [{"meta": {}}], -6, stderr, _decode, strict=2).problem
    assert problem is not None
    assert problem.startswith("llama.cpp crashed (SIGABRT) while tokenizing sample text 1 of 2 ('Hello world')")
    assert "std::out_of_range" in problem and "unordered_map::at" in problem
    answered = [{"meta": {}}, {"ids": [1, 2], "pieces": ["Hello", " world"]}, {"ids": [5], "pieces": ["b"]}]
    verdict = V.compare(["a", "b"], [[1, 2], [5]], answered, 3, "", _decode, strict=2)
    assert "after tokenizing every text" in (verdict.problem or "")


def test_calibration_texts_tolerate_a_few_differing_tokens_only() -> None:
    """Real text may hit a spot where llama.cpp's pre-tokenizer splits differently (1 token in ~900 for SmolLM2):
    tolerated up to 1% of the calibration tokens and reported; more is a mismatch; the sample texts never."""
    want = [1, 2] + [5] * 198  # 200 tokens
    few = [{"meta": {}}, {"ids": [1, 2], "pieces": ["Hello", " world"]}, {"ids": [1, 3, 4] + [5] * 198, "pieces": []}]
    few[2]["pieces"] = ["Hello", " wor", "ld"] + ["x"] * 198
    verdict = V.compare(["Hello world", "calib"], [[1, 2], want], few, 0, "", _decode, strict=1)
    assert verdict.problem is None and (verdict.differing, verdict.compared) == (2, 200)  # " world" -> " wor", "ld"
    assert verdict.first_tolerated is not None and "calibration text 1 of 1" in verdict.first_tolerated
    many = [few[0], few[1], {"ids": [1, 3, 4] + [6] * 198, "pieces": ["Hello", " wor", "ld"] + ["y"] * 198}]
    verdict = V.compare(["Hello world", "calib"], [[1, 2], want], many, 0, "", _decode, strict=1)
    assert verdict.problem is not None and verdict.problem.startswith("200 of 200 calibration tokens differ")
    strict = V.compare(["Hello world", "calib"], [[1, 2], want], few, 0, "", _decode, strict=2)
    assert strict.problem is not None and "sample text 2 of 2" in strict.problem


# --- e2e on the real SmolLM2 -----------------------------------------------------------------------------


def _model_copy(model: Path, dest: Path) -> Path:
    """The model folder's small files copied, the weights linked (the converter only reads them)."""
    dest.mkdir()
    for f in model.iterdir():
        if f.suffix == ".safetensors":
            (dest / f.name).symlink_to(f.resolve())
        else:
            shutil.copy2(f, dest / f.name)
    return dest


def _break_tokenizer(folder: Path) -> None:
    """The tokenizer.json transformers 5.17 wrote: byte_fallback true and a Sequence decoder."""
    path = folder / "tokenizer.json"
    data = json.loads(path.read_text(encoding="utf-8"))
    data["model"]["byte_fallback"] = True
    data["decoder"] = SEQUENCE_DECODER
    path.write_text(json.dumps(data, ensure_ascii=False), encoding="utf-8")


def test_prepare_assets_fixes_a_5_17_folder_and_is_idempotent(assets: dict[str, Path], tmp_path: Path) -> None:
    """On a copy of the real tokenizer files as 5.17 wrote them, against the real Q4_1 GGUF ("gpt2")."""
    from transformers import AutoTokenizer

    pa = _prepare_assets()
    folder = tmp_path / "smol"
    folder.mkdir()
    for f in Path(assets["model"]).iterdir():
        if f.suffix != ".safetensors":
            shutil.copy2(f, folder / f.name)
    _break_tokenizer(folder)
    text = assets["eval_text"].read_text(encoding="utf-8")[:8_000]
    ids = AutoTokenizer.from_pretrained(folder)(text, add_special_tokens=False)["input_ids"]
    assert pa.fix_byte_level_tokenizer(folder, assets["gguf"], text) is True
    data = json.loads((folder / "tokenizer.json").read_text(encoding="utf-8"))
    assert data["model"]["byte_fallback"] is False and len(data["model"]["merges"]) == 48_900
    assert AutoTokenizer.from_pretrained(folder)(text, add_special_tokens=False)["input_ids"] == ids
    before = (folder / "tokenizer.json").read_bytes()
    assert pa.fix_byte_level_tokenizer(folder, assets["gguf"], text) is False
    assert (folder / "tokenizer.json").read_bytes() == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["smol"], "no temporary folder left"
    # the prepared asset itself is right (the conftest fixture ran prepare_assets.py)
    assert json.loads((Path(assets["model"]) / "tokenizer.json").read_text())["model"]["byte_fallback"] is False


def test_prepare_assets_stops_when_the_ids_would_change(tmp_path: Path) -> None:
    """A byte-level BPE whose vocabulary lacks a byte token: byte fallback matters there, so no change."""
    pytest.importorskip("transformers")
    from llmopt.backends.gguf_vocab import read_gguf_vocab_meta

    gguf = pytest.importorskip("gguf")
    pa = _prepare_assets()
    folder = tmp_path / "tiny"
    folder.mkdir()
    data = _tokenizer_json(byte_fallback=True)
    data["model"].update(vocab={"a": 0, "b": 1, "<0x63>": 2, "<unk>": 3}, merges=[], unk_token="<unk>")
    (folder / "tokenizer.json").write_text(json.dumps(data))
    (folder / "tokenizer_config.json").write_text(json.dumps({"tokenizer_class": "PreTrainedTokenizerFast"}))
    vocab_file = tmp_path / "v.gguf"
    writer = gguf.GGUFWriter(str(vocab_file), "llama")
    writer.add_tokenizer_model("gpt2")
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    assert read_gguf_vocab_meta(vocab_file)["model"] == "gpt2"
    with pytest.raises(SystemExit, match="changes the HF token ids of the evaluation text"):
        pa.fix_byte_level_tokenizer(folder, vocab_file, "abc")
    assert json.loads((folder / "tokenizer.json").read_text())["model"]["byte_fallback"] is True


@pytest.fixture(scope="module")
def converted_f16(assets: dict[str, Path], tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The original SmolLM2 folder through llama.cpp's converter (f16), as the backend runs it."""
    chain = _require_llamacpp()
    from llmopt.backends.gguf import _convert
    from llmopt.source import resolve

    out = tmp_path_factory.mktemp("vocab") / "smol-F16.gguf"
    _convert(chain, resolve(str(assets["model"])), "f16", out)
    return out


@pytest.mark.e2e
def test_original_smollm2_passes_the_check(converted_f16: Path, assets: dict[str, Path]) -> None:
    from transformers import AutoTokenizer

    meta = V.read_gguf_vocab_meta(converted_f16)
    assert meta == {"model": "gpt2", "pre": "smollm", "tokens": 49_152, "merges": 48_900}
    tok = AutoTokenizer.from_pretrained(assets["model"])
    text = assets["calibration_text"].read_text(encoding="utf-8")[:20_000]
    ids = tok(text, add_special_tokens=False)["input_ids"]
    calibration = [ids[i : i + 256] for i in range(0, 4 * 256, 256)]
    result = V.check_gguf_vocab(converted_f16, Path(assets["model"]), calibration=calibration)
    assert result["texts"] == len(V.SAMPLE_TEXTS) + 4 and result["tokens"] > 4 * 200
    # this asset's HF tokenizer (rebuilt by transformers from the GGUF) lacks SmolLM2's digit split, so a run of
    # newlines before a digit may come out as one token in llama.cpp: a few, within tolerance
    assert result["calibration_tokens_differing"] <= 0.01 * 4 * 256, result
    assert result["seconds"] < 60, result  # under a second on an idle machine


@pytest.mark.e2e
def test_a_different_vocabulary_is_reported_at_its_first_token(
    converted_f16: Path, assets: dict[str, Path], tmp_path: Path
) -> None:
    """No crash this time: the HF tokenizer of the folder gives other ids than the (right) GGUF."""
    folder = tmp_path / "swapped"
    folder.mkdir()
    for f in Path(assets["model"]).iterdir():
        if f.suffix != ".safetensors":
            shutil.copy2(f, folder / f.name)
    path = folder / "tokenizer.json"
    data = json.loads(path.read_text(encoding="utf-8"))
    vocab = data["model"]["vocab"]
    vocab["\u0120world"], vocab["\u0120the"] = vocab["\u0120the"], vocab["\u0120world"]  # Ġworld <-> Ġthe
    path.write_text(json.dumps(data, ensure_ascii=False), encoding="utf-8")
    with pytest.raises(ModelError) as exc:
        V.check_gguf_vocab(converted_f16, folder)
    message = str(exc.value)
    assert "sample text 1 of 6 ('Hello world." in message and "token 1 differs" in message
    assert "' world'" in message and "tokenizer.ggml.model 'gpt2' (byte-level BPE)" in message
    assert "byte_fallback false" in message and "byte_fallback" not in (exc.value.hint or "")


@pytest.mark.e2e
def test_byte_fallback_vocab_fails_the_variant_and_keeps_nothing(assets: dict[str, Path], tmp_path: Path) -> None:
    """The 5.17 tokenizer.json through `quantize`: the HF ids are unchanged, llama.cpp's vocabulary is not."""
    _require_llamacpp()
    from transformers import AutoTokenizer

    from llmopt.api import quantize

    folder = _model_copy(Path(assets["model"]), tmp_path / "smol-bf")
    _break_tokenizer(folder)
    text = assets["eval_text"].read_text(encoding="utf-8")[:8_000]
    same = AutoTokenizer.from_pretrained(assets["model"])(text, add_special_tokens=False)["input_ids"]
    assert AutoTokenizer.from_pretrained(folder)(text, add_special_tokens=False)["input_ids"] == same
    out = tmp_path / "out"
    with pytest.raises(ModelError) as exc:
        quantize(str(folder), "gguf", out, options={"quant_type": "f16"})
    message, hint = str(exc.value), exc.value.hint or ""
    assert "llama.cpp does not tokenize the converted GGUF like the source model" in message
    assert "crashed (SIGABRT) while tokenizing sample text 1 of 6" in message and "unordered_map::at" in message
    assert "tokenizer.ggml.model 'llama' (SentencePiece-style), pre-tokenizer 'default', 0 merges" in message
    assert "byte-level BPE" in message and "byte_fallback true" in message
    assert '"byte_fallback": false' in hint and str(folder / "tokenizer.json") in hint
    assert not out.exists(), "no artifact"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["smol-bf"], "no staging or work folder left"


def test_tokens_llama_cpp_adds_count_against_the_tolerance() -> None:
    """Every HF token found in llama.cpp's answer, but twice as many tokens there: 100 differ, not 0."""
    want = list(range(1, 101))
    got = [t for i in want for t in (i, 999)]
    answers = [{"meta": {}}, {"ids": got, "pieces": ["p"] * len(got)}]
    verdict = V.compare(["t" * 100], [want], answers, 0, "", lambda ids: "x" * len(ids), strict=0)
    assert verdict.differing == 100 and verdict.problem is not None and "100 of 100" in verdict.problem


def test_vocab_meta_of_a_corrupt_header_is_empty_not_an_exception(tmp_path: Path) -> None:
    import struct

    bad = tmp_path / "bad.gguf"
    bad.write_bytes(b"GGUF" + struct.pack("<IQQ", 3, 0, 1) + struct.pack("<Q", 2**64 - 1) + b"abc")
    assert V.read_gguf_vocab_meta(bad) == {}
    (tmp_path / "short.gguf").write_bytes(b"GGUF\x03")
    assert V.read_gguf_vocab_meta(tmp_path / "short.gguf") == {}
