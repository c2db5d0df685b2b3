"""``llmopt recipe validate`` and ``llmopt recipe schema``."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer
from rich.table import Table

from llmopt.cli._common import JsonCommand, JsonFileOpt, JsonOpt, JsonOutput, stdout


def register(app: typer.Typer) -> None:
    recipe_app = typer.Typer(help="Check recipe files and print their schema.", no_args_is_help=True)

    @recipe_app.command("validate", cls=JsonCommand)
    def validate_cmd(
        file: Annotated[Path, typer.Argument(help="Recipe file (.yaml).")],
        json_out: JsonOpt = False,
        json_file: JsonFileOpt = None,
    ) -> None:
        """Check FILE (keys, values, each variant's backend options) without running it. Exit 2 if bad."""
        from llmopt.recipe import load_recipe

        out = JsonOutput(json_out, json_file)
        out.check(file)
        recipe = load_recipe(file)
        out.emit(recipe.resolved())
        if not out.human:
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
        serving = recipe.evaluation.serving
        if serving is not None:
            load = (
                f"rates {', '.join(f'{r:g}' for r in serving.rates)} req/s"
                if serving.rates
                else f"concurrency {serving.concurrency}"
            )
            stdout.print(
                f"serving: each variant under load ({serving.server} server), {load}, {serving.requests} requests "
                f"each, prompts {serving.prompt_len} / outputs {serving.output_len} tokens"
                + ("; the FP16 model too" if serving.baseline else "")
            )

    @recipe_app.command("schema", cls=JsonCommand)
    def schema_cmd(
        json_out: Annotated[bool, typer.Option("--json", help="Accepted for uniformity: the schema is JSON.")] = False,
        json_file: JsonFileOpt = None,
    ) -> None:
        """Print the JSON Schema of recipe files (for editors and CI checks)."""
        from llmopt.recipe import recipe_json_schema

        out = JsonOutput(json_out, json_file)
        out.check()
        # printed unless only a file was asked for: the schema is this command's human output too
        JsonOutput(stdout=not out.to_file or out.to_stdout, file=out.to_file).emit(recipe_json_schema())

    app.add_typer(recipe_app, name="recipe")
