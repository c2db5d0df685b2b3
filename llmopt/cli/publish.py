"""``llmopt publish``: upload a gated artifact and its model card to the Hugging Face Hub."""

from __future__ import annotations

from enum import StrEnum
from pathlib import Path
from typing import TYPE_CHECKING, Annotated

import typer
from rich.markup import escape

from llmopt.cli._common import JsonCommand, JsonFileOpt, JsonOpt, JsonOutput, QuietOpt, human_bytes, stdout
from llmopt.errors import InputError

if TYPE_CHECKING:
    from llmopt.results import GGUFRepoPublish


class Layout(StrEnum):
    folder = "folder"
    gguf_one_repo = "gguf-one-repo"


def render_gguf_repo(result: GGUFRepoPublish) -> None:
    where = result.repo_id + (f" (branch {result.revision})" if result.revision else "")
    verb = "would upload" if result.dry_run else "uploaded"
    stdout.print(f"{verb} {len(result.files)} files ({human_bytes(result.total_bytes)}) to {where} in one commit:")
    for f in result.files:
        stdout.print(f"  {f.path}  {human_bytes(f.size)}")
    kept = [r for r in result.table if r.origin != "this commit"]
    if kept:
        stdout.print(f"kept in the repo and listed on the card: {', '.join(r.path for r in kept)}")
    for lo in result.left_out:
        stdout.print(f"[yellow]left out[/] {lo.variant}" + (f" ({lo.quant_type})" if lo.quant_type else "")
                     + f": {lo.reason}")  # fmt: skip
    for line in [*result.skipped, *result.notes]:
        stdout.print(f"[yellow]note[/]: {line}")
    if result.dry_run:
        typer.echo("----- README.md (model card) -----")
        typer.echo(result.card or "", nl=False)
    else:
        stdout.print(f"[green]✓[/] {result.commit_url or result.url}")


def register(app: typer.Typer) -> None:
    @app.command("publish", cls=JsonCommand)
    def publish_cmd(
        artifact: Annotated[
            Path,
            typer.Argument(
                help="Artifact folder (evaluated, gate passed); with --layout gguf-one-repo also a run folder."
            ),
        ],
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
        layout: Annotated[
            Layout,
            typer.Option(
                "--layout",
                help="folder: the artifact's files as the repo. gguf-one-repo: the GGUF artifacts of a run folder "
                "(or one GGUF artifact), one .gguf file per quant type, into one repo with a card table of every "
                "file; other quant types already there are kept.",
            ),
        ] = Layout.folder,
        only: Annotated[
            list[str] | None,
            typer.Option("--only", help="With --layout gguf-one-repo: publish only this variant (repeatable)."),
        ] = None,
        benchmark: Annotated[
            list[str] | None,
            typer.Option(
                "--benchmark",
                metavar="TASK=DATASET_ID:TASK_ID",
                help="Also publish this lm-eval task's score as a result of a Hub benchmark, in "
                ".eval_results/TASK.yaml (repeatable; e.g. arc_easy=allenai/ai2_arc:ARC-Easy). The dataset must be "
                "registered as a Benchmark on the Hub and define TASK_ID; llmopt cannot check that.",
            ),
        ] = None,
        benchmark_local_data: Annotated[
            bool,
            typer.Option(
                "--benchmark-local-data",
                help="Allow --benchmark to map a local task: you state that its data file is the benchmark's "
                "own data (the result's notes name the file's hash).",
            ),
        ] = False,
        json_out: JsonOpt = False,
        json_file: JsonFileOpt = None,
        quiet: QuietOpt = False,
    ) -> None:
        """Publish ARTIFACT to REPO_ID in one commit (files, llmopt.json, generated README.md model card).

        Refuses an artifact without a passing gate (exit 3) or whose files changed since it was evaluated
        (exit 5). With --layout gguf-one-repo, ARTIFACT may be a run folder: each GGUF variant that passed its
        gate becomes one NAME-QUANT.gguf file (failed ones are listed on the card; none passed: exit 3). The
        token comes from HF_TOKEN or `hf auth login` and is never printed. --benchmark adds a task's score as a Hub
        benchmark result (.eval_results/TASK.yaml) to the same commit; opt-in, since only you can say that the
        task is that benchmark's.
        """
        from llmopt.hub import publish
        from llmopt.progress import default_reporter

        out = JsonOutput(json_out, json_file)
        out.check(artifact)
        if layout is Layout.gguf_one_repo:
            from llmopt.gguf_repo import BENCHMARKS_REFUSED, publish_gguf_repo

            if benchmark or benchmark_local_data:
                raise InputError(f"--benchmark: {BENCHMARKS_REFUSED}", "Leave --benchmark out with this layout.")

            gguf = publish_gguf_repo(
                artifact,
                repo_id,
                only=only,
                private=private,
                revision=revision,
                dry_run=dry_run,
                base_model=base_model,
                license=license_,
                tags=tag,
                commit_message=message,
                reporter=default_reporter(quiet or out.to_stdout),
            )
            out.emit(gguf)
            if out.human:
                render_gguf_repo(gguf)
            return
        if only:
            raise InputError("--only picks variants for --layout gguf-one-repo.", "Leave it out, or add that layout.")
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
            benchmarks=benchmark,
            benchmark_local_data=benchmark_local_data,
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
            stdout.print(escape(f"  {f['path']}  {human_bytes(f['size'])}"))
        for r in result["eval_results"]:
            e = r["entry"]
            stdout.print(
                escape(
                    f"benchmark result {r['path']}: {e['dataset']['id']} task {e['dataset']['task_id']} = {e['value']}"
                )
            )
        for note in result["notes"]:
            stdout.print(f"[yellow]note[/]: {escape(note)}")
        if dry_run:
            # raw, not through rich: the card must come out exactly as it would be uploaded
            typer.echo("----- README.md (model card) -----")
            typer.echo(result["card"], nl=False)
        else:
            stdout.print(f"[green]✓[/] {result['commit_url'] or result['url']}")
