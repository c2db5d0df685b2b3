"""Hostile and careless use of the GGUF path: build script archives, relative paths, crashing llama.cpp."""

from __future__ import annotations

import importlib.util
import io
import subprocess
import sys
import tarfile
from pathlib import Path
from types import ModuleType
from typing import Any

import pytest

ROOT = Path(__file__).resolve().parents[2]
SCRIPT = ROOT / "scripts" / "build_llamacpp.py"


def build_script() -> ModuleType:
    spec = importlib.util.spec_from_file_location("build_llamacpp", SCRIPT)
    assert spec and spec.loader
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _tar(path: Path, members: list[tuple[str, str, Any]]) -> Path:
    """(kind, name, payload): kind file (bytes), dir, sym / lnk (link target), chr, fifo."""
    with tarfile.open(path, "w:gz") as tf:
        for kind, name, payload in members:
            info = tarfile.TarInfo(name)
            if kind == "file":
                info.size = len(payload)
                info.mode = 0o644
                tf.addfile(info, io.BytesIO(payload))
                continue
            info.type = {
                "dir": tarfile.DIRTYPE,
                "sym": tarfile.SYMTYPE,
                "lnk": tarfile.LNKTYPE,
                "chr": tarfile.CHRTYPE,
                "fifo": tarfile.FIFOTYPE,
            }[kind]
            info.mode = payload if kind == "dir" else 0o644
            if kind in ("sym", "lnk"):
                info.linkname = payload
            tf.addfile(info)
    return path


SDIST = [
    ("dir", "pkg-1.0", 0o555),
    ("file", "pkg-1.0/pyproject.toml", b"[project]\nname='pkg'\n"),
    ("dir", "pkg-1.0/ro", 0o444),  # a folder without x bits must still be traversable
    ("file", "pkg-1.0/ro/data.txt", b"x"),
    ("sym", "pkg-1.0/alias.toml", "pyproject.toml"),
]

HOSTILE = {
    "dotdot": [("file", "pkg-1.0/../../evil.txt", b"x")],
    "absolute": [("file", "/tmp/llmopt-evil-abs.txt", b"x")],
    "symlink out": [("sym", "pkg-1.0/out", "../../..")],
    "symlink absolute": [("sym", "pkg-1.0/etc", "/etc")],
    "write through a symlink": [("sym", "pkg-1.0/here", "."), ("file", "pkg-1.0/here/x.txt", b"x")],
    "symlink chain out": [("sym", "pkg-1.0/c", "."), ("sym", "pkg-1.0/b", "c/../..")],
    "hard link out": [("lnk", "pkg-1.0/passwd", "../../etc/passwd")],
    "character device": [("chr", "pkg-1.0/null", "")],
    "fifo": [("fifo", "pkg-1.0/pipe", "")],
}


@pytest.fixture(params=["by hand", "filter"])
def branch(request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch) -> str:
    """Both unpack branches: by hand (Python 3.11.0-3.11.3, which this venv may be) and tarfile's filter."""
    if request.param == "filter":
        if not hasattr(tarfile, "data_filter"):
            pytest.skip(f"Python {sys.version.split()[0]} has no tarfile filter (3.11.4+); the hand branch runs")
    else:
        monkeypatch.delattr(tarfile, "data_filter", raising=False)
    return str(request.param)


def test_unpack_of_a_good_sdist_on_both_branches(branch: str, tmp_path: Path) -> None:
    """A plain sdist unpacks; folder modes keep folders traversable; in-tree links are kept."""
    bs = build_script()
    archive = _tar(tmp_path / "pkg-1.0.tar.gz", SDIST)
    src = bs.unpack(archive, tmp_path / "work" / "src")
    assert src.name == "pkg-1.0" and (src / "pyproject.toml").is_file()
    assert (src / "ro" / "data.txt").read_text() == "x"  # would raise PermissionError under a 0o444 folder
    assert (src / "ro").stat().st_mode & 0o700 == 0o700
    assert (src / "alias.toml").read_text() == (src / "pyproject.toml").read_text()
    assert (src / "pyproject.toml").stat().st_mode & 0o7777 == 0o644


@pytest.mark.parametrize("case", sorted(HOSTILE))
def test_hostile_members_are_refused_and_nothing_is_left(branch: str, case: str, tmp_path: Path) -> None:
    """A hostile archive: the unpack stops with a message naming the archive; nothing lands outside the
    work folder and no half-unpacked tree is left to be taken for a source tree on the next run."""
    bs = build_script()
    archive = _tar(tmp_path / "evil.tar.gz", [*SDIST[:2], *HOSTILE[case]])
    dest = tmp_path / "a" / "b" / "src"
    before = set(tmp_path.rglob("*"))
    with pytest.raises(SystemExit) as exc:
        bs.unpack(archive, dest)
    assert "refusing to unpack" in str(exc.value) and "evil.tar.gz" in str(exc.value)
    assert not dest.exists()
    assert set(tmp_path.rglob("*")) - before <= {tmp_path / "a", tmp_path / "a" / "b"}
    assert not Path("/tmp/llmopt-evil-abs.txt").exists()


def test_script_unpacks_on_this_python_in_a_fresh_process(tmp_path: Path) -> None:
    """The script's download/unpack/build path as a fresh clone runs it, on the venv's Python (3.11.2
    here, before tarfile's filter): the sdist is given (no network), unpacked, and the first build step
    it would take is reached. Old code: TypeError: extractall() got an unexpected keyword 'filter'."""
    archive = _tar(tmp_path / "pkg-1.0.tar.gz", SDIST)
    code = (
        "import importlib.util, sys; from pathlib import Path\n"
        f"spec = importlib.util.spec_from_file_location('b', {str(SCRIPT)!r})\n"
        "b = importlib.util.module_from_spec(spec)\n"
        "spec.loader.exec_module(b)\n"
        f"src = b.unpack(Path({str(archive)!r}), Path({str(tmp_path / 'src')!r}))\n"
        "print(sys.version_info[:3], src.name, (src / 'pyproject.toml').is_file())\n"
    )
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr
    assert "pkg-1.0 True" in proc.stdout
