"""GPTQModel 7.3.x's import-time ``git rev-parse`` leaves no "fatal: not a git repository" in a run's log."""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

import pytest

from llmopt._thirdparty import quiet_git_probe

pytestmark = pytest.mark.skipif(shutil.which("git") is None, reason="needs git")

# what gptqmodel/_banner.py of 7.3.6 runs at import, from the current folder
PROBE = ["git", "rev-parse", "--short", "HEAD"]


def test_git_probe_outside_a_work_tree_is_silent_only_inside_the_block(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capfd: pytest.CaptureFixture[str]
) -> None:
    original = subprocess.check_output
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("GIT_CEILING_DIRECTORIES", str(tmp_path.parent))
    with pytest.raises(subprocess.CalledProcessError):
        subprocess.check_output(PROBE)
    assert "not a git repository" in capfd.readouterr().err  # the line the block exists to drop

    with quiet_git_probe(), pytest.raises(subprocess.CalledProcessError):
        subprocess.check_output(PROBE)
    assert capfd.readouterr().err == ""

    # after the block, and for other programs inside it, nothing is changed
    assert subprocess.check_output is original
    with quiet_git_probe():
        out = subprocess.check_output(["sh", "-c", "echo kept >&2; echo out"])
    assert out == b"out\n"
    assert "kept" in capfd.readouterr().err
    with pytest.raises(subprocess.CalledProcessError):
        subprocess.check_output(PROBE)
    assert "not a git repository" in capfd.readouterr().err


def test_an_explicit_stderr_is_kept(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("GIT_CEILING_DIRECTORIES", str(tmp_path.parent))
    with quiet_git_probe():
        done = subprocess.run(PROBE, capture_output=True, text=True, check=False)
        with pytest.raises(subprocess.CalledProcessError) as caught:
            subprocess.check_output(PROBE, stderr=subprocess.PIPE)
    assert "not a git repository" in done.stderr
    assert b"not a git repository" in caught.value.stderr
