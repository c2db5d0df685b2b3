"""``llmopt plan``: one job per recipe variant, for a CI matrix or another scheduler."""

from __future__ import annotations

import json
from enum import StrEnum
from pathlib import Path
from typing import Annotated

import typer

from llmopt.cli._common import write_json


class PlanFormat(StrEnum):
    json = "json"
    github_matrix = "github-matrix"


def register(app: typer.Typer) -> None:
    @app.command("plan")
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
    ) -> None:
        """Print one `llmopt run RECIPE --only NAME` job per variant; merge with `llmopt report merge`."""
        from llmopt.pipeline import plan_jobs

        jobs = plan_jobs(recipe, output_root=output_root, publish=publish, sets=set_)
        if fmt == PlanFormat.github_matrix:
            # one line, so that `echo "matrix=$(llmopt plan ...)" >> "$GITHUB_OUTPUT"` works
            typer.echo(json.dumps({"include": jobs}, separators=(",", ":")))
        else:
            write_json(jobs, "-")
