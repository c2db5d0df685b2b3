"""Options and helpers shared by commands."""

from __future__ import annotations

import contextlib
import json
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Annotated, Any

import typer
from rich.console import Console

# Tables stay readable when piped or in CI logs, where rich would otherwise assume 80 columns.
stdout = Console(width=None if sys.stdout.isatty() else 140)
stderr = Console(stderr=True, width=None if sys.stderr.isatty() else 140)

DeviceOpt = Annotated[
    str,
    typer.Option(
        "--device",
        help="cpu; cuda:N (that GPU only); cuda (every visible GPU: layers split over them, balanced by weight "
        "bytes); cuda:0,1 (split over those); auto (default: CPU without GPU, else GPU 0 when the model fits in "
        "80% of its free memory, else like cuda).",
    ),
]
QuietOpt = Annotated[bool, typer.Option("--quiet", "-q", help="No progress output.")]


@contextlib.contextmanager
def stdout_is_ours() -> Iterator[None]:
    """Around a library call: whatever writes to ``sys.stdout`` meanwhile (GPTQModel's logger and its save
    messages, transformers' prints) goes to stderr, so stdout carries only llmopt's tables and JSON
    (``--json`` output stays parseable)."""
    sys.stdout.flush()
    with contextlib.redirect_stdout(sys.stderr):
        yield


def check_json_target(target: str | None, *inputs: str | Path | None) -> None:
    """Before any work: refuse a ``--json`` path that is a folder, inside an artifact, one of ``inputs``, a file
    that is not JSON, or not writable (``llmopt.outputs.check_report_file``)."""
    if target is None:
        return
    from llmopt.outputs import check_report_file

    check_report_file(target, inputs)


def write_json(data: Any, target: str) -> None:
    """Write JSON to a file (whole or not at all), or to stdout when ``target`` is '-'."""
    if target == "-":
        sys.stdout.write(json.dumps(data, indent=2, default=str) + "\n")
    else:
        from llmopt.artifact import write_json_atomic

        write_json_atomic(Path(target).expanduser(), data)


def human_bytes(n: float | None) -> str:
    if n is None:
        return "-"
    for unit in ("B", "KB", "MB", "GB", "TB"):
        if abs(n) < 1000 or unit == "TB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1000
    return f"{n:.1f} TB"
