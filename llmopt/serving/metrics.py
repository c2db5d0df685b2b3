"""Per-load-point summaries: latency percentiles, throughput, goodput under an SLO, saturation; SLO checks."""

from __future__ import annotations

import math
import re
import statistics
from typing import Any

from pydantic import BaseModel

from llmopt.errors import InputError
from llmopt.serving.client import RequestRecord
from llmopt.stats import cost_per_million_tokens, percentile

PERCENTILES = (50, 90, 95, 99)
METRICS = ("ttft", "itl", "tpot", "e2e")


class LatencyStats(BaseModel):
    """Milliseconds. ``itl`` is over the gaps between streamed chunks of all requests; ``tpot`` over requests
    (each request's time per output token after its first)."""

    n: int
    mean: float
    p50: float
    p90: float
    p95: float
    p99: float
    max: float


def latency_stats(values: list[float]) -> LatencyStats | None:
    if not values:
        return None
    return LatencyStats(
        n=len(values),
        mean=statistics.fmean(values),
        **{f"p{q}": percentile(values, q) for q in PERCENTILES},
        max=max(values),
    )


class Slo(BaseModel):
    """Latency targets (ms) on percentiles, e.g. ``{"ttft_p95": 500, "itl_p95": 50}``, a minimum goodput
    (requests/s meeting every target), and the rate(s) at which the gate reads them (None: every point)."""

    limits: dict[str, float] = {}
    min_goodput: float | None = None
    at_rate: float | None = None

    def request_limits(self) -> dict[str, float]:
        """Per-request thresholds for goodput: the tightest limit given for each of ttft, tpot (itl limits apply
        to a request's time per output token) and e2e."""
        out: dict[str, float] = {}
        for key, limit in self.limits.items():
            metric = key.split("_")[0]
            metric = "tpot" if metric == "itl" else metric
            out[metric] = min(limit, out.get(metric, limit))
        return out

    def __str__(self) -> str:
        parts = [f"{k}<={v:g}ms" for k, v in self.limits.items()]
        if self.min_goodput is not None:
            parts.append(f"goodput>={self.min_goodput:g}/s")
        if self.at_rate is not None:
            parts.append(f"at {self.at_rate:g} req/s")
        return ", ".join(parts)


_SLO_KEY = re.compile(r"(ttft|itl|tpot|e2e)_p(50|90|95|99)(?:_(ms|s))?")


def _duration_ms(key: str, raw: str, unit: str | None) -> float:
    m = re.fullmatch(r"\s*([0-9]*\.?[0-9]+)\s*(ms|s)?\s*", raw)
    if not m:
        raise InputError(f"--slo {key}={raw!r} is not a duration.", "Write e.g. ttft_p95=500ms or ttft_p95_ms=500.")
    value = float(m[1])
    unit = m[2] or unit or "ms"
    return value * 1000 if unit == "s" else value


def parse_slo(text: str | None) -> Slo | None:
    """``ttft_p95=500ms,itl_p95_ms=50,e2e_p99=10s,min_goodput=2,at_rate=4``."""
    if not text or not text.strip():
        return None
    slo = Slo()
    limits: dict[str, float] = {}
    for item in text.split(","):
        if not item.strip():
            continue
        key, sep, raw = item.partition("=")
        key = key.strip().lower().replace("-", "_")
        if not sep:
            raise InputError(f"--slo item {item!r} is not key=value.", "E.g. --slo ttft_p95=500ms,itl_p95=50ms")
        if m := _SLO_KEY.fullmatch(key):
            value = _duration_ms(key, raw, m[3])
            if value <= 0:
                raise InputError(f"--slo {key} must be positive.", "E.g. ttft_p95=500ms")
            limits[f"{m[1]}_p{m[2]}"] = value
        elif key in ("min_goodput", "at_rate"):
            try:
                number = float(raw.strip().removesuffix("/s"))
            except ValueError:
                raise InputError(f"--slo {key}={raw!r} is not a number.", f"E.g. {key}=2") from None
            if not math.isfinite(number) or number < 0 or (key == "at_rate" and number == 0):
                raise InputError(f"--slo {key}={raw.strip()!r} must be a positive number.", f"E.g. {key}=2")
            setattr(slo, key, number)
        else:
            raise InputError(
                f"--slo key {key!r} is not known.",
                "Keys: ttft|itl|tpot|e2e _p50|_p90|_p95|_p99 (ms or s), min_goodput (req/s), at_rate (req/s).",
            )
    if not limits and slo.min_goodput is None:
        raise InputError("--slo gives no target.", "E.g. --slo ttft_p95=500ms,itl_p95=50ms")
    slo.limits = limits
    return slo


def slo_from_limits(
    limits: dict[str, float], *, min_goodput: float | None = None, at_rate: float | None = None
) -> Slo:
    """An Slo from the recipe's spelling (``{"ttft_p95_ms": 500, "itl_p95_ms": 50}``); ValueError names a bad key."""
    out: dict[str, float] = {}
    for key, value in limits.items():
        m = _SLO_KEY.fullmatch(str(key).strip().lower())
        if not m:
            raise ValueError(
                f"unknown SLO key {key!r}; keys are ttft|itl|tpot|e2e with _p50|_p90|_p95|_p99 and _ms or _s "
                "(e.g. ttft_p95_ms)"
            )
        if isinstance(value, bool) or not isinstance(value, int | float) or not math.isfinite(value) or value <= 0:
            raise ValueError(f"SLO {key} must be a positive number, not {value!r}")
        out[f"{m[1]}_p{m[2]}"] = float(value) * (1000.0 if m[3] == "s" else 1.0)
    if min_goodput is not None and not (math.isfinite(min_goodput) and min_goodput >= 0):
        raise ValueError(f"min_goodput must be 0 or more, not {min_goodput!r}")
    if at_rate is not None and not (math.isfinite(at_rate) and at_rate > 0):
        raise ValueError(f"slo_at_rate must be a positive rate, not {at_rate!r}")
    return Slo(limits=out, min_goodput=min_goodput, at_rate=at_rate)


class RequestLatency(BaseModel):
    """What goodput needs of one request, kept with its point so that any SLO can be applied later (the gate of a
    later run with other limits, the cost optimizer) without the per-request records."""

    ok: bool
    ttft_ms: float | None = None
    tpot_ms: float | None = None
    e2e_ms: float | None = None


class SloCheck(BaseModel):
    name: str
    limit: float
    value: float | None
    passed: bool


class PointResult(BaseModel):
    """One load point (a request rate, or a concurrency) for one model."""

    mode: str  # "rate" | "concurrency"
    value: float
    requests: int
    ok: int
    errors: int
    error_samples: list[str] = []
    duration_s: float
    requests_per_s: float
    output_tokens_per_s: float | None
    prompt_tokens_per_s: float | None
    tokens_from: str | None  # usage | tokenizer | None
    # share of prompt tokens the server took from its prefix cache, where it reports them (llama.cpp, vLLM)
    prefix_cache_hit: float | None = None
    ttft_ms: LatencyStats | None
    itl_ms: LatencyStats | None
    tpot_ms: LatencyStats | None
    e2e_ms: LatencyStats | None
    goodput_per_s: float | None = None
    good_fraction: float | None = None
    unloaded_ttft_ms: float | None = None  # the fastest warm-up request's TTFT (sent alone)
    saturated: bool = False
    saturation_note: str | None = None
    slo_checks: list[SloCheck] = []
    slo_passed: bool | None = None
    cost_per_million_tokens: float | None = None
    interrupted: bool = False
    latencies: list[RequestLatency] = []  # per timed request, in the order they were sent

    @property
    def label(self) -> str:
        return f"{self.value:g} req/s" if self.mode == "rate" else f"concurrency {self.value:g}"


def _saturation(records: list[RequestRecord], mode: str, unloaded_ttft_ms: float | None = None) -> str | None:
    """The server does not keep up with the offered rate, so percentiles only measure how long the run was:
    queueing that grows over the run (TTFT of the last quarter of arrivals far above the first quarter's), or,
    in a run too short for a trend, requests waiting for their first token longer than half the time over
    which they arrived, and far longer than one alone waits (the warm-up requests, sent one at a time)."""
    ok = [r for r in records if r.ok and r.ttft_ms is not None]
    if mode != "rate" or len(ok) < 2:
        return None
    ok.sort(key=lambda r: r.scheduled_s)
    span_ms = (ok[-1].scheduled_s - ok[0].scheduled_s) * 1000
    median = statistics.median(r.ttft_ms for r in ok if r.ttft_ms is not None)
    if unloaded_ttft_ms is not None and median > 3 * unloaded_ttft_ms + 250 and median > span_ms / 2:
        return (
            f"TTFT p50 {median:,.0f} ms against {unloaded_ttft_ms:,.0f} ms for a request alone, longer than half "
            f"the {span_ms / 1000:,.1f} s over which the requests arrived: queueing"
        )
    if len(ok) < 8:
        return None
    q = max(2, len(ok) // 4)
    early = statistics.median(r.ttft_ms for r in ok[:q] if r.ttft_ms is not None)
    late = statistics.median(r.ttft_ms for r in ok[-q:] if r.ttft_ms is not None)
    if late > 2.5 * early and late - early > 250:
        return f"TTFT grew from {early:,.0f} ms (first quarter) to {late:,.0f} ms (last quarter): queueing"
    return None


def summarize(
    records: list[RequestRecord],
    mode: str,
    value: float,
    slo: Slo | None = None,
    *,
    gpu_hourly_cost: float | None = None,
    interrupted: bool = False,
    unloaded_ttft_ms: float | None = None,
) -> PointResult:
    ok = [r for r in records if r.ok]
    errors = [r for r in records if not r.ok]
    samples = list(dict.fromkeys(r.error or "unknown error" for r in errors))[:3]
    if records:
        start = min(r.sent_s for r in records)
        end = max((r.sent_s + (r.e2e_ms or 0) / 1000) for r in records)
        duration = max(end - start, 1e-9)
    else:
        duration = 0.0
    tokens_known = ok and all(r.output_tokens is not None for r in ok)
    out_tps = sum(r.output_tokens or 0 for r in ok) / duration if tokens_known and duration else None
    prompt_known = ok and all(r.prompt_tokens is not None for r in ok)
    in_tps = sum(r.prompt_tokens or 0 for r in ok) / duration if prompt_known and duration else None
    cached = [r for r in ok if r.cached_prompt_tokens is not None and r.prompt_tokens]
    hit = (
        sum(r.cached_prompt_tokens or 0 for r in cached) / sum(r.prompt_tokens or 0 for r in cached) if cached else None
    )
    sources = {r.tokens_from for r in ok}
    tokens_from = sources.pop() if len(sources) == 1 else (None if not sources else "mixed")
    note = _saturation(records, mode, unloaded_ttft_ms)
    if not note and records and len(errors) > 0.1 * len(records):
        note = f"{len(errors)} of {len(records)} requests failed"
    saturated = note is not None
    itl = [g for r in ok for g in r.chunk_gaps_ms]
    point = PointResult(
        mode=mode,
        value=value,
        requests=len(records),
        ok=len(ok),
        errors=len(errors),
        error_samples=samples,
        duration_s=duration,
        requests_per_s=len(ok) / duration if duration else 0.0,
        output_tokens_per_s=out_tps,
        prompt_tokens_per_s=in_tps,
        tokens_from=tokens_from,
        prefix_cache_hit=hit,
        # Past saturation the percentiles grow with the length of the run, not with the model: not reported.
        ttft_ms=None if saturated else latency_stats([r.ttft_ms for r in ok if r.ttft_ms is not None]),
        itl_ms=None if saturated else latency_stats(itl),
        tpot_ms=None if saturated else latency_stats([t for r in ok if (t := r.tpot_ms) is not None]),
        e2e_ms=None if saturated else latency_stats([r.e2e_ms for r in ok if r.e2e_ms is not None]),
        saturated=saturated,
        saturation_note=note,
        interrupted=interrupted,
        latencies=[
            RequestLatency(ok=r.ok, ttft_ms=r.ttft_ms, tpot_ms=r.tpot_ms, e2e_ms=r.e2e_ms)
            for r in sorted(records, key=lambda r: r.index)
        ],
    )
    point.cost_per_million_tokens = cost_per_million_tokens(out_tps, gpu_hourly_cost)
    if slo is not None:
        apply_slo(point, records, slo)
    return point


def _meets(r: RequestRecord | RequestLatency, limits: dict[str, float]) -> bool:
    values: dict[str, float | None] = {"ttft": r.ttft_ms, "tpot": r.tpot_ms, "e2e": r.e2e_ms}
    for metric, limit in limits.items():
        v = values.get(metric)
        # a one-token answer has no time per output token: nothing to hold against the limit
        if v is None and metric == "tpot" and r.ok:
            continue
        if v is None or v > limit:
            return False
    return r.ok


def apply_slo(
    point: PointResult, records: list[RequestRecord] | list[RequestLatency] | None, slo: Slo
) -> None:
    """Goodput and the SLO checks of ``point``, from its requests (``records``, or its stored ``latencies``)."""
    if records is None:
        records = point.latencies
    limits = slo.request_limits()
    good = [r for r in records if _meets(r, limits)]
    window = point.duration_s
    if point.mode == "rate" and point.value > 0 and records:
        # A few Poisson arrivals can land in a burst: good requests over that short window would read far above
        # the offered rate (seen: 2.46 req/s "at 0.5 req/s"). At an offered rate the window is at least the time
        # the trace's requests take to arrive on average, so goodput never exceeds rate x the share that was good.
        window = max(window, len(records) / point.value)
    point.goodput_per_s = len(good) / window if window else 0.0
    point.good_fraction = len(good) / len(records) if records else 0.0
    checks: list[SloCheck] = []
    for key, limit in slo.limits.items():
        metric, pct = key.split("_")
        stats: LatencyStats | None = getattr(point, f"{metric}_ms")
        value = None if stats is None else float(getattr(stats, pct))
        checks.append(SloCheck(name=f"{key}_ms", limit=limit, value=value, passed=value is not None and value <= limit))
    if slo.min_goodput is not None:
        checks.append(
            SloCheck(
                name="min_goodput",
                limit=slo.min_goodput,
                value=point.goodput_per_s,
                passed=point.goodput_per_s >= slo.min_goodput and not point.saturated,
            )
        )
    if point.errors:
        checks.append(SloCheck(name="errors", limit=0, value=point.errors, passed=False))
    point.slo_checks = checks
    point.slo_passed = all(c.passed for c in checks)


def with_slo(point: PointResult, slo: Slo) -> PointResult:
    """A copy of a stored point judged against ``slo`` (its goodput recomputed from the kept latencies)."""
    copy = point.model_copy(deep=True)
    apply_slo(copy, None, slo)
    return copy


def saturation_point(points: list[PointResult]) -> dict[str, Any]:
    """The lowest swept rate where the server no longer keeps up, and the highest below it that it sustained."""
    rates = sorted((p for p in points if p.mode == "rate"), key=lambda p: p.value)
    first = next((p for p in rates if p.saturated), None)
    sustained = [p.value for p in rates if not p.saturated and (first is None or p.value < first.value)]
    return {
        "saturated_at": first.value if first else None,
        "sustained_up_to": max(sustained) if sustained else None,
        "note": first.saturation_note if first else None,
    }
