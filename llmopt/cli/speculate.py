"""``llmopt speculate``: speculative decoding of a target with a (quantized) draft, measured."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer
from rich.table import Table

from llmopt.cli._common import (
    DeviceOpt,
    JsonCommand,
    JsonFileOpt,
    JsonOpt,
    JsonOutput,
    QuietOpt,
    stdout,
    stdout_is_ours,
)
from llmopt.errors import EXIT_GATE, DataError


def read_prompts(path: Path) -> list[str]:
    """One prompt per non-empty line of a UTF-8 text file."""
    try:
        lines = path.read_text(encoding="utf-8").splitlines()
    except (OSError, UnicodeDecodeError) as exc:
        raise DataError(
            f"cannot read prompt file {path} ({exc}).", "Pass a UTF-8 text file, one prompt per line."
        ) from None
    prompts = [line.strip() for line in lines if line.strip()]
    if not prompts:
        raise DataError(f"prompt file {path} has no prompts.", "Write one prompt per line.")
    return prompts


def register(app: typer.Typer) -> None:
    @app.command("speculate", cls=JsonCommand)
    def speculate_cmd(
        target: Annotated[str, typer.Argument(help="The model to serve: folder, .gguf, Hub id or llmopt artifact.")],
        draft: Annotated[
            str,
            typer.Option("--draft", help="The draft: a smaller or quantized model (folder or llmopt artifact)."),
        ],
        prompt_file: Annotated[
            Path | None,
            typer.Option(help="Text file, one prompt per line (default: three built-in prompts)."),
        ] = None,
        max_new_tokens: Annotated[int, typer.Option(help="New tokens generated per prompt, in each mode.")] = 64,
        num_assistant_tokens: Annotated[
            int | None,
            typer.Option(help="Largest draft per round (default: transformers' 20, cut by confidence)."),
        ] = None,
        device: DeviceOpt = "auto",
        json_out: JsonOpt = False,
        json_file: JsonFileOpt = None,
        quiet: QuietOpt = False,
    ) -> None:
        """Greedy assisted generation (target + draft) vs the target alone: acceptance, tokens/s, speedup.

        Exits 3 (a check failed) when the greedy outputs are not identical token for token.
        """
        from llmopt.progress import default_reporter
        from llmopt.speculative import DEFAULT_PROMPTS, speculative_bench

        out = JsonOutput(json_out, json_file)
        out.check(target, draft, prompt_file)
        prompts = read_prompts(prompt_file) if prompt_file else list(DEFAULT_PROMPTS)
        with stdout_is_ours():
            result = speculative_bench(
                target,
                draft,
                prompts=prompts,
                max_new_tokens=max_new_tokens,
                device=device,
                num_assistant_tokens=num_assistant_tokens,
                reporter=default_reporter(quiet or out.to_stdout),
            )
        out.emit(result.model_dump(mode="json"))
        if out.human:
            r = result
            table = Table(
                title=f"speculative decoding, greedy, {r.prompts} prompts x {r.max_new_tokens} tokens, "
                f"{r.dtype} on {r.environment.get('device', r.device)}"
            )
            for col in ("mode", "tokens/s", "speedup"):
                table.add_column(col, justify="left" if col == "mode" else "right")
            table.add_row("target alone", f"{r.target_tokens_per_s:,.2f}", "1.00x")
            table.add_row(f"target + draft ({r.draft_runner})", f"{r.assisted_tokens_per_s:,.2f}", f"{r.speedup:.2f}x")
            stdout.print(table)
            rate = f"{r.acceptance_rate:.1%}" if r.acceptance_rate is not None else "-"
            stdout.print(
                f"draft acceptance: [bold]{rate}[/] "
                f"({r.accepted_tokens:,} of {r.drafted_tokens:,} drafted tokens; "
                f"{r.rounds} target passes, {r.tokens_per_round or 0:.2f} tokens each; "
                f"drafts of up to {r.num_assistant_tokens} tokens)"
            )
            if r.identical:
                stdout.print("[green]✓[/] greedy outputs identical token for token")
            else:
                bad = [i for i, p in enumerate(r.per_prompt) if not p.identical]
                stdout.print(
                    f"[red]✗[/] greedy outputs differ on prompts {bad} (first differing token: "
                    f"{r.per_prompt[bad[0]].first_mismatch}); fp16 near-ties can do this, check --device cpu"
                )
        if not result.identical:
            raise typer.Exit(EXIT_GATE)
