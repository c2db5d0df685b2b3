"""``llmopt estimate``: memory, KV cache, GPU count and cost from config.json alone."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Annotated

import typer
from rich.markup import escape
from rich.table import Table

from llmopt.cli._common import JsonCommand, JsonFileOpt, JsonOpt, JsonOutput, human_bytes, stdout

if TYPE_CHECKING:
    from llmopt.estimate import Estimate


def register(app: typer.Typer) -> None:
    @app.command("estimate", cls=JsonCommand)
    def estimate_cmd(
        model: Annotated[
            str, typer.Argument(help="A Hugging Face model folder, the path of a config.json, or a Hub id.")
        ],
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
            typer.Option(help="Report JSON with a `throughput` section: its measured decode speed prices tokens."),
        ] = None,
        gpu_catalog: Annotated[
            Path | None,
            typer.Option(help="YAML file adding GPUs to the built-in catalog (also: $LLMOPT_GPU_CATALOG)."),
        ] = None,
        json_out: JsonOpt = False,
        json_file: JsonFileOpt = None,
    ) -> None:
        """Before downloading: parameters, weight and KV-cache memory, GPUs, cost; from config.json."""
        from llmopt.estimate import estimate

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
