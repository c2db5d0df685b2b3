"""``llmopt backends``: what is installed and usable here."""

from __future__ import annotations

import typer
from rich.markup import escape
from rich.table import Table

from llmopt.cli._common import JsonCommand, JsonFileOpt, JsonOpt, JsonOutput, stdout


def register(app: typer.Typer) -> None:
    @app.command("backends", cls=JsonCommand)
    def backends_cmd(
        json_out: JsonOpt = False,
        json_file: JsonFileOpt = None,
    ) -> None:
        """List every quantization backend, whether it is usable here, and how to install what is missing."""
        from llmopt.backends import available_backends

        out = JsonOutput(json_out, json_file)
        out.check()
        infos = available_backends()
        if out.to_stdout or out.to_file:
            out.emit(
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
                ]
            )
        if not out.human:
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
