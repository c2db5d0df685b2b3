"""Stale staging folders: left by a killed library caller, swept by the next quantize into the same place."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

from llmopt.api import sweep_stale_partials


def _dead_pid() -> int:
    proc = subprocess.Popen([sys.executable, "-c", "pass"])
    proc.wait()
    return proc.pid


def test_only_folders_of_dead_processes_for_this_output_are_removed(tmp_path: Path) -> None:
    out = tmp_path / "art"
    dead = _dead_pid()
    live = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        stale_partial = tmp_path / f".art.llmopt-partial-{dead}"
        stale_old = tmp_path / f".art.llmopt-old-{dead}"
        running = tmp_path / f".art.llmopt-partial-{live.pid}"
        other_output = tmp_path / f".other.llmopt-partial-{dead}"
        not_ours = tmp_path / ".art.llmopt-partial-backup"
        for folder in (stale_partial, stale_old, running, other_output, not_ours):
            folder.mkdir()
            (folder / "model.safetensors").write_bytes(b"x")
        removed = sweep_stale_partials(out)
        assert sorted(removed) == sorted([stale_partial, stale_old])
        assert not stale_partial.exists() and not stale_old.exists()
        assert running.is_dir() and other_output.is_dir() and not_ours.is_dir()
    finally:
        live.kill()
        live.wait()


def test_nothing_to_sweep(tmp_path: Path) -> None:
    assert sweep_stale_partials(tmp_path / "art") == []
    assert sweep_stale_partials(tmp_path / "missing-parent" / "art") == []
