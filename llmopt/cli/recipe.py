"""``llmopt recipe validate`` and ``llmopt recipe schema``."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated

import typer
from rich.table import Table

from llmopt.cli._common import stdout, write_json


def register(app: typer.Typer) -> None:
    recipe_app = typer.Typer(help="Check recipe files and print their schema.", no_args_is_help=True)

    @recipe_app.command("validate")
    def validate_cmd(
        file: Annotated[Path, typer.Argument(help="Recipe file (.yaml).")],
        json_out: Annotated[bool, typer.Option("--json", help="Print the resolved recipe as JSON.")] = False,
    ) -> None:
        """Check FILE (keys, values, each variant's backend options) without running it. Exit 2 if bad."""
        from llmopt.recipe import load_recipe

        recipe = load_recipe(file)
        if json_out:
            write_json(recipe.resolved(), "-")
            return
        stdout.print(f"[green]✓[/] {file}: recipe [bold]{recipe.name}[/], {len(recipe.variants)} variant(s)")
        table = Table()
        for col in ("variant", "method", "options", "gate"):
            table.add_column(col)
        for v in recipe.variants:
            gate = recipe.gate_for(v).model_dump(exclude_none=True, exclude={"at_batch"})
            table.add_row(
                v.name,
                v.method,
                ", ".join(f"{k}={val}" for k, val in v.options.items()) or "(defaults)",
                ", ".join(f"{k}={val}" for k, val in gate.items()) or "[yellow]none[/]",
            )
        stdout.print(table)

    @recipe_app.command("schema")
    def schema_cmd() -> None:
        """Print the JSON Schema of recipe files (for editors and CI checks)."""
        from llmopt.recipe import recipe_json_schema

        typer.echo(json.dumps(recipe_json_schema(), indent=2))

    app.add_typer(recipe_app, name="recipe")
