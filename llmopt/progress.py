"""Progress for long steps: rich bars in a terminal, a few plain lines elsewhere (CI, pipes)."""

from __future__ import annotations

import os
import sys
import time
from collections.abc import Iterator
from contextlib import AbstractContextManager, contextmanager
from typing import Protocol


class Step(Protocol):
    def advance(self, n: float = 1) -> None: ...


class Reporter(Protocol):
    def step(self, description: str, total: float | None = None) -> AbstractContextManager[Step]: ...

    def info(self, message: str) -> None: ...


class _NullStep:
    def advance(self, n: float = 1) -> None:
        return None


class SilentReporter:
    """For library use and tests: reports nothing."""

    @contextmanager
    def step(self, description: str, total: float | None = None) -> Iterator[Step]:
        yield _NullStep()

    def info(self, message: str) -> None:
        return None


class LineReporter:
    """One line when a step starts and one when it ends, on stderr: readable in CI logs."""

    @contextmanager
    def step(self, description: str, total: float | None = None) -> Iterator[Step]:
        start = time.perf_counter()
        print(f"[llmopt] {description} ...", file=sys.stderr, flush=True)
        yield _NullStep()
        print(f"[llmopt] {description}: done in {time.perf_counter() - start:.1f} s", file=sys.stderr, flush=True)

    def info(self, message: str) -> None:
        print(f"[llmopt] {message}", file=sys.stderr, flush=True)


class RichReporter:
    """Spinners/bars on stderr for interactive terminals."""

    def __init__(self) -> None:
        from rich.console import Console

        self.console = Console(stderr=True)

    @contextmanager
    def step(self, description: str, total: float | None = None) -> Iterator[Step]:
        from rich.progress import BarColumn, Progress, SpinnerColumn, TextColumn, TimeElapsedColumn

        columns = [SpinnerColumn(), TextColumn("{task.description}"), BarColumn(), TimeElapsedColumn()]
        start = time.perf_counter()
        with Progress(*columns, console=self.console, transient=True) as progress:
            task = progress.add_task(description, total=total)

            class _RichStep:
                def advance(self, n: float = 1) -> None:
                    progress.advance(task, n)

            yield _RichStep()
        self.console.print(f"[green]✓[/] {description} [dim]({time.perf_counter() - start:.1f} s)[/]")

    def info(self, message: str) -> None:
        self.console.print(f"[dim]{message}[/]")


def default_reporter(quiet: bool = False) -> Reporter:
    if quiet:
        return SilentReporter()
    if sys.stderr.isatty() and not os.environ.get("CI"):
        return RichReporter()
    return LineReporter()
