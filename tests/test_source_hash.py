"""A source's weight files are hashed once per process while unchanged (llmopt/source.py)."""

from __future__ import annotations

import hashlib
import os
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest

import llmopt.source as source_mod
from llmopt.source import SourceModel


def _counting(monkeypatch: pytest.MonkeyPatch, module: Any = source_mod) -> list[Path]:
    """Record every ``sha256_file`` call made through ``module``."""
    calls: list[Path] = []
    real = module.sha256_file

    def counted(path: Path) -> str:
        calls.append(path)
        return real(path)

    monkeypatch.setattr(module, "sha256_file", counted)
    return calls


def _source(folder: Path) -> SourceModel:
    return SourceModel(spec=str(folder), path=folder, config={}, weight_files=sorted(folder.glob("*.safetensors")))


@pytest.fixture(autouse=True)
def _empty_memo(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(source_mod, "_SOURCE_HASHES", {})


def test_each_resolution_of_an_unchanged_source_reuses_the_hash(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    calls = _counting(monkeypatch)
    weights = tmp_path / "model.safetensors"
    weights.write_bytes(b"weights" * 1000)
    first = _source(tmp_path).weights_sha256()
    second = _source(tmp_path).weights_sha256()  # a new SourceModel, as each variant's quantize makes
    assert first == second == {"model.safetensors": hashlib.sha256(weights.read_bytes()).hexdigest()}
    assert len(calls) == 1


def test_a_changed_file_is_hashed_again(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    calls = _counting(monkeypatch)
    weights = tmp_path / "model.safetensors"
    weights.write_bytes(b"a" * 4096)
    before = _source(tmp_path).weights_sha256()["model.safetensors"]
    stat = weights.stat()

    # same size, same mtime restored: a different inode (written elsewhere, renamed over) still counts as changed
    other = tmp_path / "new.tmp"
    other.write_bytes(b"b" * 4096)
    os.utime(other, ns=(stat.st_atime_ns, stat.st_mtime_ns))
    other.replace(weights)
    after = _source(tmp_path).weights_sha256()["model.safetensors"]
    assert after == hashlib.sha256(b"b" * 4096).hexdigest() != before

    # same inode, new content and mtime
    weights.write_bytes(b"c" * 4097)
    assert _source(tmp_path).weights_sha256()["model.safetensors"] == hashlib.sha256(b"c" * 4097).hexdigest()

    # edited in place, same size, its mtime set back: the ctime still moved
    stat = weights.stat()
    with open(weights, "r+b") as f:
        f.write(b"d")
    os.utime(weights, ns=(stat.st_atime_ns, stat.st_mtime_ns))
    assert weights.stat().st_size == stat.st_size and weights.stat().st_mtime_ns == stat.st_mtime_ns
    expected = hashlib.sha256(b"d" + b"c" * 4096).hexdigest()
    assert _source(tmp_path).weights_sha256()["model.safetensors"] == expected
    assert len(calls) == 4


def test_an_artifact_check_still_reads_every_byte(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The memo is for source provenance only: Artifact.verify hashes the files itself each time."""
    from llmopt import artifact

    calls = _counting(monkeypatch, artifact)
    (tmp_path / "w.bin").write_bytes(b"x" * 100)
    files = artifact.hash_tree(tmp_path)
    manifest = SimpleNamespace(files=files)  # verify reads only the file table
    art = artifact.Artifact(tmp_path, manifest)  # type: ignore[arg-type]
    assert art.verify() == [] and art.verify() == []
    assert len(calls) == 3
