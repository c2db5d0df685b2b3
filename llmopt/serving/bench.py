"""``serve_bench``: a server per model (or one at a URL), the trace at each load point, the summaries, the gate."""

from __future__ import annotations

import contextlib
import json
import platform
import shutil
import tempfile
import time
from collections.abc import Callable, Iterator
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from pydantic import BaseModel

from llmopt.errors import BackendUnavailableError, InputError
from llmopt.serving.client import Endpoint, RequestRecord, check_reachable, served_model
from llmopt.serving.load import PointRun
from llmopt.serving.metrics import (
    PointResult,
    Slo,
    capacity_text,
    mark_capacity,
    saturation_point,
    summarize,
    sweep_verdict,
)
from llmopt.serving.servers import RunningServer, ServerOptions, choose_server, server_spec
from llmopt.serving.trace import TraceRequest, TraceSpec, build_trace


class ServerInfo(BaseModel):
    kind: str  # llama.cpp | transformers | vllm | url
    url: str
    command: list[str] | None = None
    notes: list[str] = []
    startup_s: float | None = None
    log: str | None = None


class ModelServing(BaseModel):
    label: str
    model: str | None
    role: str  # "model" | "baseline"
    server: ServerInfo
    points: list[PointResult] = []
    saturation: dict[str, Any] = {}
    failed: str | None = None


class ServeBenchResult(BaseModel):
    created: str
    machine: str
    trace: dict[str, Any]
    slo: Slo | None = None
    tokenizer: str | None = None
    models: list[ModelServing] = []
    gate: dict[str, Any] | None = None
    out_dir: str | None = None

    @property
    def failed(self) -> str | None:
        return next((f"{m.label}: {m.failed}" for m in self.models if m.failed), None)


class Target(BaseModel):
    role: str
    model: str | None
    url: str | None
    server: str = "auto"
    model_name: str | None = None  # the request's "model" for a --url server


def load_tokenizer(path: str | None) -> Any:
    """A Hugging Face tokenizer from a model folder, for exact prompt lengths and, where a server gives no usage,
    output token counts."""
    if not path:
        return None
    p = Path(path).expanduser()
    if not (p.is_dir() and ((p / "tokenizer.json").is_file() or (p / "tokenizer_config.json").is_file())):
        raise InputError(f"--tokenizer {path}: no tokenizer files there.", "Give a model folder with tokenizer.json.")
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(str(p))


def default_tokenizer_source(*models: str | None) -> str | None:
    """The first model argument that is a folder with a tokenizer (a GGUF artifact carries its own inside the
    file, which llmopt does not read: its baseline's folder serves)."""
    for m in models:
        if not m:
            continue
        p = Path(m).expanduser()
        if p.is_dir() and (p / "tokenizer.json").is_file():
            return str(p)
    return None


def _label(target: Target) -> str:
    if target.model:
        p = Path(target.model).expanduser()
        return p.resolve().name if p.exists() else target.model
    return target.url or "server"


@contextlib.contextmanager
def _server_for(
    target: Target, opts: ServerOptions, log_dir: Path
) -> Iterator[tuple[Endpoint, ServerInfo, str | None, dict[str, Any], RunningServer | None]]:
    if target.url:
        endpoint = Endpoint.parse(target.url)
        check_reachable(endpoint)
        name = target.model_name or served_model(endpoint)
        yield endpoint, ServerInfo(kind="url", url=str(endpoint)), name, {}, None
        return
    assert target.model is not None
    kind = choose_server(target.model, target.server)
    spec = server_spec(kind, target.model, opts)
    log = log_dir / f"server-{target.role}.log"
    info = ServerInfo(kind=kind, url=spec.url, command=spec.argv, notes=spec.notes, log=str(log))
    with RunningServer(spec, log, startup_timeout=opts.startup_timeout) as server:
        info.startup_s = server.startup_s
        yield Endpoint.parse(spec.url), info, spec.model_name, spec.request_extra, server


def serve_bench(
    targets: list[Target],
    trace: TraceSpec,
    *,
    slo: Slo | None = None,
    server_options: ServerOptions | None = None,
    tokenizer: str | None = None,
    out_dir: Path | None = None,
    ignore_eos: bool | None = None,
    request_timeout: float = 300.0,
    gpu_hourly_cost: float | None = None,
    log: Callable[[str], None] = lambda _: None,
) -> ServeBenchResult:
    """Measure each target (baseline first) at every load point of ``trace``, with the same requests.

    Server logs and per-request records go to ``out_dir`` (kept: they are what explains a failure); without it
    they live in a temporary folder removed at the end unless a server failed.
    """
    opts = server_options or ServerOptions()
    if slo is not None and slo.at_rate is not None and trace.rates is not None and slo.at_rate not in trace.rates:
        raise InputError(
            f"--slo at_rate={slo.at_rate:g} is not among --rates {','.join(f'{r:g}' for r in trace.rates)}.",
            "Add it to --rates, or pick at_rate from them.",
        )
    for target in targets:
        # a model no server loads (a folder with two model .gguf files, a missing path) is refused now, not after
        # the baseline's server has been started and measured
        if not target.url and target.model is not None:
            choose_server(target.model, target.server)
    tok_source = tokenizer or default_tokenizer_source(*(t.model for t in targets))
    tok = load_tokenizer(tok_source)
    points = trace.points()
    traces: list[list[TraceRequest]] = [build_trace(trace, mode, v, tok, point=i) for i, (mode, v) in enumerate(points)]
    work = out_dir or Path(tempfile.mkdtemp(prefix="llmopt-serve-"))
    work.mkdir(parents=True, exist_ok=True)
    result = ServeBenchResult(
        created=datetime.now(UTC).isoformat(timespec="seconds"),
        machine=f"{platform.machine()} {platform.processor() or ''}".strip(),
        trace=json.loads(trace.model_dump_json()),
        slo=slo,
        tokenizer=tok_source,
        out_dir=str(out_dir) if out_dir else None,
    )

    def count(text: str) -> int:
        return len(tok.encode(text, add_special_tokens=False))

    keep = False
    try:
        for target in targets:
            entry = ModelServing(
                label=_label(target),
                model=target.model,
                role=target.role,
                server=ServerInfo(kind=target.server, url=target.url or ""),
            )
            result.models.append(entry)
            log(f"{target.role} {entry.label}: starting" + ("" if target.url else " its server"))
            try:
                with _server_for(target, opts, work) as (endpoint, info, name, extra, server):
                    entry.server = info
                    if ignore_eos is not None:
                        extra = (
                            {**extra, "ignore_eos": True}
                            if ignore_eos
                            else {k: v for k, v in extra.items() if k != "ignore_eos"}
                        )
                    if info.startup_s is not None:
                        log(f"  {info.kind} server ready in {info.startup_s:.1f} s ({', '.join(info.notes)})")
                    records_file = work / f"requests-{target.role}.jsonl"
                    with open(records_file, "w") as rec_out:
                        for (mode, value), reqs in zip(points, traces, strict=True):
                            label = f"{value:g} req/s" if mode == "rate" else f"concurrency {value:g}"
                            log(f"  {label}: {trace.requests} requests (+{trace.warmup} warm-up)")
                            started = time.monotonic()
                            run = PointRun(
                                endpoint,
                                reqs,
                                model=name,
                                extra=extra,
                                concurrency=int(value) if mode == "concurrency" else None,
                                timeout=request_timeout,
                                alive=server.alive if server else None,
                                count_tokens=count if tok is not None else None,
                            )
                            records = run.run()
                            if (
                                run.warmup_errors
                                and len(run.warmup_errors) == trace.warmup
                                and not any(r.ok for r in records)
                            ):
                                raise BackendUnavailableError(
                                    f"every request to {entry.label}'s server failed: {run.warmup_errors[0]}",
                                    "Check the URL/model name (--served-model) and the server's log.",
                                )
                            _write_records(rec_out, mode, value, records)
                            unloaded = min(run.warmup_ttft_ms) if run.warmup_ttft_ms else None
                            point = summarize(
                                records,
                                mode,
                                value,
                                slo,
                                gpu_hourly_cost=gpu_hourly_cost,
                                unloaded_ttft_ms=unloaded,
                                interrupted=bool(run.stopped),  # a partial run: never read for capacity
                            )
                            point.unloaded_ttft_ms = unloaded
                            point.unloaded_tpot_ms = min(run.warmup_tpot_ms) if run.warmup_tpot_ms else None
                            entry.points.append(point)
                            mark_capacity(entry.points)  # across the points so far (a later one may revise it)
                            log(f"    {_point_line(point)} ({time.monotonic() - started:.0f} s)")
                            if run.stopped:
                                desc = server.exit_description() if server else ""
                                entry.failed = f"{run.stopped} ({desc}) at {label}; measured until then"
                                keep = True
                                break
            except BackendUnavailableError:
                keep = True
                raise
            mark_capacity(entry.points)
            entry.saturation = saturation_point(entry.points)
            if verdict := sweep_verdict(entry.saturation):
                log(f"  {verdict}")
            if entry.failed:
                break
    finally:
        if out_dir is None and not keep:
            shutil.rmtree(work, ignore_errors=True)
    if slo is not None:
        result.gate = gate(result, slo)
    return result


def _write_records(out: Any, mode: str, value: float, records: list[RequestRecord]) -> None:
    for r in records:
        out.write(json.dumps({"mode": mode, "value": value, **r.model_dump(exclude={"text"})}) + "\n")
    out.flush()


def _point_line(p: PointResult) -> str:
    capacity = f"; {capacity_text(p)}" if p.at_capacity else ""
    if p.saturated:
        return f"saturated: {p.saturation_note}; {p.ok}/{p.requests} ok{capacity}"
    ttft = f"TTFT p50 {p.ttft_ms.p50:,.0f} ms p95 {p.ttft_ms.p95:,.0f} ms" if p.ttft_ms else "no TTFT"
    tps = f", {p.output_tokens_per_s:,.1f} tok/s" if p.output_tokens_per_s else ""
    return f"{p.ok}/{p.requests} ok, {ttft}{tps}{capacity}"


def gate(result: ServeBenchResult, slo: Slo) -> dict[str, Any]:
    """The SLO read on the measured model (not the baseline) at ``slo.at_rate``, or at every point."""
    model = next((m for m in result.models if m.role == "model"), None)
    if model is None:
        return {"passed": False, "checks": [], "why": "the model was not measured"}
    points = [p for p in model.points if slo.at_rate is None or (p.mode == "rate" and p.value == slo.at_rate)]
    checks = [{"point": p.label, **c.model_dump()} for p in points for c in p.slo_checks]
    saturated = [p.label for p in points if p.saturated]
    passed = bool(points) and all(p.slo_passed for p in points) and not model.failed
    out: dict[str, Any] = {"slo": str(slo), "passed": passed, "checks": checks}
    if saturated:
        out["saturated_at"] = saturated
    # informational: such a point fails only where its numbers do (its goodput under min_goodput, its percentiles
    # over their limits); the server's ceiling is already in its goodput
    at_capacity = [p.label for p in points if p.at_capacity]
    if at_capacity:
        out["at_capacity"] = at_capacity
    if model.failed:
        out["why"] = model.failed
    return out
