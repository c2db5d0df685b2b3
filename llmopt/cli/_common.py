"""Options and helpers shared by commands."""

from __future__ import annotations

import contextlib
import json
import os
import shlex
import sys
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Annotated, Any

import typer
from rich.console import Console
from typer.core import TyperCommand

from llmopt.errors import InputError

# Tables stay readable when piped or in CI logs, where rich would otherwise assume 80 columns.
# a stream closed by the caller (`llmopt ... >&-`) is None here: no terminal, and rich writes nothing to it
stdout = Console(width=None if sys.stdout is not None and sys.stdout.isatty() else 140)
stderr = Console(stderr=True, width=None if sys.stderr is not None and sys.stderr.isatty() else 140)

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
TasksOpt = Annotated[
    str | None,
    typer.Option(
        "--tasks",
        help="Downstream accuracy: lm-eval task names and/or local task YAML files, comma-separated, run on the "
        "baseline and the artifact (needs llmopt[tasks]; docs/tasks.md).",
    ),
]
TaskLimitOpt = Annotated[
    int | None, typer.Option("--task-limit", help="Examples per task (the first N, the same for both models).")
]
MinRecoveryOpt = Annotated[
    float | None,
    typer.Option(
        "--min-recovery",
        help="Gate: smallest task accuracy recovery (artifact / FP16, on acc_norm else acc) of each --tasks task.",
    ),
]


@contextlib.contextmanager
def stdout_is_ours() -> Iterator[None]:
    """Around a library call: whatever writes to ``sys.stdout`` meanwhile (GPTQModel's logger and its save
    messages, transformers' prints) goes to stderr, so stdout carries only llmopt's tables and JSON
    (``--json`` output stays parseable)."""
    sys.stdout.flush()
    with contextlib.redirect_stdout(sys.stderr):
        yield


def check_json_target(
    target: str | None, *inputs: str | Path | None, flag: str = "--json-file", creates: Path | None = None
) -> None:
    """Before any work: refuse a JSON file path that is a folder, inside an artifact, one of ``inputs``, a file
    that is not JSON, or not writable (``llmopt.outputs.check_report_file``); also one inside ``creates``, the
    folder the command is about to write (an artifact folder holds only the files its manifest lists)."""
    if target is None or target == "-":
        return
    from llmopt.errors import OutputPathError
    from llmopt.outputs import absolute, check_report_file

    if creates is not None:
        folder, file = absolute(creates), absolute(target)
        if folder == file or folder in file.parents:
            raise OutputPathError(
                f"{flag} {target} is "
                + ("" if folder == file else "inside ")
                + f"{creates}, the folder this command writes.",
                f"Write the JSON next to it, e.g. {flag} {shlex.quote(folder.name + '.json')}.",
            )
    check_report_file(target, inputs, flag=flag)


# --- machine-readable output ---------------------------------------------------------------------------------
# One convention for every command: --json prints the result as JSON to stdout and nothing else goes there
# (progress, notes and errors go to stderr); --json-file PATH writes the same JSON to a file and leaves the
# human output where it was. Before this, eval and bench took `--json FILE` (`-` for stdout) while the other
# commands took a bare switch; those two commands still accept the old spelling for a release, with a note.

JsonOpt = Annotated[
    bool,
    typer.Option("--json", help="Print the result as JSON to stdout; nothing else goes there (messages: stderr)."),
]
JsonFileOpt = Annotated[
    str | None,
    typer.Option(
        "--json-file", metavar="PATH", help="Write the result as JSON to PATH (whole or not at all; - = stdout)."
    ),
]


@dataclass(frozen=True)
class JsonOutput:
    """Where a command's JSON goes: stdout (``--json``), a file (``--json-file``), both or neither."""

    stdout: bool = False
    file: str | None = None

    @property
    def to_stdout(self) -> bool:
        return self.stdout or self.file == "-"

    @property
    def to_file(self) -> str | None:
        return None if self.file in (None, "-") else self.file

    @property
    def human(self) -> bool:
        """Tables and messages on stdout only when the JSON is not there."""
        return not self.to_stdout

    def check(self, *inputs: str | Path | None, creates: Path | None = None) -> None:
        if self.to_stdout:
            _require_stdout()
        check_json_target(self.to_file, *inputs, creates=creates)

    def emit(self, data: Any) -> None:
        """Write ``data`` (plain JSON data, a pydantic model, or a typed report with ``to_json()``)."""
        if not (self.to_file or self.to_stdout):
            return
        data = _jsonable(data)
        if self.to_file:
            write_json(data, self.to_file)
        if self.to_stdout:
            write_json(data, "-")


def _jsonable(data: Any) -> Any:
    to_json = getattr(data, "to_json", None)
    if callable(to_json):
        return to_json()
    model_dump = getattr(data, "model_dump", None)
    if callable(model_dump):
        return model_dump(mode="json")
    return data


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


def _legacy_json_args(args: list[str]) -> tuple[list[str], list[str]]:
    """eval/bench's old ``--json FILE`` / ``--json -`` as ``--json-file FILE`` / ``--json``, and the notes to
    print about them."""
    out: list[str] = []
    notes: list[str] = []
    i = 0
    while i < len(args):
        arg = args[i]
        if arg == "--":
            out += args[i:]
            break
        value: str | None = None
        if arg.startswith("--json="):
            value = arg.partition("=")[2]
        elif arg == "--json" and i + 1 < len(args) and (args[i + 1] == "-" or not args[i + 1].startswith("-")):
            value = args[i + 1]
            i += 1
        if value is None:
            out.append(arg)
        elif value == "-":
            notes.append(_deprecated("--json -", "--json"))
            out.append("--json")
        else:
            notes.append(_deprecated(f"--json {value}", f"--json-file {value}"))
            out += ["--json-file", value]
        i += 1
    return out, notes


def _deprecated(old: str, new: str) -> str:
    return (
        f"note: `{old}` is deprecated and goes away in a later release; write `{new}` "
        "(--json alone prints JSON to stdout, in every command)."
    )


def _missing_argument(exc: BaseException) -> bool:
    kind = getattr(exc, "param_type", None) or getattr(getattr(exc, "param", None), "param_type_name", None)
    return type(exc).__name__ == "MissingParameter" and kind == "argument"


class JsonCommand(TyperCommand):
    """Every command's class: a value after the ``--json`` switch gets a message naming ``--json-file``."""

    legacy_json_value = False

    def parse_args(self, ctx: Any, args: list[str]) -> list[str]:
        given = list(args)  # click's parser consumes the list it is handed
        if self.legacy_json_value:
            legacy, notes = _legacy_json_args(given)
            if notes:
                try:
                    rest = super().parse_args(ctx, legacy)
                except _usage_error_types() as exc:
                    # `eval --json ART ...`: the word after the switch was the command's own argument
                    if not _missing_argument(exc):
                        for note in notes:
                            typer.echo(note, err=True)
                        raise
                else:
                    for note in notes:
                        typer.echo(note, err=True)
                    return rest
        try:
            return super().parse_args(ctx, list(given))
        except _usage_error_types() as exc:
            stray = _value_after_json(given)
            if stray == "-":
                raise InputError(
                    "--json takes no value: it already prints JSON to stdout; got '-' after it.",
                    "Drop the '-': --json alone.",
                ) from None
            if stray is not None and (stray in str(exc) or f"--json={stray}" in given):
                raise InputError(
                    f"--json takes no value (it prints JSON to stdout); got '{stray}' after it.",
                    f"Write the JSON to a file with --json-file {shlex.quote(stray)}.",
                ) from None
            raise


class LegacyJsonCommand(JsonCommand):
    """eval and bench: ``--json FILE`` and ``--json -`` still work (one release), with a note on stderr."""

    legacy_json_value = True


def _value_after_json(args: list[str]) -> str | None:
    for i, arg in enumerate(args):
        if arg == "--":
            break
        if arg.startswith("--json="):
            return arg.partition("=")[2]
        # `-` (stdout, the old spelling of eval/bench) too: it is a value, not an option
        if arg == "--json" and i + 1 < len(args) and (args[i + 1] == "-" or not args[i + 1].startswith("-")):
            return args[i + 1]
    return None


def _require_stdout() -> None:
    """The JSON goes to stdout: refuse a closed one (``llmopt ... --json >&-``), where Python has no stream."""
    if sys.stdout is None:
        from llmopt.errors import OutputPathError

        raise OutputPathError("--json prints to stdout, which is closed.", "Use --json-file PATH, or keep stdout open.")


def write_json(data: Any, target: str) -> None:
    """Write JSON to a file (whole or not at all), or to stdout when ``target`` is '-'."""
    if target == "-":
        _require_stdout()
        sys.stdout.write(json.dumps(data, indent=2, default=str) + "\n")
        return
    from llmopt.artifact import write_json_atomic
    from llmopt.errors import OutputPathError
    from llmopt.outputs import is_no_space, is_stream

    text = json.dumps(data, indent=2, default=str) + "\n"
    try:
        if is_stream(target):
            with open(Path(target).expanduser(), "w", encoding="utf-8") as f:
                f.write(text)
        else:
            # through a symlink to the file it names (the checks judged that one): replacing the link itself
            # would leave the file it points to stale and the link turned into a copy
            write_json_atomic(Path(os.path.realpath(Path(target).expanduser())), data)
    except OSError as e:
        reason = "no space left on device" if is_no_space(e) else (e.strerror or str(e))
        raise OutputPathError(f"cannot write the JSON to {target}: {reason}.", "Choose another --json-file.") from e


def invalid_option(exc: Any, what: str, hint: str) -> InputError:
    """The first error of a pydantic ValidationError from a command's settings, named by its flag."""
    err = exc.errors()[0]
    field = "--" + str(err["loc"][0]).replace("_", "-") if err.get("loc") else what
    return InputError(f"{field}: {err['msg']}.", hint)


def human_bytes(n: float | None) -> str:
    if n is None:
        return "-"
    for unit in ("B", "KB", "MB", "GB", "TB"):
        if abs(n) < 1000 or unit == "TB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1000
    return f"{n:.1f} TB"
