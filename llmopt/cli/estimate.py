"""``llmopt estimate``: memory, KV cache, GPU count and cost from config.json alone; with ``--slo`` and ``--rate``,
the cheapest served variant x GPU count that meets the SLO, from a run's measured serving results."""

from __future__ import annotations

import math
from pathlib import Path
from typing import TYPE_CHECKING, Annotated

import typer
from rich.markup import escape
from rich.table import Table

from llmopt.cli._common import JsonCommand, JsonFileOpt, JsonOpt, JsonOutput, human_bytes, stdout
from llmopt.errors import EXIT_GATE, InputError

if TYPE_CHECKING:
    from llmopt.estimate import Estimate
    from llmopt.estimate.serving import ServingPlan


def register(app: typer.Typer) -> None:
    @app.command("estimate", cls=JsonCommand)
    def estimate_cmd(
        model: Annotated[
            str | None,
            typer.Argument(
                help="A Hugging Face model folder, the path of a config.json, or a Hub id (not with --slo)."
            ),
        ] = None,
        gpu: Annotated[
            str,
            typer.Option(help="GPU to plan for: T4, L4, A10G, A100-40GB, A100-80GB, H100-80GB, H200, B200."),
        ] = "H100-80GB",
        context: Annotated[
            int, typer.Option(help="Tokens per sequence (prompt + output) the KV cache must hold.")
        ] = 4096,
        batch: Annotated[int, typer.Option(help="Sequences decoded at once.")] = 1,
        kv_dtype: Annotated[str, typer.Option(help="KV-cache dtype: fp16, bf16, fp8, fp32.")] = "fp16",
        weights: Annotated[
            str | None,
            typer.Option(
                help="Weight format the plan assumes: fp16, bf16, int8, int4, gguf-q4_k_m, ... "
                "(default: the config's dtype)."
            ),
        ] = None,
        group_size: Annotated[int, typer.Option(help="int4 group size (-1: one scale per row).")] = 128,
        utilization: Annotated[float, typer.Option(help="Fraction of GPU memory usable for weights + KV cache.")] = 0.9,
        gpu_hourly_cost: Annotated[float | None, typer.Option(help="Price of one GPU-hour in USD.")] = None,
        report: Annotated[
            Path | None,
            typer.Option(
                help="Report JSON with a `throughput` section: its measured decode speed prices tokens. With --slo: "
                "a run's report.json (evaluation.serving) or serve-bench.json."
            ),
        ] = None,
        slo: Annotated[
            str | None,
            typer.Option(
                help="Serving SLO, e.g. ttft_p95=500ms,itl_p95=50ms,min_goodput=2: recommend the cheapest measured "
                "variant x GPU count meeting it at --rate (exit 3 when none does)."
            ),
        ] = None,
        rate: Annotated[float | None, typer.Option(help="With --slo: the request rate to serve (requests/s).")] = None,
        gpus: Annotated[
            str | None,
            typer.Option(
                help="With --slo: GPU counts to consider (replicas of the measured server), 1 to 4096 each "
                "(default 1,2,4,8)."
            ),
        ] = None,
        gpu_catalog: Annotated[
            Path | None,
            typer.Option(help="YAML file adding GPUs to the built-in catalog (also: $LLMOPT_GPU_CATALOG)."),
        ] = None,
        json_out: JsonOpt = False,
        json_file: JsonFileOpt = None,
    ) -> None:
        """Before downloading: parameters, weight and KV-cache memory, GPUs, cost; from config.json.

        With --slo and --rate (and --report RUN/report.json): which served variant on how many GPUs meets the SLO
        at that rate, at what cost per million tokens, from the measured serving results."""
        from llmopt.estimate import estimate

        if slo is not None or rate is not None:
            _serving_plan(model, report, slo, rate, gpus, gpu_hourly_cost, json_out, json_file)
            return
        if model is None:
            raise InputError("give a MODEL (or --slo and --rate with a run's --report).", "See llmopt estimate --help.")
        if gpus is not None:
            raise InputError(
                "--gpus picks the GPU counts of a serving plan (--slo, --rate, --report); the estimate of a MODEL "
                "lists the tensor-parallel sizes itself.",
                "Drop --gpus, or add --slo and --rate with a run's --report.",
            )
        out = JsonOutput(json_out, json_file)
        out.check(model, report, gpu_catalog)
        result = estimate(
            model,
            gpu=gpu,
            context=context,
            batch=batch,
            kv_dtype=kv_dtype,
            weights=weights,
            group_size=group_size,
            utilization=utilization,
            gpu_hourly_cost=gpu_hourly_cost,
            report=report,
            gpu_catalog=gpu_catalog,
        )
        out.emit(result.model_dump(mode="json"))
        if out.human:
            _render(result)


def _serving_plan(
    model: str | None,
    report: Path | None,
    slo: str | None,
    rate: float | None,
    gpus: str | None,
    gpu_hourly_cost: float | None,
    json_out: bool,
    json_file: str | None,
) -> None:
    from llmopt.estimate.serving import DEFAULT_GPU_COUNTS, plan_serving
    from llmopt.serving.metrics import parse_slo

    together = InputError(
        "--slo, --rate and --report go together.",
        "E.g. llmopt estimate --report runs/x/report.json --slo ttft_p95=500ms --rate 4 --gpu-hourly-cost 2.5",
    )
    if slo is None or report is None:
        raise together
    if model is not None:
        raise InputError(
            "with --slo, the variants come from --report, not from a MODEL argument.", "Leave MODEL out."
        )
    counts = _gpu_counts(gpus) if gpus is not None else DEFAULT_GPU_COUNTS
    slo_spec = parse_slo(slo)
    if slo_spec is None:  # empty or blank
        raise InputError("--slo gives no target.", "E.g. --slo ttft_p95=500ms,itl_p95=50ms")
    # `at_rate` in --slo is the rate the SLO must hold at: here that is --rate, so it stands for --rate
    if slo_spec.at_rate is not None:
        if rate is not None and rate != slo_spec.at_rate:
            raise InputError(
                f"--slo at_rate={slo_spec.at_rate:g} and --rate {rate:g} name two different rates to serve.",
                "Give the rate once: --rate R (or at_rate=R in --slo).",
            )
        rate = slo_spec.at_rate
    if rate is None:
        raise together
    if gpu_hourly_cost is not None and not math.isfinite(gpu_hourly_cost):
        raise InputError(
            f"--gpu-hourly-cost {gpu_hourly_cost} is not a price.", "Pass the price of one GPU-hour in USD."
        )
    if not math.isfinite(rate):
        raise InputError(f"--rate {rate} is not a request rate.", "E.g. --rate 4 (requests per second).")
    out = JsonOutput(json_out, json_file)
    out.check(report)
    plan = plan_serving(report, slo_spec, rate, gpu_hourly_cost=gpu_hourly_cost, gpu_counts=counts)
    out.emit(plan.model_dump(mode="json"))
    if out.human:
        _render_serving(plan)
    if plan.recommended is None:
        raise typer.Exit(EXIT_GATE)


def _gpu_counts(text: str) -> tuple[int, ...]:
    """``--gpus 1,2,4,8``: whole numbers (their range is checked by plan_serving, for library callers too)."""
    try:
        counts = tuple(int(x) for x in text.split(",") if x.strip())
    except ValueError:
        raise InputError(f"--gpus {text!r} is not a list of GPU counts.", "E.g. --gpus 1,2,4,8.") from None
    if not counts:
        raise InputError("--gpus gives no GPU count.", "E.g. --gpus 1,2,4,8 (or leave it out for those).")
    return counts


def _render_serving(plan: ServingPlan) -> None:
    price = plan.gpu_hourly_cost
    t = Table(title=f"Serving {plan.rate:g} req/s under {plan.slo} (from {plan.report})")
    cols = ["variant", "GPUs", "source", "per GPU", "TTFT p95", "goodput/s", "out tok/s", "GPU-h / 1M tok"]
    cols += ["$ / 1M tok"] if price is not None else []
    cols += ["meets SLO"]
    for col in cols:
        t.add_column(col, justify="left" if col in ("variant", "source", "meets SLO") else "right")
    for o in plan.options:
        mark = "[green]yes[/]" if o.meets else "[red]no[/]: " + escape("; ".join(o.failures))
        if o is plan.recommended or o == plan.recommended:
            mark += " [bold](cheapest)[/]"
        row = [
            o.variant,
            str(o.gpus),
            o.source,
            f"{o.rate_per_gpu:g}/s",
            "-" if o.ttft_p95_ms is None else f"{o.ttft_p95_ms:,.0f} ms",
            "-" if o.goodput_per_s is None else f"{o.goodput_per_s:.2f}",
            "-" if o.output_tokens_per_s is None else f"{o.output_tokens_per_s:,.1f}",
            "-" if o.gpu_hours_per_million_tokens is None else f"{o.gpu_hours_per_million_tokens:,.3f}",
        ]
        if price is not None:
            row.append("-" if o.usd_per_million_tokens is None else f"${o.usd_per_million_tokens:,.3f}")
        t.add_row(*row, mark)
    stdout.print(t)
    r = plan.recommended
    if r is not None:
        cost = f", ${r.usd_per_million_tokens:,.3f} per million output tokens" if r.usd_per_million_tokens else ""
        stdout.print(f"[green]Recommended[/]: {r.variant} on {r.gpus} GPU(s) ({r.source}: {escape(r.basis)}){cost}")
    else:
        c = plan.closest
        closest = (
            f" Closest: {c.variant} on {c.gpus} GPU(s), {escape('; '.join(c.failures))}." if c is not None else ""
        )
        stdout.print(f"[red]No variant x GPU count meets the SLO at {plan.rate:g} req/s.[/]{closest}")
    for note in plan.notes:
        stdout.print(f"[yellow]note:[/] {escape(note)}")


def _gib(n: int) -> str:
    return f"{n / 2**30:,.2f} GiB"


def _render(e: Estimate) -> None:
    a, p = e.architecture, e.parameters
    stdout.print(
        f"[bold]{a.architecture or a.model_type}[/] ({a.model_type}) from {e.source}: [bold]{p.total:,}[/] parameters"
    )
    stdout.print(
        f"  {a.num_layers} layers, hidden {a.hidden_size}, {a.num_attention_heads} attention / "
        f"{a.num_kv_heads} KV heads of {a.head_dim}, MLP {a.intermediate_size}, vocab {a.vocab_size:,}, "
        f"embeddings {'tied' if p.tied else 'not tied'}"
    )
    stdout.print(
        f"  embedding {p.embedding:,} | attention {p.attention:,} | MLP {p.mlp:,} | norms {p.norms:,}"
        f" | lm_head {p.lm_head:,}"
    )

    wt = Table(title="weights")
    for col in ("format", "bytes", "GiB", "bits/weight", "layout"):
        wt.add_column(col, justify="right" if col in ("bytes", "GiB", "bits/weight") else "left")
    for w in e.weights:
        name = f"[bold]{w.format}[/]" if w.format == e.plan_format else w.format
        wt.add_row(
            name,
            f"{w.bytes:,}",
            _gib(w.bytes),
            f"{w.bits_per_weight:.3f}" + ("" if w.exact else " ~"),
            w.description,
        )
    stdout.print(wt)

    kv = e.kv_cache
    stdout.print(
        f"KV cache ({kv.dtype}): {kv.bytes_per_token:,} bytes/token; "
        f"batch {kv.batch} x context {kv.context:,} = [bold]{kv.bytes:,}[/] bytes ({_gib(kv.bytes)})"
    )

    g = e.gpu
    tt = Table(
        title=f"{g.name}: {_gib(g.memory_bytes)}, {g.bandwidth_bytes_per_s / 1e12:.2f} TB/s; "
        f"{e.plan_format} weights, {e.utilization:.0%} of memory usable"
    )
    for col in (
        "GPUs (tensor parallel)",
        "weights / GPU",
        "KV / sequence / GPU",
        "max batch",
        f"batch {kv.batch} fits",
    ):
        tt.add_column(col, justify="right")
    for f in e.tensor_parallel:
        fits = "[green]yes[/]" if f.fits else ("[red]no[/]" if f.valid else "[yellow]heads do not split[/]")
        tt.add_row(
            str(f.tp),
            human_bytes(f.weight_bytes_per_gpu),
            human_bytes(f.kv_bytes_per_sequence_per_gpu),
            f"{f.max_batch:,}" if f.valid else "-",
            fits,
        )
    stdout.print(tt)

    if e.min_gpus is not None and e.decode_ceiling_batch1_tokens_per_s is not None:
        stdout.print(
            f"Smallest fit: [bold]{e.min_gpus} x {g.name}[/]. Decode ceiling at batch 1: "
            f"{e.decode_ceiling_batch1_tokens_per_s:,.1f} tokens/s (bandwidth / bytes read per step)."
        )
    if e.cost is not None:
        c = e.cost
        line = f"Decode {c.tokens_per_s:,.1f} tokens/s at batch {c.batch} ({c.source}: {escape(c.source_detail)})"
        if c.usd_per_million_tokens is not None:
            line += (
                f"\n  -> [bold]${c.usd_per_million_tokens:,.4f} per million tokens[/] "
                f"at ${c.hourly_usd:,.2f}/GPU-hour x {c.gpus} GPU(s)"
            )
        else:
            line += "\n  (pass --gpu-hourly-cost USD for the cost per million tokens)"
        stdout.print(line)
    for note in e.notes:
        stdout.print(f"[yellow]note:[/] {note}")
