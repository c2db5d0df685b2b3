"""``llmopt report merge``: one report from the report.json files of several runs."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from llmopt.cli._common import stdout, write_json


def register(app: typer.Typer) -> None:
    report_app = typer.Typer(help="Combine run reports.", no_args_is_help=True)

    @report_app.command("merge")
    def merge_cmd(
        results: Annotated[list[Path], typer.Argument(help="report.json files, or the folders `llmopt run` wrote.")],
        output: Annotated[Path, typer.Option("--output", "-o", help="Folder for the merged report.")],
        json_out: Annotated[bool, typer.Option("--json", help="Print the merged report as JSON.")] = False,
    ) -> None:
        """Merge RESULTS (e.g. one per CI job) into OUTPUT/report.json, report.md and plots.

        Refuses reports measured on different tokens or windows. Exits 0 when merged, whatever the gates say
        (the merged report's exit_code field has the combined verdict).
        """
        from llmopt.cli.run import render_run
        from llmopt.report import merge_reports

        report = merge_reports(list(results), output)
        if json_out:
            write_json(report.to_json(), "-")
            return
        render_run(report)
        stdout.print(f"merged {len(results)} report(s) into {output / 'report.md'}")

    app.add_typer(report_app, name="report")
