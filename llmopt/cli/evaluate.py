"""``llmopt eval``."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Annotated

import typer
from rich.table import Table

from llmopt.cli._common import (
    DeviceOpt,
    JsonFileOpt,
    JsonOpt,
    JsonOutput,
    LegacyJsonCommand,
    MinRecoveryOpt,
    QuietOpt,
    TaskLimitOpt,
    TasksOpt,
    human_bytes,
    stderr,
    stdout,
    stdout_is_ours,
)
from llmopt.cli.bench import (
    BatchSizesOpt,
    DecodeModeOpt,
    GenLenOpt,
    HourlyCostOpt,
    MarlinAtomicsOpt,
    PromptLensOpt,
    RepetitionsOpt,
    TrustRemoteCodeOpt,
    WarmupOpt,
    check_speed_gate,
    render_throughput,
    throughput_settings,
)
from llmopt.errors import EXIT_GATE

if TYPE_CHECKING:
    from llmopt.results import Distribution, EvalReport


def render_eval(report: EvalReport) -> None:
    s = report.settings
    table = Table(
        title=f"perplexity on {s.dataset} ({s.tokens_scored or 0:,} tokens, context {s.context_length}, "
        f"stride {s.stride}, {s.dtype} on {s.device})"
    )
    for col, justify in (("model", "left"), ("perplexity", "right"), ("± stderr", "right"), ("Δ vs FP16", "right"),
                         ("size on disk", "right"), ("in memory", "right"), ("eval time", "right")):  # fmt: skip
        table.add_column(col, justify=justify)  # type: ignore[arg-type]
    b, a = report.baseline, report.artifact
    table.add_row(
        "FP16 baseline" + (" (cached)" if b.cached else ""),
        f"{b.perplexity:.4f}",
        f"{b.stderr:.4f}",
        "-",
        human_bytes(b.size_bytes),
        human_bytes(b.footprint_bytes),
        f"{b.eval_seconds or 0:.1f} s",
    )
    table.add_row(
        f"{a.backend} ({a.format})",
        f"{a.perplexity:.4f}",
        f"{a.stderr:.4f}",
        f"{report.delta_pct or 0:+.2f}% ± {report.delta_pct_stderr or 0:.2f}",
        human_bytes(a.size_bytes),
        human_bytes(a.footprint_bytes),
        f"{a.eval_seconds or 0:.1f} s",
    )
    stdout.print(table)
    render_distribution(a.distribution)
    render_tasks(report)
    if a.compute:
        c = a.compute
        stdout.print(f"artifact arithmetic: unquantized tensors {c.get('unquantized')}; {c.get('matmul', '')}")
    gate = report.gate
    if gate is None or not gate.checks:
        stdout.print("gate: no thresholds set")
        return
    for check in gate.checks:
        mark = "[green]pass[/]" if check.passed else "[red]FAIL[/]"
        stdout.print(f"gate {mark}: {check.message}")


def _kld(value: float) -> str:
    """Nats, readable from an 8-bit artifact's 1e-4 to a broken model's 10."""
    return f"{value:.2e}" if abs(value) < 1e-3 else f"{value:.4f}"


def render_distribution(dist: Distribution | None) -> None:
    """The artifact's next-token distribution against FP16's (nothing when it was not measured)."""
    if dist is None:
        return
    table = Table(title=f"token distribution vs FP16 ({dist.tokens:,} tokens)")
    for col in ("mean KLD", "median", "p90", "p99", "p99.9", "max", "top-1 agreement", "Δp mean", "Δp RMS"):
        table.add_column(col, justify="right")
    table.add_row(
        f"{_kld(dist.kld_mean)} ± {_kld(dist.kld_stderr)}",
        *(_kld(v) for v in (dist.kld_median, dist.kld_p90, dist.kld_p99, dist.kld_p999, dist.kld_max)),
        f"{100 * dist.top1_agreement:.2f}% ± {100 * dist.top1_agreement_stderr:.2f}",
        f"{100 * dist.delta_p_mean:+.3f}%",
        f"{100 * dist.delta_p_rms:.3f}%",
    )
    stdout.print(table)


def render_tasks(report: EvalReport) -> None:
    """Task accuracies of both models and the artifact's recovery (nothing when no tasks were asked for)."""
    tasks = report.artifact.tasks
    if tasks is None:
        return
    if tasks.not_run:
        stdout.print(f"tasks ({', '.join(tasks.requested)}): {tasks.not_run}")
        return
    limit = f", first {tasks.limit} examples" if tasks.limit else ""
    table = Table(title=f"downstream accuracy ({tasks.harness}{limit})")
    for col in ("task", "metric", "n", "FP16", "artifact", "recovery"):
        table.add_column(col, justify="left" if col in ("task", "metric") else "right")
    for c in report.task_recovery or []:
        table.add_row(
            c.task,
            c.metric + (" *" if c.primary else ""),
            str(c.n),
            _pm(c.baseline, c.baseline_stderr),
            _pm(c.artifact, c.artifact_stderr),
            _pm(c.recovery, c.recovery_stderr),
        )
    stdout.print(table)
    stdout.print("[dim]* the metric --min-recovery reads; recovery = artifact / FP16, paired error[/]")


def _pm(value: float | None, stderr: float | None) -> str:
    if value is None:
        return "-"
    return f"{value:.3f}" + (f" ± {stderr:.3f}" if stderr is not None else "")


def register(app: typer.Typer) -> None:
    @app.command("eval", cls=LegacyJsonCommand)
    def eval_cmd(
        artifact: Annotated[Path, typer.Argument(help="Artifact folder written by `llmopt quantize`.")],
        baseline: Annotated[str, typer.Option(help="The FP16 model it was made from (folder, .gguf or Hub id).")],
        dataset: Annotated[str, typer.Option(help="Evaluation text: .txt/.jsonl/.parquet file, or wikitext2/c4.")],
        context: Annotated[int, typer.Option(help="Tokens per window.")] = 512,
        stride: Annotated[int | None, typer.Option(help="Tokens between window starts (default: context).")] = None,
        max_tokens: Annotated[int | None, typer.Option(help="Score only the first N tokens of the text.")] = None,
        add_bos: Annotated[bool, typer.Option("--add-bos/--no-add-bos", help="Put BOS before each window.")] = False,
        batch_size: Annotated[int, typer.Option(help="Windows per forward pass.")] = 1,
        max_ppl_increase: Annotated[
            float | None, typer.Option(help="Gate: largest allowed perplexity increase over FP16, in %.")
        ] = None,
        max_ppl: Annotated[float | None, typer.Option(help="Gate: largest allowed perplexity.")] = None,
        max_kld: Annotated[
            float | None, typer.Option(help="Gate: largest allowed mean KL divergence from FP16, nats per token.")
        ] = None,
        min_top1: Annotated[
            float | None, typer.Option(help="Gate: smallest allowed top-1 agreement with FP16, in %.")
        ] = None,
        no_kld: Annotated[
            bool,
            typer.Option("--no-kld", help="Skip the KL divergence / top-1 agreement against FP16 (perplexity alone)."),
        ] = False,
        kernel: Annotated[str | None, typer.Option(help="GPTQ/AWQ kernel (GPTQModel backend name).")] = None,
        throughput: Annotated[
            bool, typer.Option("--throughput", help="Also measure serving speed of artifact and baseline.")
        ] = False,
        batch_sizes: BatchSizesOpt = None,
        prompt_lens: PromptLensOpt = None,
        gen_len: GenLenOpt = None,
        warmup: WarmupOpt = 2,
        repetitions: RepetitionsOpt = 5,
        decode_mode: DecodeModeOpt = "auto",
        gpu_hourly_cost: HourlyCostOpt = None,
        marlin_atomics: MarlinAtomicsOpt = True,
        min_decode_speedup: Annotated[
            float | None, typer.Option(help="Gate: smallest decode speedup over FP16 (needs --throughput).")
        ] = None,
        at_batch: Annotated[int, typer.Option(help="Batch size at which --min-decode-speedup is read.")] = 1,
        tasks: TasksOpt = None,
        task_limit: TaskLimitOpt = None,
        min_recovery: MinRecoveryOpt = None,
        no_cache: Annotated[bool, typer.Option("--no-cache", help="Score the baseline even if cached.")] = False,
        json_out: JsonOpt = False,
        json_file: JsonFileOpt = None,
        device: DeviceOpt = "auto",
        quiet: QuietOpt = False,
        trust_remote_code: TrustRemoteCodeOpt = False,
    ) -> None:
        """Perplexity of ARTIFACT and of its FP16 baseline on the same tokens; gate; record in llmopt.json.

        Exits 3 when a gate check fails; 2 when --tasks names a task lm-eval does not know, a task file that is
        not valid, or an artifact lm-eval cannot run (GGUF); 4 when lm-eval is not installed.
        """
        from llmopt.api import evaluate
        from llmopt.progress import default_reporter
        from llmopt.specs import eval_spec, gate_spec

        gate = gate_spec(
            max_ppl_increase_pct=max_ppl_increase,
            max_ppl=max_ppl,
            max_kld=max_kld,
            min_top1_pct=min_top1,
            min_decode_speedup=min_decode_speedup,
            min_recovery=min_recovery,
            at_batch=at_batch,
        )
        speed = throughput_settings(
            throughput,
            batch_sizes,
            prompt_lens,
            gen_len,
            warmup,
            repetitions,
            decode_mode,
            gpu_hourly_cost,
            marlin_atomics,
        )
        check_speed_gate(speed, min_decode_speedup, at_batch)
        spec = eval_spec(
            dataset=dataset,
            context_length=context,
            stride=stride,
            max_tokens=max_tokens,
            add_bos=add_bos,
            batch_size=batch_size,
            device=device,
            kernel=kernel,
            kld=not no_kld,
            throughput=speed,
            tasks=tasks,
            task_limit=task_limit,
        )
        out = JsonOutput(json_out, json_file)
        # a local task file is an input too: --json-file must not replace it
        out.check(dataset, baseline, *(spec.tasks or []))
        with stdout_is_ours():
            report = evaluate(
                artifact,
                baseline,
                spec,
                gate=gate,
                use_cache=not no_cache,
                trust_remote_code=trust_remote_code,
                reporter=default_reporter(quiet or out.to_stdout),
            )
        out.emit(report)
        if out.human:
            render_eval(report)
            if report.throughput:
                render_throughput(report.throughput.to_json())
        assert report.gate is not None
        if not report.gate.passed:
            failed = [c.message for c in report.gate.failures()]
            stderr.print(f"[red]gate failed[/]: {'; '.join(failed)}")
            raise typer.Exit(EXIT_GATE)
