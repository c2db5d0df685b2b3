"""``llmopt publish``: upload a gated artifact and its model card to the Hugging Face Hub."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from llmopt.cli._common import JsonCommand, JsonFileOpt, JsonOpt, JsonOutput, QuietOpt, human_bytes, stdout


def register(app: typer.Typer) -> None:
    @app.command("publish", cls=JsonCommand)
    def publish_cmd(
        artifact: Annotated[Path, typer.Argument(help="Artifact folder (evaluated, gate passed).")],
        repo_id: Annotated[str, typer.Argument(help="Hub repo, ORG/NAME (created if missing).")],
        private: Annotated[bool, typer.Option("--private", help="Create the repo as private.")] = False,
        revision: Annotated[
            str | None, typer.Option("--revision", help="Branch to commit to (created from main if missing).")
        ] = None,
        dry_run: Annotated[
            bool, typer.Option("--dry-run", help="Print the model card and the file list; upload nothing.")
        ] = False,
        base_model: Annotated[
            str | None,
            typer.Option(help="Hub id of the model quantized, for the card (default: from the manifest)."),
        ] = None,
        license_: Annotated[
            str | None, typer.Option("--license", help="License id for the card (default: the base model's).")
        ] = None,
        tag: Annotated[list[str] | None, typer.Option("--tag", help="Extra model card tag (repeatable).")] = None,
        message: Annotated[str | None, typer.Option(help="Commit message.")] = None,
        json_out: JsonOpt = False,
        json_file: JsonFileOpt = None,
        quiet: QuietOpt = False,
    ) -> None:
        """Publish ARTIFACT to REPO_ID in one commit (files, llmopt.json, generated README.md model card).

        Refuses an artifact without a passing gate (exit 3) or whose files changed since it was evaluated
        (exit 5). The token comes from HF_TOKEN or `hf auth login` and is never printed.
        """
        from llmopt.hub import publish
        from llmopt.progress import default_reporter

        out = JsonOutput(json_out, json_file)
        out.check(artifact)
        result = publish(
            artifact,
            repo_id,
            private=private,
            revision=revision,
            dry_run=dry_run,
            base_model=base_model,
            license=license_,
            tags=tag,
            commit_message=message,
            reporter=default_reporter(quiet or out.to_stdout),
        )
        out.emit(result)
        if not out.human:
            return
        where = f"{repo_id}" + (f" (branch {revision})" if revision else "")
        verb = "would upload" if dry_run else "uploaded"
        stdout.print(
            f"{verb} {len(result['files'])} files ({human_bytes(result['total_bytes'])}) to {where} in one commit:"
        )
        for f in result["files"]:
            stdout.print(f"  {f['path']}  {human_bytes(f['size'])}")
        for note in result["notes"]:
            stdout.print(f"[yellow]note[/]: {note}")
        if dry_run:
            # raw, not through rich: the card must come out exactly as it would be uploaded
            typer.echo("----- README.md (model card) -----")
            typer.echo(result["card"], nl=False)
        else:
            stdout.print(f"[green]✓[/] {result['commit_url'] or result['url']}")
