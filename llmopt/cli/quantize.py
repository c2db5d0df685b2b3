"""``llmopt quantize``."""

from __future__ import annotations

import shlex
from pathlib import Path
from typing import Annotated, Any

import typer

from llmopt.cli._common import (
    DeviceOpt,
    JsonCommand,
    JsonFileOpt,
    JsonOpt,
    JsonOutput,
    QuietOpt,
    human_bytes,
    parse_key_values,
    stdout,
    stdout_is_ours,
)
from llmopt.cli.bench import TrustRemoteCodeOpt


def merge_options(flags: dict[str, Any], pairs: list[str] | None) -> dict[str, Any]:
    """Typed flags and ``-O key=value`` pairs as one options dict; the same option set to two values is refused
    (``--double-quant -O double_quant=false`` would otherwise resolve silently to whichever came last)."""
    from llmopt.errors import InputError

    options: dict[str, Any] = {}
    given_as: dict[str, str] = {}
    for key, value in flags.items():
        if value is None:
            continue
        name = key.replace("_", "-")
        options[key] = value
        given_as[key] = (f"--{name}" if value else f"--no-{name}") if isinstance(value, bool) else f"--{name} {value}"
    for pair in pairs or []:
        for key, value in parse_key_values([pair]).items():
            if key in options and options[key] != value:
                raise InputError(
                    f"{given_as[key]} and -O {pair} set '{key}' to different values.",
                    "Give each option once, either as its flag or as -O key=value.",
                )
            options[key] = value
            given_as.setdefault(key, f"-O {pair}")
    return options


def register(app: typer.Typer) -> None:
    @app.command("quantize", cls=JsonCommand)
    def quantize_cmd(
        model: Annotated[str, typer.Argument(help="A Hugging Face model folder, a .gguf file, or a Hub id.")],
        method: Annotated[str, typer.Option("--method", "-m", help="Backend: see `llmopt backends`.")],
        output: Annotated[Path, typer.Option("--output", "-o", help="Artifact folder to create.")],
        bits: Annotated[int | None, typer.Option(help="Bits per weight (gptq: 2, 3, 4, 8).")] = None,
        group_size: Annotated[int | None, typer.Option(help="Group size (gptq); -1 = per row.")] = None,
        desc_act: Annotated[bool | None, typer.Option("--desc-act/--no-desc-act", help="GPTQ act-order.")] = None,
        sym: Annotated[bool | None, typer.Option("--sym/--no-sym", help="Symmetric quantization (gptq).")] = None,
        damp_percent: Annotated[float | None, typer.Option(help="GPTQ Hessian dampening (0-1).")] = None,
        true_sequential: Annotated[
            bool | None, typer.Option("--true-sequential/--no-true-sequential", help="GPTQ sub-layer order.")
        ] = None,
        llm_int8_threshold: Annotated[float | None, typer.Option(help="bnb-int8 outlier threshold.")] = None,
        double_quant: Annotated[
            bool | None, typer.Option("--double-quant/--no-double-quant", help="bnb 4-bit double quantization.")
        ] = None,
        compute_dtype: Annotated[str | None, typer.Option(help="bnb 4-bit compute dtype.")] = None,
        zero_point: Annotated[
            bool | None, typer.Option("--zero-point/--no-zero-point", help="AWQ zero point (asymmetric); default on.")
        ] = None,
        awq_version: Annotated[
            str | None, typer.Option("--version", help="AWQ packing: gemm (default; runs everywhere) or gemv (CUDA).")
        ] = None,
        quant_type: Annotated[
            str | None, typer.Option(help="gguf: llama.cpp type (q8_0, q6_k, q5_k_m, q4_k_m, iq4_xs, f16, ...).")
        ] = None,
        imatrix: Annotated[
            str | None, typer.Option(help="gguf: importance matrix: none, auto (from --calibration) or a file.")
        ] = None,
        option: Annotated[
            list[str] | None, typer.Option("--option", "-O", help="Any backend option as key=value (repeatable).")
        ] = None,
        calibration: Annotated[
            str | None, typer.Option(help="Calibration text: .txt/.jsonl/.parquet file, or wikitext2 / c4.")
        ] = None,
        samples: Annotated[int, typer.Option(help="Calibration samples.")] = 128,
        seq_len: Annotated[int, typer.Option(help="Tokens per calibration sample.")] = 512,
        seed: Annotated[int, typer.Option(help="Seed for picking calibration samples.")] = 0,
        device: DeviceOpt = "auto",
        overwrite: Annotated[
            bool, typer.Option(help="Replace OUTPUT if it is an llmopt artifact (with only its own files in it).")
        ] = False,
        json_out: JsonOpt = False,
        json_file: JsonFileOpt = None,
        quiet: QuietOpt = False,
        trust_remote_code: TrustRemoteCodeOpt = False,
    ) -> None:
        """Quantize MODEL with METHOD into an artifact folder (model files + llmopt.json)."""
        from llmopt.api import quantize
        from llmopt.progress import default_reporter

        flags: dict[str, Any] = {
            "bits": bits,
            "group_size": group_size,
            "desc_act": desc_act,
            "sym": sym,
            "damp_percent": damp_percent,
            "true_sequential": true_sequential,
            "llm_int8_threshold": llm_int8_threshold,
            "double_quant": double_quant,
            "compute_dtype": compute_dtype,
            "zero_point": zero_point,
            "version": awq_version,
            "quant_type": quant_type,
            "imatrix": imatrix,
        }
        options = merge_options(flags, option)
        out = JsonOutput(json_out, json_file)
        out.check(model, calibration, creates=output)
        with stdout_is_ours():
            artifact = quantize(
                model,
                method,
                output,
                options=options,
                calibration=calibration,
                samples=samples,
                seq_len=seq_len,
                seed=seed,
                device=device,
                overwrite=overwrite,
                reporter=default_reporter(quiet or out.to_stdout),
                trust_remote_code=trust_remote_code,
            )
        m = artifact.manifest
        out.emit(m.model_dump(mode="json"))
        if not out.human:
            return
        stdout.print(
            f"[green]✓[/] {m.backend} artifact written to [bold]{artifact.path}[/]: "
            f"{human_bytes(artifact.size_bytes())} in {len(m.files)} files, quantized in {m.quantize_seconds:.1f} s"
        )
        # markup off and quoted: a path with spaces or brackets must come out as a command that pastes back
        stdout.print(
            "  next: " + shlex.join(["llmopt", "eval", str(artifact.path), "--baseline", model])
            + " --dataset TEXT_FILE --max-ppl-increase 5",
            markup=False,
            highlight=False,
            soft_wrap=True,
        )
