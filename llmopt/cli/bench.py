"""``llmopt bench``, and the throughput options and table that ``llmopt eval --throughput`` shares."""

from __future__ import annotations

from typing import TYPE_CHECKING, Annotated, Any

import typer
from rich.table import Table

from llmopt.cli._common import (
    DeviceOpt,
    JsonFileOpt,
    JsonOpt,
    JsonOutput,
    LegacyJsonCommand,
    QuietOpt,
    human_bytes,
    invalid_option,
    stdout,
    stdout_is_ours,
)
from llmopt.errors import InputError

if TYPE_CHECKING:
    from llmopt.evaluate.throughput import ThroughputSettings

BatchSizesOpt = Annotated[
    str | None, typer.Option(help="Decode batch sizes, comma-separated (default: GPU 1,8,32; CPU 1,4).")
]
PromptLensOpt = Annotated[
    str | None,
    typer.Option(help="Prefill prompt lengths, comma-separated; decoding starts after the first (GPU 128,512,2048)."),
]
GenLenOpt = Annotated[int | None, typer.Option(help="Tokens generated per timed decode run (GPU 128, CPU 16).")]
WarmupOpt = Annotated[int, typer.Option(help="Untimed runs before each timed point.")]
RepetitionsOpt = Annotated[int, typer.Option(help="Timed runs per point (medians and spread are over these).")]
DecodeModeOpt = Annotated[
    str,
    typer.Option(
        help="auto (best that works), compile (torch.compile + CUDA graph), graph (CUDA graph), "
        "eager (static cache, no graph)."
    ),
]
MarlinAtomicsOpt = Annotated[
    bool,
    typer.Option(
        "--marlin-atomics/--no-marlin-atomics",
        help="GPTQ on Marlin: reduce narrow-output layers (k/v projections) with atomicAdd while timing, "
        "as GPTQModel does for AWQ (1.19x -> 1.52x FP16 on an 8B shape, H200); not bit-for-bit repeatable.",
    ),
]
HourlyCostOpt = Annotated[
    float | None, typer.Option(help="Price of the GPU per hour, to report cost per million generated tokens.")
]
# Shared by quantize, eval and bench: without it a folder with its own Python code (auto_map) is refused.
TrustRemoteCodeOpt = Annotated[
    bool,
    typer.Option(
        "--trust-remote-code",
        help="Allow the model folder's own Python code (config auto_map) to run; read it first. Default: refuse.",
    ),
]


def throughput_settings(
    enabled: bool,
    batch_sizes: str | None,
    prompt_lens: str | None,
    gen_len: int | None,
    warmup: int,
    repetitions: int,
    decode_mode: str,
    gpu_hourly_cost: float | None,
    marlin_atomics: bool = True,
) -> ThroughputSettings | None:
    """Settings from CLI flags, or None when throughput was not asked for."""
    from pydantic import ValidationError

    from llmopt.evaluate.throughput import ThroughputSettings, parse_int_list

    if not enabled:
        given = [
            name
            for name, value in (
                ("--batch-sizes", batch_sizes),
                ("--prompt-lens", prompt_lens),
                ("--gen-len", gen_len),
                ("--gpu-hourly-cost", gpu_hourly_cost),
                ("--no-marlin-atomics", None if marlin_atomics else False),
                ("--decode-mode", None if decode_mode == "auto" else decode_mode),
                ("--warmup", None if warmup == 2 else warmup),  # the options' defaults
                ("--repetitions", None if repetitions == 5 else repetitions),
            )
            if value is not None
        ]
        if given:
            raise InputError(f"{', '.join(given)} only apply to throughput.", "Add --throughput, or leave them out.")
        return None
    try:
        return ThroughputSettings(
            batch_sizes=parse_int_list(batch_sizes, "--batch-sizes"),
            prompt_lens=parse_int_list(prompt_lens, "--prompt-lens"),
            gen_len=gen_len,
            warmup=warmup,
            repetitions=repetitions,
            decode_mode=decode_mode,
            gpu_hourly_cost=gpu_hourly_cost,
            marlin_atomics=marlin_atomics,
        )
    except ValidationError as exc:
        raise invalid_option(exc, "a throughput option", "See `llmopt bench --help` for the valid values.") from None


def check_speed_gate(settings: ThroughputSettings | None, min_decode_speedup: float | None, at_batch: int) -> None:
    """A decode-speed gate needs throughput at the batch size it reads."""
    if min_decode_speedup is None:
        return
    if settings is None:
        raise InputError("--min-decode-speedup needs a speed measurement.", "Add --throughput.")
    if settings.batch_sizes is not None and at_batch not in settings.batch_sizes:
        raise InputError(
            f"--at-batch {at_batch} is not among --batch-sizes {','.join(map(str, settings.batch_sizes))}.",
            f"Add {at_batch} to --batch-sizes, or pick --at-batch from them.",
        )


def _fmt(value: float | None, spec: str = ".1f", suffix: str = "") -> str:
    return "-" if value is None else f"{value:{spec}}{suffix}"


def _med(block: dict[str, Any] | None, key: str) -> float | None:
    return ((block or {}).get(key) or {}).get("median")


def _spread(block: dict[str, Any] | None, key: str) -> str:
    stats = (block or {}).get(key) or {}
    if "median" not in stats:
        return (block or {}).get("error", "-")
    return f"{stats['median']:,.1f} ({stats['min']:,.0f}-{stats['max']:,.0f})"


def render_model_speed(title: str, rows: list[tuple[str, dict[str, Any]]], speedups: dict[str, Any] | None) -> None:
    """One table per measurement: decode per batch size, prefill per prompt length, roofline, memory."""
    if not rows:
        return
    first = rows[0][1]
    batches = list(first.get("decode", {}).keys())
    prompts = list(first.get("prefill", {}).keys())
    table = Table(title=title)
    # The name is what tells the rows apart: never cut it to a few characters to fit the numbers.
    table.add_column("model", min_width=min(40, max(len(name) for name, _ in rows)), overflow="fold")
    for b in batches:
        table.add_column(f"decode tok/s b{b} (min-max)", justify="right")
    for p in prompts:
        table.add_column(f"prefill tok/s {p}", justify="right")
    for col in ("TTFT ms", "ITL p50/p99 ms b1", "roofline b1", "peak mem", "weights", "decode mode"):
        table.add_column(col, justify="right")
    for name, r in rows:
        itl = (r.get("decode", {}).get("1") or {}).get("itl_ms") or {}
        roof = (r.get("roofline") or {}).get("fraction_at_batch_1")
        table.add_row(
            name,
            *[_spread(r["decode"].get(b), "tokens_per_s") for b in batches],
            *[_fmt(_med(r["prefill"].get(p), "tokens_per_s"), ",.0f") for p in prompts],
            _fmt(r.get("ttft_ms"), ".1f"),
            f"{_fmt(itl.get('p50'), '.2f')}/{_fmt(itl.get('p99'), '.2f')}",
            _fmt(None if roof is None else 100 * roof, ".1f", "%"),
            human_bytes(r.get("peak_memory_bytes")),
            human_bytes(r.get("weight_bytes_per_step")),
            str(r.get("decode_mode") or "-"),
        )
    if speedups:
        table.add_row(
            "speedup",
            *[_fmt(speedups["decode_speedup"].get(b), ".2f", "x") for b in batches],
            *[_fmt(speedups["prefill_speedup"].get(p), ".2f", "x") for p in prompts],
            *["" for _ in range(6)],
        )
    stdout.print(table)
    for name, r in rows:
        if r.get("decode_mode_note"):
            stdout.print(f"[yellow]{name}[/]: {r['decode_mode_note']}")
        costs = r.get("cost_per_million_tokens")
        if costs:
            parts = ", ".join(f"b{b} ${c:.3f}" for b, c in costs.items() if c is not None)
            stdout.print(f"{name}: cost per million generated tokens: {parts}")


def render_throughput(section: dict[str, Any]) -> None:
    """The throughput block of an eval report."""
    s = section["settings"]
    render_model_speed(
        f"throughput on {section['device']} (decode after {s['prompt_lens'][0]} prompt tokens, "
        f"{s['gen_len']} new tokens, {s['repetitions']} runs)",
        [("FP16 baseline", section["baseline"]), ("artifact", section["artifact"])],
        section,
    )


def model_label(spec: str | None) -> str:
    """A short readable name for a model argument: a folder's own name (an llmopt artifact's with its method),
    a Hub id as given."""
    import json
    from pathlib import Path

    if not spec:
        return "model"
    path = Path(spec).expanduser()
    if not path.exists():
        return spec  # a Hub id
    name = path.resolve().name or str(path)
    manifest = path / "llmopt.json" if path.is_dir() else None
    if manifest is not None and manifest.is_file():
        try:
            backend = json.loads(manifest.read_text()).get("backend")
        except (OSError, ValueError):
            backend = None
        if backend and backend not in name:
            return f"{name} ({backend})"
    return name


def render_bench(result: dict[str, Any]) -> None:
    s = result["settings"]
    for run in result["runs"]:
        rows = [(f"baseline: {model_label(result.get('baseline'))}", run["baseline"])] if "baseline" in run else []
        rows.append((model_label(str(result["model"])), run["model"]))
        render_model_speed(
            f"{result['device']}, attention {run['attn_implementation']} (decode after {s['prompt_lens'][0]} "
            f"prompt tokens, {s['gen_len']} new, {s['repetitions']} runs)",
            rows,
            run if "decode_speedup" in run else None,
        )
    for attn, why in result.get("skipped_attention", {}).items():
        stdout.print(f"attention {attn}: skipped ({why})")


def register(app: typer.Typer) -> None:
    @app.command("bench", cls=LegacyJsonCommand)
    def bench_cmd(
        model: Annotated[str, typer.Argument(help="Model folder, .gguf, Hub id, or llmopt artifact folder.")],
        baseline: Annotated[
            str | None, typer.Option(help="Also measure this FP16 model, side by side, and report speedups.")
        ] = None,
        attn: Annotated[
            str | None,
            typer.Option(help="Compare attention implementations, e.g. eager,sdpa,flash_attention_2 (installed only)."),
        ] = None,
        batch_sizes: BatchSizesOpt = None,
        prompt_lens: PromptLensOpt = None,
        gen_len: GenLenOpt = None,
        warmup: WarmupOpt = 2,
        repetitions: RepetitionsOpt = 5,
        decode_mode: DecodeModeOpt = "auto",
        gpu_hourly_cost: HourlyCostOpt = None,
        marlin_atomics: MarlinAtomicsOpt = True,
        kernel: Annotated[str | None, typer.Option(help="GPTQ/AWQ kernel (GPTQModel backend name).")] = None,
        json_out: JsonOpt = False,
        json_file: JsonFileOpt = None,
        device: DeviceOpt = "auto",
        quiet: QuietOpt = False,
        trust_remote_code: TrustRemoteCodeOpt = False,
    ) -> None:
        """Serving speed of MODEL: prefill, decode per batch size, latency, memory, % of bandwidth roofline.

        Decoding runs over a static KV cache inside a CUDA graph (torch.compile where it works); the
        mode used is reported. Each model is measured in a process of its own (a crash stays there); with
        --baseline both are measured with the same settings and compared.
        """
        from llmopt.evaluate.throughput import bench
        from llmopt.progress import default_reporter

        settings = throughput_settings(
            True, batch_sizes, prompt_lens, gen_len, warmup, repetitions, decode_mode, gpu_hourly_cost, marlin_atomics
        )
        attn_list = [a.strip() for a in attn.split(",") if a.strip()] if attn else None
        out = JsonOutput(json_out, json_file)
        out.check(model, baseline)
        with stdout_is_ours():
            result = bench(
                model,
                baseline=baseline,
                settings=settings,
                attn=attn_list,
                device=device,
                kernel=kernel,
                reporter=default_reporter(quiet or out.to_stdout),
                trust_remote_code=trust_remote_code,
            )
        out.emit(result)
        if out.human:
            render_bench(result)
