"""Which .gguf serve-bench serves from a folder: a GGUF artifact made with an importance matrix holds the model file
and ``imatrix.gguf``; the manifest's record of the model file decides, else the importance matrices are left out,
and a folder still holding two model files is refused with their names."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from llmopt.errors import ModelError
from llmopt.serving.servers import ServerOptions, _gguf_type, choose_server, gguf_file, llama_cpp_spec

MODEL = "smollm2-135m-instruct-Q4_K_M.gguf"


def _placeholder(path: Path) -> Path:
    path.write_bytes(b"GGUF" + b"\0" * 64)
    return path


def _real_gguf(path: Path, general_type: str | None, *, tokens: int = 0) -> Path:
    """A small but real GGUF written with the gguf package (one tensor; ``tokens`` strings before general.type)."""
    gguf = pytest.importorskip("gguf")
    import numpy as np

    w = gguf.GGUFWriter(str(path), "llama")
    if tokens:
        w.add_token_list([f"tok{i}" for i in range(tokens)])
        w.add_token_scores([0.0] * tokens)
        w.add_uint32("llama.block_count", 2)
        w.add_bool("llmopt.test", True)
    if general_type is not None:
        w.add_type(general_type)
    w.add_tensor("blk.0.w", np.zeros((4, 4), dtype=np.float32))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return path


def _artifact(folder: Path, *, manifest: bool = True) -> Path:
    """What `llmopt quantize -m gguf` with --imatrix auto leaves: model file, imatrix.gguf, tokenizer, manifest."""
    folder.mkdir()
    _placeholder(folder / MODEL)
    _placeholder(folder / "imatrix.gguf")
    (folder / "chat_template.jinja").write_text("{{ messages }}")
    (folder / "tokenizer_config.json").write_text("{}")
    if manifest:
        resolved = {"gguf_file": MODEL, "imatrix": {"file": "imatrix.gguf"}}
        (folder / "llmopt.json").write_text(json.dumps({"format": "gguf", "options": {"_resolved": resolved}}))
    return folder


def test_an_artifact_with_an_imatrix_serves_its_model_file(tmp_path: Path) -> None:
    art = _artifact(tmp_path / "q4_k_m")
    assert gguf_file(str(art)) == (art / MODEL).resolve()
    assert choose_server(str(art), "auto") == "llama.cpp"


def test_the_manifest_names_the_model_even_beside_another_model_file(tmp_path: Path) -> None:
    art = _artifact(tmp_path / "q4_k_m")
    _placeholder(art / "zz-other-Q8_0.gguf")  # sorts after MODEL: a first-of-the-list pick would not tell
    _placeholder(art / "aa-other-Q8_0.gguf")  # ... and one before it
    assert gguf_file(str(art)) == (art / MODEL).resolve()


def test_the_started_server_loads_the_model_not_the_imatrix(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    exe = tmp_path / "llama-server"
    exe.write_text("#!/bin/sh\n")
    exe.chmod(0o755)
    monkeypatch.setenv("LLMOPT_LLAMA_SERVER", str(exe))
    art = _artifact(tmp_path / "q4_k_m")
    spec = llama_cpp_spec(str(art), 8080, ServerOptions())
    assert spec.argv[spec.argv.index("-m") + 1] == str((art / MODEL).resolve())
    assert spec.model_name == MODEL


def test_without_a_manifest_imatrix_gguf_is_left_out(tmp_path: Path) -> None:
    art = _artifact(tmp_path / "q4_k_m", manifest=False)
    assert gguf_file(str(art)) == (art / MODEL).resolve()


def test_a_manifest_naming_a_file_outside_the_folder_is_not_followed(tmp_path: Path) -> None:
    art = _artifact(tmp_path / "q4_k_m")
    _placeholder(tmp_path / "elsewhere.gguf")
    data = json.loads((art / "llmopt.json").read_text())
    data["options"]["_resolved"]["gguf_file"] = "../elsewhere.gguf"
    (art / "llmopt.json").write_text(json.dumps(data))
    assert gguf_file(str(art)) == (art / MODEL).resolve()


def test_two_model_files_are_refused_with_their_names(tmp_path: Path) -> None:
    folder = tmp_path / "two"
    folder.mkdir()
    for name in ("m-Q4_K_M.gguf", "m-Q8_0.gguf", "imatrix.gguf"):
        _placeholder(folder / name)
    with pytest.raises(ModelError) as exc:
        choose_server(str(folder), "auto")
    assert "2 GGUF model files (m-Q4_K_M.gguf, m-Q8_0.gguf)" in exc.value.message
    assert "imatrix.gguf" not in exc.value.message
    assert exc.value.hint is not None and "Pass the file itself" in exc.value.hint
    with pytest.raises(ModelError, match="2 GGUF model files"):
        llama_cpp_spec(str(folder), 8080, ServerOptions())


def test_an_importance_matrix_under_another_name_is_told_by_its_header(tmp_path: Path) -> None:
    folder = tmp_path / "art"
    folder.mkdir()
    model = _real_gguf(folder / "m-Q4_K_M.gguf", "model", tokens=300)
    _real_gguf(folder / "calibration-matrix.gguf", "imatrix")
    assert _gguf_type(model) == "model"
    assert _gguf_type(folder / "calibration-matrix.gguf") == "imatrix"
    assert gguf_file(str(folder)) == model.resolve()


def test_a_header_that_cannot_be_read_names_no_type(tmp_path: Path) -> None:
    assert _gguf_type(_placeholder(tmp_path / "zeros.gguf")) is None
    assert _gguf_type(_real_gguf(tmp_path / "untyped.gguf", None, tokens=3)) is None
    (tmp_path / "text.gguf").write_text("not a gguf")
    assert _gguf_type(tmp_path / "text.gguf") is None
    cut = _real_gguf(tmp_path / "cut.gguf", "model", tokens=50)
    cut.write_bytes(cut.read_bytes()[:200])  # truncated inside the token list, before general.type
    assert _gguf_type(cut) is None


def test_a_hugging_face_folder_with_a_stray_gguf_still_goes_to_transformers(tmp_path: Path) -> None:
    folder = tmp_path / "hf"
    folder.mkdir()
    (folder / "config.json").write_text("{}")
    _placeholder(folder / "a.gguf")
    _placeholder(folder / "b.gguf")
    assert gguf_file(str(folder)) is None
    assert choose_server(str(folder), "auto") == "transformers"
