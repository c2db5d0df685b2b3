"""``llmopt bench``: what to measure (settings), the orchestration and the report section.

The measuring itself is the decode engine in llmopt/runners/engine.py (static KV cache, CUDA-graph
decoding, prefill timing, roofline). ``compare`` turns an artifact's and its FP16 baseline's results,
measured with the same settings, into speedups and cost per million generated tokens. ``bench_model``
measures each model in a process of its own (bench_child.py), so that one measurement's failure cannot
change another's outcome.
"""

from __future__ import annotations

import contextlib
import json
from pathlib import Path
from typing import Any

from llmopt.errors import BackendUnavailableError, InputError, LlmoptError
from llmopt.progress import Reporter, SilentReporter
from llmopt.runners.decoder import short_error
from llmopt.specs import ThroughputSpec

THROUGHPUT_SCHEMA = "llmopt.throughput/1"
ATTN_IMPLEMENTATIONS = ("eager", "sdpa", "flash_attention_2", "flash_attention_3", "flex_attention")
# The settings moved to llmopt/specs.py (the ground floor); the old names stay importable from here.
ThroughputSettings = ThroughputSpec


def parse_int_list(text: str | None, option: str) -> list[int] | None:
    """'1,8,32' -> [1, 8, 32]; None stays None."""
    if text is None:
        return None
    try:
        values = [int(part) for part in text.replace(" ", "").split(",") if part]
    except ValueError:
        raise InputError(
            f"{option} '{text}' is not a comma-separated list of integers.", f"Write e.g. {option} 1,8,32."
        ) from None
    if not values or any(v < 1 for v in values):
        raise InputError(f"{option} '{text}' needs positive integers.", f"Write e.g. {option} 1,8,32.")
    return values


# ---------------------------------------------------------------------------------------------------
# Loading, comparing, the `llmopt bench` flow


def runner_kind_for(path: Path) -> str:
    """Which runner loads a model folder: an llmopt artifact says so; a GPTQ/AWQ folder needs GPTQModel."""
    from llmopt.artifact import Artifact
    from llmopt.runners.hf import quant_method

    if (path / "llmopt.json").is_file():
        return Artifact.open(path).manifest.runner
    return "gptqmodel" if (quant_method(path) or "").lower() in ("gptq", "awq") else "hf"


# Formats transformers can only run by decompressing their weights to 16-bit at load: a timing through it would
# be FP16's speed with the format's name on it. compressed-tensors' FP8 dynamic and W4A16 are timed through real
# kernels on a GPU instead (llmopt/runners/compressed.py); its other schemes, and any on a CPU, are refused.
_DECOMPRESSED_ON_LOAD = {"compressed-tensors": "vLLM (`vllm serve`), then `llmopt serve-bench --url`"}


def refuse_decompressed_speed(path: Path, device: str | None = None) -> None:
    """Refuse a speed measurement that could only time decompressed 16-bit weights (``device``: where it would
    run; None refuses every compressed-tensors folder)."""
    from llmopt.errors import BackendUnavailableError
    from llmopt.runners.compressed import refusal
    from llmopt.runners.hf import quant_method

    method = (quant_method(path) or "").lower()
    if method not in _DECOMPRESSED_ON_LOAD:
        return
    why = refusal(path, device) if device is not None else "no device was named"
    if why is None:
        return
    raise BackendUnavailableError(
        f"speed not measured for {path.name}: transformers decompresses {method} weights to 16-bit when it "
        f"loads them, so the number would be FP16's speed, not the format's, and llmopt's own kernels cannot "
        f"time it here: {why}.",
        f"Measure it where its kernels run: {_DECOMPRESSED_ON_LOAD[method]}, or on an NVIDIA GPU for FP8 dynamic "
        "(FP8 units: Ada, Hopper, Blackwell) and W4A16. Perplexity (llmopt eval without --throughput) is measured "
        "as usual.",
    )


def weights_size(path: Path) -> int:
    """Bytes of the weight files in a model folder (what evaluate reports as size on disk)."""
    from llmopt.source import WEIGHT_SUFFIXES

    return sum(p.stat().st_size for p in path.iterdir() if p.is_file() and p.suffix in WEIGHT_SUFFIXES)


def bench_model(
    path: Path,
    device: str,
    settings: ThroughputSettings,
    *,
    runner_kind: str | None = None,
    kernel: str | None = None,
    attn_implementation: str | None = None,
    label: str = "model",
    reporter: Reporter | None = None,
    trust_remote_code: bool = False,
    isolate: bool = True,
) -> dict[str, Any]:
    """Load a model folder through its runner, then measure it.

    ``isolate`` (the default): in a process of its own (llmopt/evaluate/bench_child.py), so that a failed
    CUDA-graph capture, the compiler's state or a crash stays with this one measurement; the result, or
    the error with its real cause, comes back. ``isolate=False`` measures in this process.
    """
    refuse_decompressed_speed(path, device)
    if isolate:
        return _bench_in_child(
            path,
            device,
            settings,
            runner_kind=runner_kind,
            kernel=kernel,
            attn_implementation=attn_implementation,
            label=label,
            reporter=reporter,
            trust_remote_code=trust_remote_code,
        )
    from llmopt.runners import load_runner
    from llmopt.runners.compressed import gptq_copy, install_fp8, speed_scheme

    rep: Any = reporter or SilentReporter()
    kind = runner_kind or runner_kind_for(path)
    scheme = speed_scheme(path)
    with contextlib.ExitStack() as copies:
        load_path = path
        if scheme is not None and scheme.kind == "w4a16":
            # the same codes and scales in GPTQ's layout, through GPTQModel's Marlin kernel (vLLM's for W4A16)
            with rep.step(f"rewriting {label} in GPTQ's layout for Marlin"):
                load_path = copies.enter_context(gptq_copy(path))
            kind = "gptqmodel"
        with rep.step(f"loading {label}"):
            runner = load_runner(
                kind, load_path, device, kernel=kernel, for_speed=True, trust_remote_code=trust_remote_code
            )
    if scheme is not None and scheme.kind == "fp8-dynamic":
        try:
            installed = install_fp8(runner.causal_lm(), path)
        except BaseException:
            runner.close()
            raise
        runner.kernel = f"{scheme.kernel}, {installed.describe()}"
    # W4A16 is named after the measurement: the runner's own kernel name ("gptq_marlin") decides its Marlin
    # settings (the atomicAdd reduction), and renamed before, W4A16 ran without them (1.06x FP16 at batch 1 on
    # the H200 where the same kernel on a GPTQ checkpoint gave 1.25x)
    w4a16_kernel = scheme.kernel if scheme is not None and scheme.kind == "w4a16" else None
    try:
        if attn_implementation:
            _set_attention(runner.model, attn_implementation)  # type: ignore[attr-defined]
        with rep.step(f"throughput of {label}"):
            result: dict[str, Any] = runner.bench(settings, rep)
        result.update(
            {
                "load_seconds": round(runner.load_seconds, 3),
                "footprint_bytes": runner.footprint_bytes(),
                "size_bytes": weights_size(path),
                "runner": runner.name,
                "dtype": runner.dtype,
            }
        )
        if runner.kernel:
            result["kernel"] = runner.kernel
        if w4a16_kernel:
            rewritten = "W4A16 rewritten in GPTQ's layout, lossless"
            result["kernel"] = f"{runner.kernel}: {rewritten}" if runner.kernel else w4a16_kernel
        if runner.placement is not None:
            result["placement"] = runner.placement.record()
        if attn_implementation:
            result["attn_implementation"] = attn_implementation
        return result
    finally:
        runner.close()


def check_speed_settings(settings: ThroughputSpec, device: str, model_path: Path | None = None) -> None:
    """Before any work: the decode mode can run on ``device``, and the longest prompt plus the generated tokens fit
    the model's positions. Found inside the measurement, both cost a whole evaluation first (a hostile tester's
    `--decode-mode graph` on a CPU: 2 minutes of scoring, then exit 2; `--gen-len 100000000`: an allocation
    of 77 GB and exit 1)."""
    from llmopt.runners.decoder import mode_chain

    mode_chain(settings.decode_mode, device)
    if model_path is None or not settings.prompt_lens or not settings.gen_len:
        return
    try:
        config = json.loads((Path(model_path) / "config.json").read_text())
    except (OSError, ValueError):
        return  # the loader says what is wrong with the folder
    text = config.get("text_config") if isinstance(config.get("text_config"), dict) else config
    limit = text.get("max_position_embeddings") if isinstance(text, dict) else None
    longest = max(settings.prompt_lens) + settings.gen_len + 1
    if isinstance(limit, int) and longest > limit:
        raise InputError(
            f"the longest prompt ({max(settings.prompt_lens)} tokens) plus {settings.gen_len} generated tokens "
            f"need {longest} positions; the model has {limit} (max_position_embeddings).",
            "Use shorter --prompt-lens / --gen-len (recipe: evaluation.throughput.prompt_lens / gen_len).",
        )


class MeasurementError(LlmoptError):
    """A speed measurement's own process failed or died; ``exit_code`` says how (1 a bug, 4 a crash)."""

    def __init__(self, message: str, hint: str | None, exit_code: int, detail: str | None = None) -> None:
        super().__init__(message, hint)
        self.exit_code = exit_code
        self.detail = detail  # the child's traceback, for reports


def _child_env() -> dict[str, str]:
    """The child imports this very llmopt, and torch's compile cache persists under llmopt's cache folder."""
    import os

    from llmopt.source import cache_dir

    env = dict(os.environ)
    root = str(Path(__file__).resolve().parents[2])  # the folder holding this llmopt package
    env["PYTHONPATH"] = os.pathsep.join(p for p in (root, env.get("PYTHONPATH", "")) if p)
    # Compiled kernels from one measurement serve the next (another batch size, variant or run) instead
    # of being rebuilt in every child; the user's own setting wins.
    env.setdefault("TORCHINDUCTOR_CACHE_DIR", str(cache_dir() / "torchinductor"))
    return env


def where_time_went(result: dict[str, Any]) -> str | None:
    """One line on where a measurement's wall time went (loading, prefill, each decode point's set-up and timing)."""
    parts: list[str] = []
    if isinstance(result.get("load_seconds"), (int, float)):
        parts.append(f"load {result['load_seconds']:.1f} s")
    seconds = result.get("seconds") or {}
    if isinstance(seconds.get("prefill"), (int, float)):
        parts.append(f"prefill {seconds['prefill']:.1f} s")
    for batch, point in (result.get("decode") or {}).items():
        spent = point.get("seconds") if isinstance(point, dict) else None
        if isinstance(spent, dict):
            parts.append(
                f"batch {batch}: set-up {spent.get('prepare', 0):.1f} s ({point.get('decode_mode')}), "
                f"timed {spent.get('timed', 0):.1f} s"
            )
    return ", ".join(parts) or None


def _stop_child(proc: Any) -> None:
    """Stop a measurement child (SIGTERM, then SIGKILL after 10 s) and reap it."""
    import subprocess

    if proc.poll() is None:
        proc.terminate()
        try:
            proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


def _tail(log: Path, lines: int = 6) -> str:
    try:
        text = log.read_text(errors="replace")
    except OSError:
        return ""
    kept = [ln.strip()[:300] for ln in text.splitlines() if ln.strip()]
    return " | ".join(kept[-lines:])


def _how_it_ended(returncode: int) -> str:
    import signal

    if returncode < 0:
        try:
            name = signal.Signals(-returncode).name
        except ValueError:
            name = f"signal {-returncode}"
        return f"was killed by {name} (signal {-returncode})"
    return f"exited with code {returncode} without a result"


# GPTQModel compiles its Marlin kernels on first use (measured: ~170 s on the H200 machine) and keeps them in
# its own cache; these are where it looks (GPTQModel's utils/cpp.py and utils/marlin.py).
_MARLIN_BUILD_ROOT_ENV = "GPTQMODEL_MARLIN_FP16_BUILD_ROOT"
_GPTQMODEL_EXT_ROOT_ENV = "GPTQMODEL_TORCH_EXTENSIONS_DIR"


def marlin_build_root() -> Path:
    """Where GPTQModel keeps its built fp16 Marlin kernels (its env overrides first, then its default)."""
    import os

    own = os.environ.get(_MARLIN_BUILD_ROOT_ENV)
    if own:
        return Path(own).expanduser()
    root = os.environ.get(_GPTQMODEL_EXT_ROOT_ENV)
    base = Path(root).expanduser() if root else Path.home() / ".cache" / "gptqmodel" / "torch_extensions"
    return base / "marlin_fp16"


def one_time_build_notice(runner_kind: str, device: str, kernel: str | None) -> str | None:
    """A line for the user when GPTQModel is about to compile its Marlin kernels (first use on a machine)."""
    if runner_kind != "gptqmodel" or not device.startswith("cuda") or (kernel and "marlin" not in kernel.lower()):
        return None
    root = marlin_build_root()
    built = root.is_dir() and any(p.suffix in (".so", ".pyd") for p in root.rglob("*"))
    if built:
        return None
    return (
        f"GPTQModel builds its Marlin kernels once on this machine (about 3 minutes on an H200; GPTQModel's "
        f"progress is hidden), kept in {root} for later runs"
    )


def _bench_in_child(
    path: Path,
    device: str,
    settings: ThroughputSettings,
    *,
    runner_kind: str | None,
    kernel: str | None,
    attn_implementation: str | None,
    label: str,
    reporter: Reporter | None,
    trust_remote_code: bool = False,
) -> dict[str, Any]:
    from llmopt import interrupt

    rep: Any = reporter or SilentReporter()
    notice = one_time_build_notice(runner_kind or runner_kind_for(Path(path)), device, kernel)
    if notice:
        rep.info(notice)
    request = {
        "path": str(Path(path).resolve()),
        "device": device,
        "settings": settings.model_dump(mode="json"),
        "runner_kind": runner_kind,
        "kernel": kernel,
        "attn_implementation": attn_implementation,
        "label": label,
        "trust_remote_code": trust_remote_code,
    }
    # Everything the child prints (its progress, third-party logs) goes to a file whose last lines explain a
    # crash; with LLMOPT_DEBUG=1 it goes to the terminal as well as it happens.
    from llmopt.evaluate.bench_process import measurement_env, measurement_over, take_measurement_process

    show = _show_child()
    env = measurement_env(_child_env())
    child = take_measurement_process(device, env, show)
    try:
        with rep.step(f"throughput of {label} (own process)"):
            sent = child.send(request)
            try:
                returncode = child.proc.wait()
            except BaseException:  # Ctrl-C / SIGTERM (raised here by llmopt's handler): the child stops too
                _stop_child(child.proc)
                raise
        interrupt.check()
        return _child_outcome(child.result, child.log, returncode, label, rep, show, child.started_early, sent)
    finally:
        child.stop()
        if not interrupt.requested():
            measurement_over(device, env, show)


def measurement_processes_ahead(
    device: str, measurements: int | None = None
) -> contextlib.AbstractContextManager[None]:
    """Within this block each speed measurement's process is started ahead, during the work before it (on a CUDA
    device; llmopt/evaluate/bench_process.py). ``measurements``: at most how many the block makes (none is
    started after the last)."""
    from llmopt.evaluate.bench_process import measurement_process_ahead

    return measurement_process_ahead(device, _child_env(), show=_show_child(), measurements=measurements)


def _show_child() -> bool:
    import os

    return os.environ.get("LLMOPT_DEBUG") == "1"


def _child_outcome(
    res: Path, log: Path, returncode: int, label: str, rep: Reporter, show: bool, started_early: bool, sent: bool
) -> dict[str, Any]:
    """The measurement's result, or its error raised with the real cause."""
    from llmopt import errors

    data: dict[str, Any] | None = None
    if res.is_file():
        with contextlib.suppress(ValueError, OSError):
            data = json.loads(res.read_text())
    if data is not None and "result" in data:
        result = dict(data["result"])
        startup = result.pop("startup_seconds", None)
        line = where_time_went(result)
        if isinstance(startup, (int, float)):
            ahead = " (while the run went on: started ahead)" if started_early else ""
            line = f"process start-up {startup:.1f} s{ahead}" + (f", {line}" if line else "")
        if line:
            rep.info(f"{label}: {line}")
        return result
    if data is not None and isinstance(data.get("error"), dict):
        err = data["error"]
        if err.get("kind") == "llmopt":
            cls = getattr(errors, str(err.get("type")), None)
            if isinstance(cls, type) and issubclass(cls, LlmoptError) and cls is not LlmoptError:
                try:
                    raise cls(err["message"], err.get("hint"))
                except TypeError:
                    pass
            raise MeasurementError(err["message"], err.get("hint"), int(err.get("exit_code") or 1))
        raise MeasurementError(
            f"the speed measurement of {label} failed: {err.get('type')}: {err.get('message')}",
            "Unexpected: LLMOPT_DEBUG=1 shows the whole traceback (`llmopt run` also keeps it in report.json); "
            "please report it.",
            errors.EXIT_BUG,
            detail=err.get("traceback"),
        )
    if returncode == errors.EXIT_INTERRUPTED:
        raise errors.InterruptedRunError(
            "interrupted: nothing was written (partial output removed).", "Run the command again to redo the work."
        )
    last = "" if show else _tail(log)
    if not sent and returncode == 0:
        returncode = -1  # it ended before it could take the request: say so as a crash
    raise MeasurementError(
        f"the speed measurement of {label} {_how_it_ended(returncode)}"
        + (f"; its last output: {last}" if last else "")
        + ". It ran in its own process, so the rest of this run is not affected.",
        "Run it again; a crash in a kernel library or a CUDA error ends the process like this. "
        "LLMOPT_DEBUG=1 shows the measurement's whole output as it runs.",
        errors.EXIT_UNAVAILABLE,
    )


def _set_attention(model: Any, impl: str) -> None:
    try:
        model.set_attn_implementation(impl)
    except Exception as exc:
        raise BackendUnavailableError(
            f"attention '{impl}' cannot run with this model here: {short_error(exc)}",
            f"Pick from the installed ones: {', '.join(available_attention())}.",
        ) from None


def available_attention() -> list[str]:
    """Attention implementations whose libraries are installed (flash_attn etc. are optional)."""
    import importlib.util

    found = ["eager", "sdpa"]
    if importlib.util.find_spec("flash_attn") is not None:
        found.append("flash_attention_2")
    if importlib.util.find_spec("flash_attn_interface") is not None:
        found.append("flash_attention_3")
    with contextlib.suppress(Exception):
        from torch.nn.attention import flex_attention  # noqa: F401

        found.append("flex_attention")
    return found


def compare(baseline: dict[str, Any], artifact: dict[str, Any], settings: ThroughputSettings) -> dict[str, Any]:
    """Speedups of ``artifact`` over ``baseline`` (ratios of medians measured one after the other)."""

    def ratio(a: float | None, b: float | None) -> float | None:
        return a / b if a and b else None

    def med(block: dict[str, Any], key: str) -> float | None:
        return (block.get(key) or {}).get("median")

    out: dict[str, Any] = {
        "decode_speedup": {
            b: ratio(med(r, "tokens_per_s"), med(baseline["decode"].get(b) or {}, "tokens_per_s"))
            for b, r in artifact["decode"].items()
        },
        "prefill_speedup": {
            p: ratio(med(r, "tokens_per_s"), med(baseline["prefill"].get(p) or {}, "tokens_per_s"))
            for p, r in artifact["prefill"].items()
        },
        "ttft_ratio": ratio(artifact.get("ttft_ms"), baseline.get("ttft_ms")),
        "memory_ratio": ratio(artifact.get("peak_memory_bytes"), baseline.get("peak_memory_bytes")),
        "size_ratio": ratio(artifact.get("size_bytes"), baseline.get("size_bytes")),
    }
    if settings.gpu_hourly_cost:
        out["gpu_hourly_cost"] = settings.gpu_hourly_cost
    return out


def throughput_section(
    baseline: dict[str, Any], artifact: dict[str, Any], settings: ThroughputSettings, device: str
) -> dict[str, Any]:
    """The ``throughput`` block of an evaluation report (read by the gate: ``decode_speedup``)."""
    from llmopt.environment import device_name

    return {
        "schema": THROUGHPUT_SCHEMA,
        "device": device_name(device),
        "settings": settings.resolved(device).model_dump(mode="json"),
        "baseline": baseline,
        "artifact": artifact,
        **compare(baseline, artifact, settings),
    }


def bench(
    model: str,
    *,
    baseline: str | None = None,
    settings: ThroughputSettings | None = None,
    attn: list[str] | None = None,
    device: str = "auto",
    kernel: str | None = None,
    reporter: Reporter | None = None,
    trust_remote_code: bool = False,
) -> dict[str, Any]:
    """``llmopt bench``: measure a model or artifact, optionally against a baseline, per attention kind.

    The measurements run one model at a time, each in a process of its own (``bench_model``).
    """
    from llmopt.environment import environment
    from llmopt.placement import resolve_target

    rep: Any = reporter or SilentReporter()
    settings = settings or ThroughputSettings()
    where = resolve_target(device)
    dev = where.primary
    resolved = settings.resolved(dev)
    target = _local_folder(model, trust_remote_code)
    check_speed_settings(resolved, where.spec, target)
    if (target / "llmopt.json").is_file():
        from llmopt.artifact import Artifact

        with rep.step("checking artifact hashes"):  # as eval does: a number is never of files it did not make
            Artifact.open(target).require_intact()
    base_path = _local_folder(baseline, trust_remote_code) if baseline else None
    attn_list: list[str | None] = list(attn) if attn else [None]
    installed = available_attention()
    skipped = {a: "not installed here" for a in attn_list if a is not None and a not in installed}
    for a in attn_list:
        if a is not None and a not in ATTN_IMPLEMENTATIONS:
            raise InputError(
                f"unknown attention implementation '{a}'.", f"Pick from: {', '.join(ATTN_IMPLEMENTATIONS)}."
            )
    runs: list[dict[str, Any]] = []
    for a in attn_list:
        if a in skipped:
            continue
        entry: dict[str, Any] = {"attn_implementation": a or "default"}
        if base_path is not None:
            entry["baseline"] = bench_model(
                base_path,
                where.spec,
                resolved,
                runner_kind="hf",
                attn_implementation=a,
                label="baseline",
                reporter=rep,
                trust_remote_code=trust_remote_code,
            )
        entry["model"] = bench_model(
            target,
            where.spec,
            resolved,
            kernel=kernel,
            attn_implementation=a,
            label=str(model),
            reporter=reporter,
            trust_remote_code=trust_remote_code,
        )
        if base_path is not None:
            entry.update(compare(entry["baseline"], entry["model"], resolved))
        runs.append(entry)
    return {
        "schema": THROUGHPUT_SCHEMA,
        "model": model,
        "baseline": baseline,
        "device": environment(dev)["device"],
        "placement": where.describe(),
        "settings": resolved.model_dump(mode="json"),
        "runs": runs,
        "skipped_attention": skipped,
        "environment": environment(dev),
    }


def _local_folder(spec: str, trust_remote_code: bool = False) -> Path:
    path = Path(spec).expanduser()
    if path.is_dir() and (path / "llmopt.json").is_file():
        return path
    from llmopt.source import resolve

    return resolve(spec, trust_remote_code=trust_remote_code).path
