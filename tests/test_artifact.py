from __future__ import annotations

import json
from pathlib import Path

import pytest

from llmopt.artifact import (
    MANIFEST_NAME,
    Artifact,
    EnvironmentInfo,
    Manifest,
    SourceInfo,
    files_digest,
    hash_tree,
    write_json_atomic,
)
from llmopt.errors import ArtifactError


def _make(tmp_path: Path) -> Artifact:
    (tmp_path / "model.safetensors").write_bytes(b"weights" * 10)
    (tmp_path / "sub").mkdir()
    (tmp_path / "sub" / "tok.json").write_text("{}")
    manifest = Manifest(
        llmopt_version="0.0.0",
        backend="bnb-int8",
        format="bnb-8bit",
        runner="hf",
        options={"llm_int8_threshold": 6.0},
        source=SourceInfo(model="m", resolved_path="/m"),
        environment=EnvironmentInfo(python="3", platform="p", device="cpu"),
        files=hash_tree(tmp_path),
    )
    art = Artifact(tmp_path, manifest)
    art.save()
    return art


def test_manifest_round_trip_and_hashes(tmp_path: Path) -> None:
    art = _make(tmp_path)
    again = Artifact.open(tmp_path)
    assert again.manifest == art.manifest
    assert set(again.manifest.files) == {"model.safetensors", "sub/tok.json"}
    assert MANIFEST_NAME not in again.manifest.files
    assert again.verify() == []
    assert again.size_bytes() == 70 + 2


def test_verify_names_changed_missing_and_extra_files(tmp_path: Path) -> None:
    art = _make(tmp_path)
    (tmp_path / "model.safetensors").write_bytes(b"tampered" * 10)
    (tmp_path / "sub" / "tok.json").unlink()
    (tmp_path / "extra.bin").write_bytes(b"x")
    problems = art.verify()
    assert "model.safetensors (changed)" in problems
    assert "sub/tok.json (missing)" in problems
    assert "extra.bin (not in manifest)" in problems
    with pytest.raises(ArtifactError, match="do not match the manifest"):
        art.require_intact()


def test_digest_changes_with_content(tmp_path: Path) -> None:
    art = _make(tmp_path)
    before = files_digest(art.manifest.files)
    (tmp_path / "model.safetensors").write_bytes(b"other")
    assert files_digest(hash_tree(tmp_path)) != before


def test_folder_without_manifest_is_unfinished(tmp_path: Path) -> None:
    (tmp_path / "model.safetensors").write_bytes(b"x")
    with pytest.raises(ArtifactError, match="did not finish"):
        Artifact.open(tmp_path)


def test_invalid_manifest_is_reported(tmp_path: Path) -> None:
    (tmp_path / MANIFEST_NAME).write_text(json.dumps({"schema_version": 1, "unknown": True}))
    with pytest.raises(ArtifactError, match="not a valid manifest"):
        Artifact.open(tmp_path)


def test_atomic_write_leaves_no_temp_files(tmp_path: Path) -> None:
    target = tmp_path / "out.json"
    write_json_atomic(target, {"a": 1})
    write_json_atomic(target, {"a": 2})
    assert json.loads(target.read_text()) == {"a": 2}
    assert [p.name for p in tmp_path.iterdir()] == ["out.json"]
