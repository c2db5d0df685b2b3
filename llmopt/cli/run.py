"""``llmopt run``: every variant of a recipe through quantize -> evaluate -> gate (-> publish)."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any

import typer
from rich.markup import escape
from rich.table import Table

from llmopt.cli._common import (
    JsonCommand,
    JsonFileOpt,
    JsonOpt,
    JsonOutput,
    MinRecoveryOpt,
    QuietOpt,
    TaskLimitOpt,
    TasksOpt,
    stderr,
    stdout,
    stdout_is_ours,
)

if TYPE_CHECKING:
    from llmopt.results import RunReport


def render_run(report: RunReport) -> None:
    from llmopt.report import display_dataset, table_header, table_rows

    s = report.settings
    title = "llmopt run"
    if s:
        title += (
            f": perplexity on {display_dataset(s.dataset)} ({s.tokens_scored or 0:,} tokens, "
            f"context {s.context_length}, {s.dtype or '?'} on {s.device or '?'})"
        )
    table = Table(title=title)
    for col in table_header(report):
        table.add_column(col, justify="left" if col in ("variant", "method", "gate") else "right")
    for row in table_rows(report):
        gate = row[-1]
        marks = {"pass": "[green]pass[/]", "FAIL": "[red]FAIL[/]", "not run": "[yellow]not run[/]"}
        style = marks.get(gate, f"[red]{gate}[/]" if "error" in gate else gate)
        table.add_row(*(escape(cell) for cell in row[:-1]), style)
    stdout.print(table)
    for v in report.variants:
        err = v.error
        if err:
            # messages quote install lines ('transformers[serving]') and paths: printed as text, not rich markup
            stderr.print(f"[red]{v.name}[/] ({err.stage}): {escape(err.message)}")
            if err.hint:
                stderr.print(f"  -> {escape(err.hint)}")
        for c in v.gate.failures() if v.gate else []:
            stderr.print(f"[red]{v.name} gate FAIL[/]: {escape(c.message)}")
        pub = v.publish
        if pub:
            rev = f" (branch {pub['revision']})" if pub.get("revision") else ""
            rev += f" as {pub['file']}" if pub.get("file") else ""
            stdout.print(f"[green]published[/] {v.name} -> {escape(str(pub.get('url') or pub.get('repo_id')))}{rev}")
    for note in report.notes:
        stdout.print(f"[dim]note: {escape(note)}[/]")
    out = Path(report.output or ".")
    files = report.files
    if files:
        stdout.print(f"report: {out / files.get('markdown', 'report.md')}, {out / files.get('json', 'report.json')}")
        for p in files.get("plots") or []:
            stdout.print(f"plot: {out / p}")


def register(app: typer.Typer) -> None:
    @app.command("run", cls=JsonCommand)
    def run_cmd(
        recipe: Annotated[Path, typer.Argument(help="Recipe file (.yaml); see recipes/ and `llmopt recipe schema`.")],
        only: Annotated[list[str] | None, typer.Option("--only", help="Run only this variant (repeatable).")] = None,
        publish: Annotated[
            bool, typer.Option("--publish", help="Publish each variant that passes its gate to the Hub.")
        ] = False,
        output: Annotated[
            Path | None,
            typer.Option("--output", "-o", help="Output folder (default: recipe's, else llmopt-runs/NAME)."),
        ] = None,
        set_: Annotated[
            list[str] | None,
            typer.Option("--set", help="Override a recipe key: key.path=value (repeatable)."),
        ] = None,
        device: Annotated[str | None, typer.Option(help="Override evaluation.device.")] = None,
        max_tokens: Annotated[int | None, typer.Option(help="Override evaluation.max_tokens.")] = None,
        context: Annotated[int | None, typer.Option(help="Override evaluation.context_length.")] = None,
        batch_size: Annotated[int | None, typer.Option(help="Override evaluation.batch_size.")] = None,
        samples: Annotated[int | None, typer.Option(help="Override calibration.samples.")] = None,
        max_kld: Annotated[
            float | None, typer.Option(help="Override gates.max_kld (mean KL divergence from FP16, nats).")
        ] = None,
        min_top1: Annotated[
            float | None, typer.Option(help="Override gates.min_top1_pct (top-1 agreement with FP16, %).")
        ] = None,
        no_kld: Annotated[
            bool, typer.Option("--no-kld", help="Override evaluation.kld to false (perplexity alone).")
        ] = False,
        tasks: TasksOpt = None,
        task_limit: TaskLimitOpt = None,
        min_recovery: MinRecoveryOpt = None,
        slo: Annotated[
            str | None,
            typer.Option(
                help="Override gates.slo (and min_goodput, slo_at_rate) for every variant, e.g. "
                "ttft_p95=500ms,itl_p95=50ms,min_goodput=2,at_rate=4; needs evaluation.serving."
            ),
        ] = None,
        overwrite: Annotated[
            bool,
            typer.Option(
                help="Write into an existing folder llmopt run did not make (only report.json, report.md, "
                "plots/ and artifacts/ are written; nothing else is deleted); also replace a variant's artifact "
                "folder whose llmopt.json is damaged or that holds files it does not list."
            ),
        ] = False,
        json_out: JsonOpt = False,
        json_file: JsonFileOpt = None,
        quiet: QuietOpt = False,
    ) -> None:
        """Quantize, evaluate and gate every variant of RECIPE (resumable); write report.json/.md and plots.

        Exit code: 0 every variant passed; 3 a gate failed; if a variant errored, the code of the first
        error in recipe order (2 bad input, 4 backend/Hub unavailable, 5 artifact mismatch, 1 unexpected);
        130 interrupted (Ctrl-C/SIGTERM stop the whole run; the report lists what finished, a rerun resumes).
        The output folder must be new, one an earlier run made, or given with --overwrite.
        """
        from llmopt.errors import InterruptedRunError
        from llmopt.pipeline import run_recipe
        from llmopt.progress import default_reporter
        from llmopt.results import RunReport

        out = JsonOutput(json_out, json_file)
        # the run folder only holds what the run writes (a later run or --overwrite check reads its entries)
        out.check(recipe, creates=output)
        overrides: dict[str, Any] = {
            "evaluation.device": device,
            "evaluation.max_tokens": max_tokens,
            "evaluation.context_length": context,
            "evaluation.batch_size": batch_size,
            "calibration.samples": samples,
            "gates.max_kld": max_kld,
            "gates.min_top1_pct": min_top1,
            "evaluation.kld": False if no_kld else None,
            "evaluation.tasks": tasks,
            "evaluation.task_limit": task_limit,
            "gates.min_recovery": min_recovery,
        }
        if slo is not None:
            from llmopt.serving.metrics import parse_slo

            slo_spec = parse_slo(slo)
            if slo_spec is not None:
                overrides["gates.slo"] = slo_spec.limits or None
                overrides["gates.min_goodput"] = slo_spec.min_goodput
                overrides["gates.slo_at_rate"] = slo_spec.at_rate
        if out.to_file:
            # the JSON is written after the run: not onto one of the files the run reads (a one-line .jsonl text
            # parses as JSON, so check_report_file's "not a JSON file" would let it be replaced)
            from llmopt.pipeline import recipe_inputs, resolve_recipe

            loaded, _ = resolve_recipe(recipe, overrides, set_)
            out.check(*(path for _, path in recipe_inputs(loaded, str(recipe), loaded.variants)), creates=output)
        try:
            with stdout_is_ours():
                report = run_recipe(
                    recipe,
                    only=only,
                    output=output,
                    publish=publish,
                    overwrite=overwrite,
                    overrides=overrides,
                    sets=set_,
                    reporter=default_reporter(quiet or out.to_stdout),
                )
        except InterruptedRunError as exc:
            # a CI job stopped by its timeout still gets the report of what finished, as report.json has it
            if isinstance(exc.partial, RunReport):
                out.emit(exc.partial)
            raise
        out.emit(report)
        if out.human:
            render_run(report)
        if report.exit_code:
            raise typer.Exit(report.exit_code)
