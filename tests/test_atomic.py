"""Atomic writes keep the mode a plain write would give (mkstemp alone leaves files 0600)."""

from __future__ import annotations

import os
import stat
from pathlib import Path

import pytest

from llmopt.atomic import write_json_atomic, write_text_atomic
from llmopt.report import write_report
from llmopt.results import RunReport


@pytest.mark.parametrize("umask", [0o022, 0o002, 0o077])
def test_atomic_writes_follow_the_umask(tmp_path: Path, umask: int) -> None:
    old = os.umask(umask)
    try:
        write_json_atomic(tmp_path / "a.json", {"x": 1})
        write_text_atomic(tmp_path / "b.md", "text")
        plain = tmp_path / "plain.txt"
        plain.write_text("x")
    finally:
        os.umask(old)
    want = stat.S_IMODE(plain.stat().st_mode)
    assert want == 0o666 & ~umask
    for name in ("a.json", "b.md"):
        assert stat.S_IMODE((tmp_path / name).stat().st_mode) == want, name
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a.json", "b.md", "plain.txt"]  # no temp files left


def test_a_run_report_is_readable_by_the_group(tmp_path: Path) -> None:
    """A run folder shared with a team: report.json and report.md were 0600 (owner only)."""
    old = os.umask(0o022)
    try:
        write_report(RunReport(), tmp_path, plots=False)
    finally:
        os.umask(old)
    for name in ("report.json", "report.md"):
        assert stat.S_IMODE((tmp_path / name).stat().st_mode) == 0o644, name


MKSTEMP_BACKEND = """
    import os, shutil, tempfile
    from pydantic import BaseModel, ConfigDict
    from llmopt.backends import Backend, FormatCard

    class MkstempOptions(BaseModel):
        model_config = ConfigDict(extra="forbid")

    class MkstempBackend(Backend):
        '''Writes its weights the way GPTQModel does: through mkstemp (0600), then renamed into place.'''
        name = "mkstempfmt"
        format = "mkstempfmt"
        runner = "hf"
        Options = MkstempOptions

        def quantize(self, inputs):
            for f in inputs.source.path.iterdir():
                if f.is_file() and f.suffix != ".safetensors":
                    shutil.copy(f, inputs.out_dir / f.name)
            fd, tmp = tempfile.mkstemp(dir=inputs.out_dir)
            with os.fdopen(fd, "wb") as out, open(inputs.source.path / "model.safetensors", "rb") as src:
                shutil.copyfileobj(src, out)
            os.replace(tmp, inputs.out_dir / "model.safetensors")
            return {}

        def format_card(self, options, repo_id, revision=None):
            return FormatCard(format=self.format, library_name="x", tags=[], bits=None, bit_width=None, load=[])
"""


def test_an_artifact_written_through_mkstemp_gets_plain_modes(assets: dict[str, Path], tmp_path: Path) -> None:
    """GPTQModel writes model.safetensors 0600: a model folder shared with a team, or served by another user,
    could not read the artifact's weights. Every file of an artifact gets the mode a plain write gives."""
    from tests.helpers import first_layers, run_cli
    from tests.test_backends import plugin_site

    site = plugin_site(tmp_path, "[llmopt.backends]\nmkstempfmt = plugin_mkstemp:MkstempBackend\n",
                       {"plugin_mkstemp": MKSTEMP_BACKEND})  # fmt: skip
    model = first_layers(assets["model"], tmp_path / "smollm2-1l", 1)
    env = {"PYTHONPATH": os.pathsep.join([str(Path(__file__).resolve().parents[1]), str(site)])}
    old = os.umask(0o022)
    try:
        made = run_cli(["quantize", str(model), "-m", "mkstempfmt", "-o", "art", "-q"], cwd=tmp_path, env=env)
    finally:
        os.umask(old)
    assert made.returncode == 0, made.stderr
    modes = {p.name: stat.S_IMODE(p.stat().st_mode) for p in (tmp_path / "art").iterdir() if p.is_file()}
    assert "model.safetensors" in modes and set(modes.values()) == {0o644}, modes


@pytest.mark.parametrize("umask", [0o022, 0o077])
def test_give_plain_modes_follows_the_umask(tmp_path: Path, umask: int) -> None:
    from llmopt.atomic import give_plain_modes

    (tmp_path / "sub").mkdir()
    for name in ("a", "sub/b"):
        (tmp_path / name).write_text("x")
        os.chmod(tmp_path / name, 0o600)
    old = os.umask(umask)
    try:
        give_plain_modes(tmp_path)
    finally:
        os.umask(old)
    assert {stat.S_IMODE((tmp_path / n).stat().st_mode) for n in ("a", "sub/b")} == {0o666 & ~umask}


def test_a_dequantized_gguf_folder_gets_plain_modes(assets: dict[str, Path], tmp_path: Path) -> None:
    """prepare_assets (and a .gguf given as a model) wrote the folder 0700 and model.safetensors 0600: another user
    of a shared cache, or a server running as one, could not read it."""
    from llmopt.source import dequantize_gguf

    old = os.umask(0o022)
    try:
        dequantize_gguf(assets["gguf"], tmp_path / "model")
    finally:
        os.umask(old)
    assert stat.S_IMODE((tmp_path / "model").stat().st_mode) == 0o755
    modes = {p.name: stat.S_IMODE(p.stat().st_mode) for p in (tmp_path / "model").iterdir()}
    assert "model.safetensors" in modes and set(modes.values()) == {0o644}, modes
