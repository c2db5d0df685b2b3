"""``llmopt backends``: what is installed and usable here."""

from __future__ import annotations

from typing import Annotated, Any

import typer
from rich.markup import escape
from rich.table import Table

from llmopt.cli._common import stdout, write_json


def _as_typed(value: Any) -> str:
    """A default as it would be written after -O name= (lists comma-separated, none for unset)."""
    if value is None:
        return "none"
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, list | tuple):
        return ",".join(str(v) for v in value) if value else "(empty)"
    return str(value)


def _options(method: str, json_out: bool) -> None:
    """Every option of METHOD's backend (its options model): name, type, default, the flag that also sets it."""
    from llmopt.backends.base import describe_backend
    from llmopt.cli.quantize import OPTION_FLAGS

    backend = describe_backend(method)
    schema = backend.option_schema()
    if json_out:
        write_json(
            {
                "method": method,
                "format": backend.format,
                "options": [{**o.model_dump(mode="json"), "flag": OPTION_FLAGS.get(o.name)} for o in schema],
            },
            "-",
        )
        return
    table = Table(title=f"options of {method} (-O name=value)")
    for col in ("option", "type", "default", "flag", "help"):
        table.add_column(col)
    for o in schema:
        default = "(required)" if o.required else _as_typed(o.default)
        flag = OPTION_FLAGS.get(o.name) or ""
        table.add_row(*(escape(v) for v in (o.name, o.type, default, flag, o.help)))
    stdout.print(table)


def register(app: typer.Typer) -> None:
    @app.command("backends")
    def backends_cmd(
        json_out: Annotated[bool, typer.Option("--json", help="Print JSON to stdout.")] = False,
        options: Annotated[
            str | None,
            typer.Option("--options", metavar="METHOD", help="List the options of one backend (for -O name=value)."),
        ] = None,
    ) -> None:
        """List every quantization backend, whether it is usable here, and how to install what is missing."""
        from llmopt.backends import available_backends

        if options is not None:
            _options(options, json_out)
            return
        infos = available_backends()
        if json_out:
            write_json(
                [
                    {
                        "name": i.name,
                        "usable": i.usable,
                        "format": getattr(i.backend, "format", None),
                        "needs_calibration": getattr(i.backend, "needs_calibration", None),
                        "origin": i.origin,
                        "problems": i.problems,
                        "note": getattr(i.backend, "note", None),
                    }
                    for i in infos
                ],
                "-",
            )
            return
        table = Table(title="llmopt backends")
        for col in ("method", "usable", "format", "what it is / what is missing"):
            table.add_column(col)
        for i in infos:
            fmt = getattr(i.backend, "format", "?")
            text = "\n".join(i.problems) if i.problems else getattr(i.backend, "description", "")
            note = getattr(i.backend, "note", None)
            if not i.problems and note:
                text = f"{text}\n{note}"
            # escape: install hints hold "llmopt[gguf]", which rich would take for a style tag and drop
            table.add_row(i.name, "[green]yes[/]" if i.usable else "[red]no[/]", escape(fmt), escape(text))
        stdout.print(table)
