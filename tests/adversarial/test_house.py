"""The new house (issue 13) as a careless or hostile user meets it: ``--json`` / ``--json-file`` on every command,
``-O key=value`` with odd values, hand-edited manifests through eval, run reuse and publish, the model card of
each format. Real processes from a working folder of their own, relative paths.
"""

from __future__ import annotations

import json
import os
import stat
from pathlib import Path

import pytest

from llmopt.errors import EXIT_OK
from tests.helpers import run_cli


@pytest.mark.skipif(not hasattr(os, "mkfifo"), reason="needs named pipes")
def test_json_file_into_a_named_pipe_writes_into_it_and_keeps_the_pipe(tmp_path: Path) -> None:
    """``--json-file PIPE`` (or /dev/stderr, /dev/null): the atomic write (temp file + rename) put a plain file
    where the pipe was, so the reader got nothing; run as root with /dev/null or /dev/full, it replaced the
    device node itself."""
    os.mkfifo(tmp_path / "pipe")
    # a reader that is already there, without blocking: the writer's open then succeeds at once
    fd = os.open(tmp_path / "pipe", os.O_RDONLY | os.O_NONBLOCK)
    try:
        r = run_cli(["backends", "--json-file", "pipe"], cwd=tmp_path)
        assert r.returncode == EXIT_OK, r.stderr[-2000:]
        assert stat.S_ISFIFO(os.stat(tmp_path / "pipe").st_mode), "the pipe was replaced by a file"
        chunks = []
        while chunk := os.read(fd, 1 << 16):
            chunks.append(chunk)
    finally:
        os.close(fd)
    names = {b["name"] for b in json.loads(b"".join(chunks))}
    assert "bnb-int8" in names
