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
    unloaded_tpot_ms: float | None = None  # the fastest warm-up request's time per output token
    saturated: bool = False
    saturation_note: str | None = None
    # set across the points of a rate sweep (``mark_capacity``): offered at least CAPACITY_RATE_STEP x a lower swept
    # rate, the server delivered no more than there; its percentiles stand (nothing queued), unlike a saturated one's
    at_capacity: bool = False
    capacity_since: float | None = None  # the lower rate (req/s) whose throughput this point did not exceed
    capacity_note: str | None = None
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


# Capacity: a rule across the points of a rate sweep. Queueing within one point (``_saturation``) misses a server
# that admits every request into its batch at once and slows every step instead (transformers serve's continuous
# batching): nothing waits, but offering more gives no more throughput.
CAPACITY_RATE_STEP = 2.0  # the higher rate offers at least this many times the lower one ...
CAPACITY_GROWTH = 0.10  # ... and delivers less than this share more: "no more" (a few % either way is noise)
CAPACITY_SLOWDOWN = 1.5  # evidence that the server was loaded: TTFT or time per output token this many x alone's


def _grew(low: PointResult, high: PointResult) -> bool:
    """``high`` delivered at least CAPACITY_GROWTH more than ``low``: completed requests/s, or output tokens/s where
    both points know them. Either counts, so "no more" needs both flat: each point draws its own trace, and a server
    that stops at EOS answers at its own length, so one measure can move without the other."""
    factor = 1 + CAPACITY_GROWTH

    def more(lo: float, hi: float) -> bool:  # 0 -> 0 is flat, not growth
        return hi > 0 and hi >= factor * lo

    if more(low.requests_per_s, high.requests_per_s):
        return True
    lo, hi = low.output_tokens_per_s, high.output_tokens_per_s
    return lo is not None and hi is not None and more(lo, hi)


def _loaded(p: PointResult) -> bool:
    """Whether ``p``'s requests were slowed by the load: queueing (saturated), or a median TTFT or time per output
    token CAPACITY_SLOWDOWN x a request's alone (the warm-up). A trace whose requests all arrive within one request's
    time shows no more than requests / end-to-end time however fast the server is: flat throughput at requests that
    ran as fast as one alone is that bound, not the server's. Without a request alone to compare (no warm-up, a
    point stored before llmopt kept its time per token) the throughput is the only evidence."""
    if p.saturated:
        return True
    ok = [r for r in p.latencies if r.ok]
    known = False
    for unloaded, values in (
        (p.unloaded_ttft_ms, [r.ttft_ms for r in ok if r.ttft_ms is not None]),
        (p.unloaded_tpot_ms, [r.tpot_ms for r in ok if r.tpot_ms is not None]),
    ):
        if unloaded is None or not values:
            continue
        known = True
        if statistics.median(values) >= CAPACITY_SLOWDOWN * unloaded:
            return True
    return not known


def _rate_sweep(points: list[PointResult]) -> list[PointResult]:
    """The points the capacity rule reads, by rate: offered rates (a concurrency is not an offered load: its clients
    wait for their answers, so the server is never offered more than it delivers) of whole runs that completed
    something."""
    whole = (p for p in points if p.mode == "rate" and p.value > 0 and p.ok > 0 and not p.interrupted)
    return sorted(whole, key=lambda p: p.value)


def capacity_pairs(points: list[PointResult]) -> list[tuple[PointResult, PointResult]]:
    """(point, reference) for every rate point at capacity, in any order of ``points``: it offered at least
    CAPACITY_RATE_STEP x the reference's rate, the server was loaded there (``_loaded``), and no swept rate above the
    reference delivered CAPACITY_GROWTH more than the reference did (the plateau holds to the end of the sweep: one
    that grows again later was not the server's limit). The reference is the lowest such rate: where the plateau
    was reached."""
    sweep = _rate_sweep(points)
    starts = [a for a in sweep if not any(_grew(a, c) for c in sweep if c.value > a.value)]
    pairs = []
    for b in sweep:
        ref = next((a for a in starts if a.value * CAPACITY_RATE_STEP <= b.value), None)
        if ref is not None and _loaded(b):
            pairs.append((b, ref))
    return pairs


def _throughput(p: PointResult) -> str:
    done = f"{p.requests_per_s:,.2f} req/s"
    return done if p.output_tokens_per_s is None else f"{p.output_tokens_per_s:,.0f} tok/s ({done})"


def mark_capacity(points: list[PointResult]) -> None:
    """Set ``at_capacity``, ``capacity_since`` and ``capacity_note`` on the points of a sweep (cleared elsewhere):
    a judgement across points, so it is made again whenever a point is added."""
    for p in points:
        p.at_capacity, p.capacity_since, p.capacity_note = False, None, None
    for b, a in capacity_pairs(points):
        b.at_capacity = True
        b.capacity_since = a.value
        fell = b.requests_per_s < (1 - CAPACITY_GROWTH) * a.requests_per_s
        b.capacity_note = (
            f"{b.value:g} req/s offered ({b.value / a.value:.3g}x {a.value:g}) delivered {_throughput(b)}, against "
            f"{_throughput(a)} at {a.value:g} req/s: "
            + (
                f"{1 - b.requests_per_s / a.requests_per_s:.0%} fewer requests completed (the server slows down as it "
                "is offered more)"
                if fell
                else f"less than {CAPACITY_GROWTH:.0%} more"
            )
        )


def capacity_text(p: PointResult) -> str:
    """A table cell's words for a point at capacity: ``at capacity (399 tok/s since 16 req/s)``; "" otherwise."""
    if not p.at_capacity or p.capacity_since is None:
        return ""
    done = f"{p.requests_per_s:,.2f} req/s" if p.output_tokens_per_s is None else f"{p.output_tokens_per_s:,.0f} tok/s"
    return f"at capacity ({done} since {p.capacity_since:g} req/s)"


def saturation_point(points: list[PointResult]) -> dict[str, Any]:
    """Where a rate sweep stops being served, in any order of ``points``:

    - ``saturated_at``: the lowest rate where requests queue (``_saturation``), with its ``note``;
    - ``capacity_from``: the lowest rate that already delivered the throughput plateau (``capacity_pairs``), with
      the plateau (``capacity_requests_per_s``, ``capacity_tokens_per_s``: the most delivered from that rate on) and
      ``at_capacity``, the rates offered CAPACITY_RATE_STEP x more or beyond that delivered no more;
    - ``sustained_up_to``: the highest rate neither saturated nor at capacity, below the first rate that is either,
      and not above the plateau's requests/s (by more than CAPACITY_GROWTH): a server that completes at most C
      requests/s however much is offered does not sustain more than C, however short the trace's queue.
    """
    rates = sorted((p for p in points if p.mode == "rate"), key=lambda p: p.value)
    first = next((p for p in rates if p.saturated), None)
    pairs = capacity_pairs(points)
    at_capacity = sorted({b.value for b, _ in pairs})
    since = min((a.value for _, a in pairs), default=None)
    cap_requests = cap_tokens = None
    if since is not None:
        plateau = [p for p in _rate_sweep(points) if p.value >= since]
        cap_requests = max(p.requests_per_s for p in plateau)
        tokens = [t for p in plateau if (t := p.output_tokens_per_s) is not None]
        cap_tokens = max(tokens) if tokens else None
    # below the first rate that is saturated or at capacity
    limit = min(([first.value] if first else []) + at_capacity[:1], default=None)
    sustained = [
        p.value
        for p in rates
        if not p.saturated
        and not p.interrupted
        and (limit is None or p.value < limit)
        and (cap_requests is None or p.value <= cap_requests * (1 + CAPACITY_GROWTH))
    ]
    return {
        "saturated_at": first.value if first else None,
        "sustained_up_to": max(sustained) if sustained else None,
        "note": first.saturation_note if first else None,
        "capacity_from": since,
        "capacity_requests_per_s": cap_requests,
        "capacity_tokens_per_s": cap_tokens,
        "at_capacity": at_capacity,
    }


def sweep_verdict(saturation: dict[str, Any]) -> str | None:
    """One line on a sweep's ``saturation_point``: where it queues, its capacity, what it sustained; None when the
    sweep kept up at every rate."""
    parts = []
    if saturation.get("saturated_at") is not None:
        parts.append(f"saturates at {saturation['saturated_at']:g} req/s")
    if saturation.get("capacity_from") is not None:
        tokens = saturation.get("capacity_tokens_per_s")
        plateau = (f"{tokens:,.0f} tok/s, " if tokens is not None else "") + (
            f"{saturation['capacity_requests_per_s']:,.2f} req/s"
        )
        higher = ", ".join(f"{r:g}" for r in saturation.get("at_capacity") or [])
        since = saturation["capacity_from"]
        parts.append(f"capacity {plateau}, reached at {since:g} req/s (no more at {higher} req/s)")
    if not parts:
        return None
    up_to = saturation.get("sustained_up_to")
    parts.append(f"keeps up at {up_to:g} req/s" if up_to is not None else "no rate swept sustained")
    return "; ".join(parts)
