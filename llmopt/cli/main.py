"""Typer app and the one place where errors become messages and exit codes."""

from __future__ import annotations

import contextlib
import os
import signal
import sys
from typing import Annotated, Any, NoReturn

import typer

from llmopt import __version__, interrupt
from llmopt._thirdparty import quiet_console
from llmopt.errors import EXIT_INPUT, EXIT_INTERRUPTED, LlmoptError

app = typer.Typer(
    name="llmopt",
    help="Quantize Hugging Face causal LMs, measure them against FP16, gate, publish.",
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    add_completion=False,
)


def _version(value: bool) -> None:
    if value:
        typer.echo(f"llmopt {__version__}")
        raise typer.Exit()


@app.callback()
def _root(
    version: Annotated[
        bool, typer.Option("--version", callback=_version, is_eager=True, help="Print the version and exit.")
    ] = False,
) -> None:
    """Exit codes: 0 ok, 1 bug, 2 bad input, 3 gate failed, 4 backend unavailable, 5 artifact
    mismatch, 130 interrupted."""


from llmopt.cli import backends as _backends  # noqa: E402
from llmopt.cli import bench as _bench  # noqa: E402
from llmopt.cli import estimate as _estimate  # noqa: E402
from llmopt.cli import evaluate as _evaluate  # noqa: E402
from llmopt.cli import plan as _plan  # noqa: E402
from llmopt.cli import publish as _publish  # noqa: E402
from llmopt.cli import quantize as _quantize  # noqa: E402
from llmopt.cli import recipe as _recipe  # noqa: E402
from llmopt.cli import report as _report  # noqa: E402
from llmopt.cli import run as _run  # noqa: E402
from llmopt.cli import serve_bench as _serve_bench  # noqa: E402
from llmopt.cli import speculate as _speculate  # noqa: E402

_backends.register(app)
_quantize.register(app)
_evaluate.register(app)
_bench.register(app)
_serve_bench.register(app)
_estimate.register(app)
_speculate.register(app)
_run.register(app)
_publish.register(app)
_plan.register(app)
_recipe.register(app)
_report.register(app)


_INTERRUPTED = "interrupted: nothing was written (partial output removed)."


_signals_seen = 0


def _on_signal(signum: int, frame: Any) -> None:
    # The first Ctrl-C/SIGTERM interrupts; a second one while that one is being cleaned up (CI runners and
    # `docker stop` repeat SIGTERM) must not cut the cleanup short or end the process by the signal (exit 143);
    # a third forces the exit.
    global _signals_seen
    _signals_seen += 1
    if _signals_seen == 1:
        interrupt.request()
        raise KeyboardInterrupt
    if _signals_seen >= 3:
        os._exit(EXIT_INTERRUPTED)


def _unraisable(info: Any) -> None:
    # A Ctrl-C that lands in a finalizer is recorded by _on_signal and acted on later (interrupt.check);
    # Python's "Exception ignored ... KeyboardInterrupt" traceback would only confuse.
    if isinstance(info.exc_value, KeyboardInterrupt):
        return
    sys.__unraisablehook__(info)


def _exit_interrupted(own_process: bool, *, message: bool = True) -> NoReturn:
    """Exit 130 after an interrupt, without the abort GPTQModel's worker threads can cause at interpreter exit.

    GPTQModel runs its GPTQ solves and packing on daemon threads. Interrupted mid-layer, they are still inside
    torch's C++ code when the interpreter finalizes; CPython then ends each of them with pthread_exit, whose
    forced unwinding through torch's noexcept frames calls std::terminate ("terminate called without an
    active exception", SIGABRT, exit 134) after llmopt had cleaned up. So the exit handlers run (GPTQModel's
    temp-folder removal, log flushing) and the process ends without finalization.
    In-process callers (tests, ``main(argv)``) keep an ordinary SystemExit.
    """
    if own_process:
        # Interpreter shutdown restores the default handlers: a signal arriving then would end the process
        # by that signal (143 for SIGTERM) instead of 130.
        for sig in (signal.SIGINT, signal.SIGTERM):
            signal.signal(sig, signal.SIG_IGN)
    if message:
        typer.secho(_INTERRUPTED, fg="yellow", err=True)
    # Always end an interrupted CLI process this way: interpreter finalization can also end it by SIGINT (-2)
    # when the KeyboardInterrupt surfaced in a finalizer or thread (seen under load), instead of 130.
    if own_process:
        import atexit

        for stream in (sys.stdout, sys.stderr):
            with contextlib.suppress(OSError, ValueError):
                stream.flush()
        atexit._run_exitfuncs()
        os._exit(EXIT_INTERRUPTED)
    sys.exit(EXIT_INTERRUPTED)


def _usage_error_types() -> tuple[type[BaseException], ...]:
    """Typer's usage errors: ``typer.TyperException`` from Typer 0.28 on (it vendors click), click's before."""
    types: list[type[BaseException]] = []
    if hasattr(typer, "TyperException"):
        types.append(typer.TyperException)
    try:
        import click

        types.append(click.exceptions.ClickException)
    except ImportError:
        pass
    return tuple(types)


def _abort_types() -> tuple[type[BaseException], ...]:
    types: list[type[BaseException]] = [KeyboardInterrupt, typer.Abort]
    try:
        import click

        types.append(click.exceptions.Abort)
    except ImportError:
        pass
    return tuple(types)


def main(argv: list[str] | None = None) -> None:
    global _signals_seen
    _signals_seen = 0
    signal.signal(signal.SIGTERM, _on_signal)
    signal.signal(signal.SIGINT, _on_signal)
    sys.unraisablehook = _unraisable
    debug = os.environ.get("LLMOPT_DEBUG") == "1"
    quiet_console()
    own_process = argv is None  # the console script or `python -m llmopt`, not a caller in the same process
    try:
        rv = app(args=argv, standalone_mode=False)
    except LlmoptError as exc:
        if debug:
            raise
        typer.secho(f"error: {exc.message}", fg="red", err=True)
        if exc.hint:
            typer.echo(f"  -> {exc.hint}", err=True)
        if exc.exit_code == EXIT_INTERRUPTED:
            _exit_interrupted(own_process, message=False)
        sys.exit(exc.exit_code)
    except _abort_types():
        _exit_interrupted(own_process)
    except _usage_error_types() as exc:
        show = getattr(exc, "show", None)
        if callable(show):
            show()
        else:
            typer.echo(f"error: {exc}", err=True)
        code = getattr(exc, "exit_code", EXIT_INPUT)
        sys.exit(code if isinstance(code, int) and code else EXIT_INPUT)
    if rv == EXIT_INTERRUPTED:
        # Typer 0.28+ turns KeyboardInterrupt (Ctrl-C, and SIGTERM through _on_sigterm) into exit code 130
        # itself, without a word; older versions raise Abort, handled above.
        _exit_interrupted(own_process)
    sys.exit(rv if isinstance(rv, int) else 0)
