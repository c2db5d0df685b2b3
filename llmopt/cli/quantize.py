"""``llmopt quantize``."""

from __future__ import annotations

import contextlib
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
    stdout,
    stdout_is_ours,
)
from llmopt.cli.bench import TrustRemoteCodeOpt

# The typed flags users already type, each the same as -O with the option it names (`llmopt backends --options
# METHOD` lists every option of a backend, with the flag where one exists).
OPTION_FLAGS: dict[str, str] = {
    "bits": "--bits",
    "group_size": "--group-size",
    "desc_act": "--desc-act/--no-desc-act",
    "sym": "--sym/--no-sym",
    "damp_percent": "--damp-percent",
    "true_sequential": "--true-sequential/--no-true-sequential",
    "llm_int8_threshold": "--llm-int8-threshold",
    "double_quant": "--double-quant/--no-double-quant",
    "compute_dtype": "--compute-dtype",
    "zero_point": "--zero-point/--no-zero-point",
    "version": "--version",
    "quant_type": "--quant-type",
    "imatrix": "--imatrix",
    "quantize_lm_head": "--quantize-lm-head/--no-quantize-lm-head",
}


BACKEND_PANEL = "Backend options (each also -O name=value; all of them: llmopt backends --options METHOD)"


def backend_flag(*names: str, help: str) -> Any:
    """A typed flag for a backend option, listed in --help apart from the command's own options."""
    return typer.Option(*names, help=help, rich_help_panel=BACKEND_PANEL)


def merge_options(flags: dict[str, Any], pairs: list[str] | None, method: str | None = None) -> dict[str, Any]:
    """Typed flags and ``-O key=value`` pairs as one options dict, values read by ``method``'s options model
    (backends/base.py ``options_from_cli``); the same option set to two values is refused."""
    from llmopt.backends.base import Backend, describe_backend
    from llmopt.backends.options import options_from_cli
    from llmopt.errors import LlmoptError

    backend: Backend | None = None
    if method is not None:
        # unknown or broken: read without types here; the quantize call reports it with its own message
        with contextlib.suppress(LlmoptError):
            backend = describe_backend(method)
    return options_from_cli(backend, flags, pairs)


def register(app: typer.Typer) -> None:
    @app.command("quantize", cls=JsonCommand)
    def quantize_cmd(
        model: Annotated[str, typer.Argument(help="A Hugging Face model folder, a .gguf file, or a Hub id.")],
        method: Annotated[str, typer.Option("--method", "-m", help="Backend: see `llmopt backends`.")],
        output: Annotated[Path, typer.Option("--output", "-o", help="Artifact folder to create.")],
        bits: Annotated[int | None, backend_flag(help="Bits per weight (gptq: 2, 3, 4, 8).")] = None,
        group_size: Annotated[int | None, backend_flag(help="Group size (gptq); -1 = per row.")] = None,
        desc_act: Annotated[bool | None, backend_flag("--desc-act/--no-desc-act", help="GPTQ act-order.")] = None,
        sym: Annotated[bool | None, backend_flag("--sym/--no-sym", help="Symmetric quantization (gptq).")] = None,
        damp_percent: Annotated[float | None, backend_flag(help="GPTQ Hessian dampening (0-1).")] = None,
        true_sequential: Annotated[
            bool | None, backend_flag("--true-sequential/--no-true-sequential", help="GPTQ sub-layer order.")
        ] = None,
        llm_int8_threshold: Annotated[float | None, backend_flag(help="bnb-int8 outlier threshold.")] = None,
        double_quant: Annotated[
            bool | None, backend_flag("--double-quant/--no-double-quant", help="bnb 4-bit double quantization.")
        ] = None,
        compute_dtype: Annotated[str | None, backend_flag(help="bnb 4-bit compute dtype.")] = None,
        zero_point: Annotated[
            bool | None, backend_flag("--zero-point/--no-zero-point", help="AWQ zero point (asymmetric); default on.")
        ] = None,
        awq_version: Annotated[
            str | None, backend_flag("--version", help="AWQ packing: gemm (default; runs everywhere) or gemv (CUDA).")
        ] = None,
        quant_type: Annotated[
            str | None, backend_flag(help="gguf: llama.cpp type (q8_0, q6_k, q5_k_m, q4_k_m, iq4_xs, f16, ...).")
        ] = None,
        imatrix: Annotated[
            str | None, backend_flag(help="gguf: importance matrix: none, auto (from --calibration) or a file.")
        ] = None,
        quantize_lm_head: Annotated[
            bool | None,
            backend_flag(
                "--quantize-lm-head/--no-quantize-lm-head",
                help="gptq: quantize the output head too (tied embeddings get their own head); not awq.",
            ),
        ] = None,
        option: Annotated[
            list[str] | None,
            backend_flag(
                "--option",
                "-O",
                help="Any backend option as key=value (repeatable); `llmopt backends --options METHOD` lists them.",
            ),
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
            "quantize_lm_head": quantize_lm_head,
        }
        options = merge_options(flags, option, method)
        out = JsonOutput(json_out, json_file)
        imatrix = options.get("imatrix")
        imatrix_file = imatrix if isinstance(imatrix, str) and imatrix not in ("none", "auto") else None
        out.check(model, calibration, imatrix_file, creates=output)
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
