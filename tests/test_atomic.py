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
