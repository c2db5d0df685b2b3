"""``llmopt serve-bench``: an OpenAI-compatible server under a request trace, per request rate."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Annotated

import typer
from rich.table import Table

from llmopt.cli._common import (
    JsonFileOpt,
    JsonOpt,
    JsonOutput,
    LegacyJsonCommand,
    QuietOpt,
    invalid_option,
    stderr,
    stdout,
    stdout_is_ours,
    write_json,
)
from llmopt.errors import EXIT_GATE, BackendUnavailableError, InputError, OutputExistsError

if TYPE_CHECKING:
    from llmopt.serving.bench import ServeBenchResult
    from llmopt.serving.metrics import LatencyStats


def _floats(text: str, option: str) -> list[float]:
    try:
        values = [float(v) for v in text.split(",") if v.strip()]
    except ValueError:
        raise InputError(f"{option} {text!r} is not a list of numbers.", f"E.g. {option} 1,2,4") from None
    if not values or any(not v > 0 for v in values):
        raise InputError(f"{option} {text!r}: give positive numbers.", f"E.g. {option} 1,2,4")
    return sorted(dict.fromkeys(values))


def _ms(stats: LatencyStats | None, *pcts: str) -> str:
    if stats is None:
        return "-"
    return "/".join(
        f"{getattr(stats, p):,.0f}" if getattr(stats, p) >= 10 else f"{getattr(stats, p):.1f}" for p in pcts
    )


def render(result: ServeBenchResult) -> None:
    from llmopt.serving.metrics import capacity_text, sweep_verdict

    labels = list(dict.fromkeys(p.label for m in result.models for p in m.points))
    for label in labels:
        table = Table(title=f"{label}: {result.trace['requests']} requests")
        width = max(len(m.label) + (10 if m.role == "baseline" else 0) for m in result.models)
        table.add_column("model", min_width=min(40, width), overflow="fold")
        for col in (
            "server",
            "ok/err",
            "req/s",
            "out tok/s",
            "TTFT p50/p95/p99 ms",
            "ITL p50/p95 ms",
            "TPOT p50 ms",
            "E2E p50/p95 ms",
        ):
            table.add_column(col, justify="left" if col in ("model", "server") else "right")
        has_slo = result.slo is not None
        has_cache = any(p.prefix_cache_hit is not None for m in result.models for p in m.points)
        if has_cache:
            table.add_column("prefix cache hit", justify="right")
        if has_slo:
            table.add_column("goodput req/s", justify="right")
            table.add_column("SLO", justify="right")
        for m in result.models:
            p = next((p for p in m.points if p.label == label), None)
            if p is None:
                continue
            role = f"baseline: {m.label}" if m.role == "baseline" else m.label
            row = [
                role,
                m.server.kind,
                f"{p.ok}/{p.errors}",
                f"{p.requests_per_s:.2f}",
                "-" if p.output_tokens_per_s is None else f"{p.output_tokens_per_s:,.1f}",
            ]
            if p.saturated:
                row += ["saturated", "", "", capacity_text(p)]
            else:
                row += [
                    _ms(p.ttft_ms, "p50", "p95", "p99"),
                    _ms(p.itl_ms, "p50", "p95"),
                    _ms(p.tpot_ms, "p50"),
                    _ms(p.e2e_ms, "p50", "p95") + (f" [yellow]{capacity_text(p)}[/]" if p.at_capacity else ""),
                ]
            if has_cache:
                row.append("-" if p.prefix_cache_hit is None else f"{100 * p.prefix_cache_hit:.0f}%")
            if has_slo:
                row += [
                    "-" if p.goodput_per_s is None else f"{p.goodput_per_s:.2f}",
                    "-" if p.slo_passed is None else ("pass" if p.slo_passed else "[red]fail[/]"),
                ]
            table.add_row(*row)
        stdout.print(table)
    for m in result.models:
        for p in m.points:
            if p.saturated:
                stdout.print(
                    f"[yellow]{m.label} at {p.label}[/]: saturated ({p.saturation_note}); latency "
                    "percentiles not reported (they grow with the length of the run)"
                )
            for err in p.error_samples:
                stdout.print(f"[red]{m.label} at {p.label}[/]: {err}")
            if p.cost_per_million_tokens is not None:
                stdout.print(f"{m.label} at {p.label}: ${p.cost_per_million_tokens:.3f} per million output tokens")
            if p.at_capacity:
                stdout.print(f"[yellow]{m.label} at {p.label}[/]: {p.capacity_note}")
        verdict = sweep_verdict(m.saturation)
        if verdict is not None:
            stdout.print(f"{m.label}: {verdict}")
        elif any(p.mode == "rate" for p in m.points):
            stdout.print(f"{m.label}: kept up at every rate swept")
        if m.failed:
            stdout.print(f"[red]{m.label}: FAILED[/]: {m.failed}")
    if result.gate is not None:
        g = result.gate
        verdict = "[green]passed[/]" if g["passed"] else "[red]failed[/]"
        stdout.print(f"SLO gate ({g['slo']}): {verdict}")
        for c in g["checks"]:
            if not c["passed"]:
                value = "not measured" if c["value"] is None else f"{c['value']:,.1f}"
                stdout.print(f"  {c['point']}: {c['name']} = {value} (limit {c['limit']:g})")
    if result.out_dir:
        stdout.print(f"serve-bench.json, plots, server logs and per-request records: {result.out_dir}")


def _check_out(out: str | None) -> Path | None:
    if out is None:
        return None
    path = Path(out).expanduser().absolute()
    if path.exists() and (not path.is_dir() or any(path.iterdir())):
        raise OutputExistsError(
            f"--out {out} exists and is not an empty folder.", "Give a new folder (it is created), or empty it."
        )
    return path


def register(app: typer.Typer) -> None:
    @app.command("serve-bench", cls=LegacyJsonCommand)
    def serve_bench_cmd(
        model: Annotated[
            str | None,
            typer.Argument(help="Artifact or model: .gguf / GGUF artifact (llama.cpp), HF folder (transformers)."),
        ] = None,
        baseline: Annotated[
            str | None, typer.Option(help="Also serve this model (e.g. the FP16) with the same trace, side by side.")
        ] = None,
        url: Annotated[
            str | None,
            typer.Option(help="Measure the OpenAI-compatible server running here instead of starting one."),
        ] = None,
        baseline_url: Annotated[str | None, typer.Option(help="The baseline's running server.")] = None,
        served_model: Annotated[
            str | None, typer.Option(help="The request's model name for --url (default: the first it lists).")
        ] = None,
        server: Annotated[
            str,
            typer.Option(
                help="Which server to start: auto (GGUF: llama.cpp, else transformers), llama.cpp, transformers, vllm."
            ),
        ] = "auto",
        rates: Annotated[
            str | None, typer.Option(help="Request rates (req/s) to sweep, Poisson arrivals, e.g. 0.5,1,2.")
        ] = None,
        concurrency: Annotated[
            int | None, typer.Option(help="Instead of rates: this many clients, each sending when the last ended.")
        ] = None,
        requests: Annotated[int, typer.Option(help="Timed requests per rate.")] = 32,
        warmup: Annotated[int, typer.Option(help="Untimed requests before each rate.")] = 2,
        prompt_len: Annotated[
            str, typer.Option(help="Prompt tokens: 128, 64-256 (uniform), normal:MEAN,SD or exp:MEAN.")
        ] = "128",
        output_len: Annotated[str, typer.Option(help="Output tokens (max_tokens), same forms.")] = "64",
        prompts_file: Annotated[
            str | None, typer.Option(help="Real prompts instead of generated ones: .txt (one a line) or .jsonl.")
        ] = None,
        prefix_len: Annotated[int, typer.Option(help="Tokens of a shared system prompt.")] = 0,
        prefix_share: Annotated[float, typer.Option(help="Share of requests (0-1) that start with it.")] = 0.0,
        prefix_caching: Annotated[
            bool | None,
            typer.Option("--prefix-caching/--no-prefix-caching", help="Server's prefix caching (default: its own)."),
        ] = None,
        seed: Annotated[int, typer.Option(help="Seed of the trace (arrivals, lengths, prompts).")] = 0,
        slo: Annotated[
            str | None,
            typer.Option(
                help="Latency targets, e.g. ttft_p95=500ms,itl_p95=50ms,min_goodput=2,at_rate=4; "
                "exit 3 when the model misses them."
            ),
        ] = None,
        tokenizer: Annotated[
            str | None, typer.Option(help="Tokenizer folder for prompt lengths (default: the first model folder).")
        ] = None,
        ignore_eos: Annotated[
            bool | None,
            typer.Option(
                "--ignore-eos/--stop-at-eos",
                help="Generate max_tokens always (default: where the started server supports it; off for --url).",
            ),
        ] = None,
        port: Annotated[int | None, typer.Option(help="Port for the started server (default: a free one).")] = None,
        threads: Annotated[int | None, typer.Option(help="llama.cpp CPU threads.")] = None,
        parallel: Annotated[int, typer.Option(help="llama.cpp slots (sequences decoded together).")] = 4,
        context: Annotated[int, typer.Option(help="Context tokens per sequence.")] = 2048,
        continuous_batching: Annotated[
            bool, typer.Option("--continuous-batching/--no-continuous-batching", help="transformers serve.")
        ] = True,
        device: Annotated[
            str,
            typer.Option(
                help="Where the started server runs the model: auto (the server's default), cpu, cuda, cuda:N "
                "(transformers serve --device; llama.cpp: every layer on that GPU, none for cpu)."
            ),
        ] = "auto",
        dtype: Annotated[
            str | None, typer.Option(help="transformers serve --dtype (default: float32 on CPU, else the model's).")
        ] = None,
        server_arg: Annotated[
            list[str] | None, typer.Option("--server-arg", help="Extra argument for the server (repeatable).")
        ] = None,
        startup_timeout: Annotated[float, typer.Option(help="Seconds to wait for the server to be ready.")] = 300.0,
        request_timeout: Annotated[float, typer.Option(help="Seconds before a request counts as failed.")] = 300.0,
        gpu_hourly_cost: Annotated[
            float | None, typer.Option(help="Price of the machine per hour: cost per million output tokens.")
        ] = None,
        out: Annotated[
            str | None, typer.Option(help="Folder for serve-bench.json, server logs and per-request records.")
        ] = None,
        json_out: JsonOpt = False,
        json_file: JsonFileOpt = None,
        quiet: QuietOpt = False,
    ) -> None:
        """Serving under load: starts an OpenAI-compatible server for MODEL (or measures one at --url), sends a
        request trace at each rate, and reports TTFT, inter-token and end-to-end latency percentiles, tokens/s,
        goodput under --slo and where the server saturates; side by side with --baseline."""
        from pydantic import ValidationError

        from llmopt.serving.bench import Target, serve_bench
        from llmopt.serving.metrics import parse_slo
        from llmopt.serving.servers import ServerOptions, check_server_device
        from llmopt.serving.trace import LengthDist, TraceSpec

        if model is None and url is None:
            raise InputError("give a MODEL to serve, or --url of a running server.", "See llmopt serve-bench --help.")
        if baseline_url and not (baseline or url):
            raise InputError("--baseline-url needs --url for the model.", "Measure both running servers by URL.")
        if (rates is None) == (concurrency is None):
            rates = rates or (None if concurrency else "1")
            if rates is not None and concurrency is not None:
                raise InputError("--rates and --concurrency exclude each other.", "Give one of them.")
        try:
            trace = TraceSpec(
                rates=_floats(rates, "--rates") if rates else None,
                concurrency=concurrency,
                requests=requests,
                warmup=warmup,
                prompt_len=LengthDist.parse(prompt_len, "--prompt-len"),
                output_len=LengthDist.parse(output_len, "--output-len"),
                prefix_len=prefix_len,
                prefix_share=prefix_share,
                prompts_file=prompts_file,
                seed=seed,
            )
        except ValidationError as exc:
            raise invalid_option(exc, "the trace", "See llmopt serve-bench --help.") from None
        if prompts_file:
            from llmopt.serving.trace import read_prompts

            read_prompts(prompts_file)  # a bad file is refused before any server starts
        slo_spec = parse_slo(slo)
        targets = []
        if baseline or baseline_url:
            targets.append(
                Target(
                    role="baseline",
                    model=baseline,
                    url=baseline_url,
                    server=server,
                    model_name=served_model if baseline_url else None,
                )
            )
        targets.append(Target(role="model", model=model, url=url, server=server, model_name=served_model))
        out_dir = _check_out(out)
        json_to = JsonOutput(json_out, json_file)
        json_to.check(model, baseline)
        opts = ServerOptions(
            # a --url run starts no server: its device has nothing to say
            device=check_server_device(device) if any(not t.url for t in targets) else "auto",
            port=port,
            threads=threads,
            parallel=parallel,
            context=context,
            prefix_caching=prefix_caching,
            continuous_batching=continuous_batching,
            dtype=dtype,
            startup_timeout=startup_timeout,
            extra_args=server_arg or [],
        )
        if port is not None and len([t for t in targets if not t.url]) > 1:
            raise InputError("--port fits one started server; two would be started.", "Leave --port out.")

        def log(line: str) -> None:
            if not quiet:
                stderr.print(line, highlight=False)

        with stdout_is_ours():
            result = serve_bench(
                targets,
                trace,
                slo=slo_spec,
                server_options=opts,
                tokenizer=tokenizer,
                out_dir=out_dir,
                ignore_eos=ignore_eos,
                request_timeout=request_timeout,
                gpu_hourly_cost=gpu_hourly_cost,
                log=log,
            )
        data = result.model_dump(mode="json")
        if out_dir is not None:
            from llmopt.serving.plots import write_plots

            write_json(data, str(out_dir / "serve-bench.json"))
            write_plots([(m.label, m.points) for m in result.models], out_dir)
        json_to.emit(data)
        if json_to.human:
            render(result)
        if result.failed:
            raise BackendUnavailableError(
                f"the run failed: {result.failed}.", "The measured points are in the report; see the server log."
            )
        if result.gate is not None and not result.gate["passed"]:
            raise typer.Exit(EXIT_GATE)
