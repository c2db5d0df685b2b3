"""``llmopt plan``: one job per recipe variant, for a CI matrix or another scheduler."""

from __future__ import annotations

import json
from enum import StrEnum
from pathlib import Path
from typing import Annotated

import typer

from llmopt.cli._common import JsonCommand, JsonFileOpt, JsonOutput, write_json
from llmopt.errors import InputError


class PlanFormat(StrEnum):
    json = "json"
    github_matrix = "github-matrix"


def register(app: typer.Typer) -> None:
    @app.command("plan", cls=JsonCommand)
    def plan_cmd(
        recipe: Annotated[Path, typer.Argument(help="Recipe file (.yaml).")],
        fmt: Annotated[
            PlanFormat,
            typer.Option("--format", help="json: a list of jobs; github-matrix: {include: [...]}."),
        ] = PlanFormat.json,
        output_root: Annotated[
            str, typer.Option("--output-root", help="Each job writes into OUTPUT_ROOT/VARIANT.")
        ] = "llmopt-runs",
        publish: Annotated[bool, typer.Option("--publish", help="Jobs publish their variant if it passes.")] = False,
        set_: Annotated[
            list[str] | None,
            typer.Option("--set", help="Recipe override key.path=value, passed to every job."),
        ] = None,
        json_out: Annotated[
            bool, typer.Option("--json", help="Accepted for uniformity: the default --format json.")
        ] = False,
        json_file: JsonFileOpt = None,
    ) -> None:
        """Print one `llmopt run RECIPE --only NAME` job per variant; merge with `llmopt report merge`."""
        from llmopt.pipeline import plan_jobs

        if json_out and fmt != PlanFormat.json:
            raise InputError(f"--json and --format {fmt.value} ask for two different outputs.", "Give one of them.")
        out = JsonOutput(json_out, json_file)
        out.check(recipe)
        jobs = plan_jobs(recipe, output_root=output_root, publish=publish, sets=set_)
        if out.to_file:
            write_json(jobs if fmt == PlanFormat.json else {"include": jobs}, out.to_file)
            if not out.to_stdout:
                return
        if fmt == PlanFormat.github_matrix:
            # one line, so that `echo "matrix=$(llmopt plan ...)" >> "$GITHUB_OUTPUT"` works
            typer.echo(json.dumps({"include": jobs}, separators=(",", ":")))
        else:
            write_json(jobs, "-")
