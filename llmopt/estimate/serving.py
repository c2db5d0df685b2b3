"""The cost optimizer from measured serving: which variant on how many GPUs meets an SLO at a request rate, cheapest.

Input is what was measured, not a formula: the load points of a run report (``llmopt run`` with
``evaluation.serving``) or of ``serve-bench --out``'s ``serve-bench.json``. Each point keeps every request's
latency, so any SLO can be judged on it afterwards.

Per variant and GPU count N the traffic is split over N replicas of the measured server (one per GPU, behind a
load balancer), each taking rate/N requests/s. N = 1 at a rate that was swept is *measured*. Every other row is
*estimated*: it is read from the lowest swept rate at or above rate/N (latency grows with load, so that is the
conservative reading), and its throughput is the offered rate times the output tokens a request got there. A
replica must hold the whole model (as measured): tensor parallelism is not modelled here (``llmopt estimate
MODEL`` plans memory and tensor parallelism from config.json).
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError

from llmopt.errors import InputError
from llmopt.serving.metrics import CAPACITY_GROWTH, PointResult, Slo, saturation_point, with_slo

DEFAULT_GPU_COUNTS = (1, 2, 4, 8)
MAX_GPUS = 4096  # more replicas than any one deployment plans for: a larger count is a typo (or 1e20)
_TOL = 1e-9


class ServingOption(BaseModel):
    model_config = ConfigDict(extra="forbid")
    variant: str
    gpus: int
    source: Literal["measured", "estimated"]
    basis: str = Field(description="Which measured load point the row reads, and how.")
    rate_per_gpu: float
    read_at_rate: float | None = Field(description="The swept rate whose measurement is read (None: none fits).")
    meets: bool
    failures: list[str] = Field(default_factory=list, description="The SLO targets it misses.")
    ttft_p95_ms: float | None = None
    goodput_per_s: float | None = None
    output_tokens_per_s: float | None = None
    gpu_hours_per_million_tokens: float | None = None
    usd_per_million_tokens: float | None = None
    shortfall: float | None = Field(
        None, description="Worst ratio of a measured value to its target (1 or less meets it); None: not measured."
    )


class ServingPlan(BaseModel):
    """`llmopt estimate --slo ... --rate R`: every variant x GPU count, the cheapest one that meets the SLO."""

    model_config = ConfigDict(extra="forbid")
    report: str
    slo: str
    rate: float
    gpu_hourly_cost: float | None
    machine: str | None
    options: list[ServingOption]
    recommended: ServingOption | None
    closest: ServingOption | None = Field(description="When none meets the SLO: the one nearest to it.")
    notes: list[str]


def _models_of(data: Any, path: Path) -> tuple[list[tuple[str, list[PointResult]]], str | None]:
    """(label, load points) per served model in a run report or a serve-bench JSON, and the machine."""
    models: list[tuple[str, list[PointResult]]] = []
    machine: str | None = None
    try:
        if isinstance(data, dict) and isinstance(data.get("variants"), list):  # llmopt run's report.json
            base = data.get("baseline_serving")
            if isinstance(base, dict):
                models.append(("FP16 baseline", [PointResult.model_validate(p) for p in base.get("points") or []]))
                machine = base.get("machine")
            for v in data["variants"]:
                serving = ((v or {}).get("evaluation") or {}).get("serving") if isinstance(v, dict) else None
                if isinstance(serving, dict):
                    models.append(
                        (str(v.get("name")), [PointResult.model_validate(p) for p in serving.get("points") or []])
                    )
                    machine = machine or serving.get("machine")
        elif isinstance(data, dict) and isinstance(data.get("models"), list):  # serve-bench --out's JSON
            machine = data.get("machine")
            for m in data["models"]:
                models.append((str(m.get("label")), [PointResult.model_validate(p) for p in m.get("points") or []]))
    except (ValidationError, AttributeError) as exc:
        raise InputError(
            f"{path}: a serving load point is not readable ({str(exc).splitlines()[0]}).",
            "Pass a report.json written by `llmopt run` with evaluation.serving, or serve-bench.json.",
        ) from None
    return models, machine


def _option(
    label: str, points: list[PointResult], gpus: int, rate: float, slo: Slo, price: float | None
) -> ServingOption:
    per = rate / gpus
    swept = sorted((p for p in points if p.mode == "rate"), key=lambda p: p.value)
    above = [p for p in swept if p.value >= per - _TOL]
    measured = gpus == 1 and bool(above) and math.isclose(above[0].value, rate, rel_tol=_TOL)
    source: Literal["measured", "estimated"] = "measured" if measured else "estimated"
    if not above:
        top = f"{swept[-1].value:g} req/s" if swept else "no rate"
        return ServingOption(
            variant=label, gpus=gpus, source="estimated", rate_per_gpu=per, read_at_rate=None, meets=False,
            basis=f"{per:g} req/s per GPU is above the highest rate measured ({top}): not known",
            failures=[f"not measured at {per:g} req/s or above"],
        )  # fmt: skip
    p = above[0]
    latency_only = slo.model_copy(update={"min_goodput": None, "at_rate": None})
    judged = with_slo(p, latency_only) if latency_only.limits else p.model_copy()
    # a saturated point has no percentiles: the saturation is the one reason, not each missing value
    failures = [
        f"{c.name} " + ("not measured" if c.value is None else f"{c.value:,.1f} > {c.limit:g}")
        for c in judged.slo_checks
        if not c.passed and not (p.saturated and c.value is None)
    ]
    ratios = [(c.value / c.limit) if c.value is not None else math.inf for c in judged.slo_checks if c.name != "errors"]
    if p.saturated:
        failures.append(f"saturated at {p.label}: {p.saturation_note}")
        ratios.append(math.inf)
    # a server at capacity (offered more, delivered no more) completes at most its plateau's requests/s, however
    # short the trace's queue: a rate per GPU above that is not served (serve-bench's sustained_up_to reads the same)
    sweep = saturation_point(points)
    capacity = sweep.get("capacity_requests_per_s")
    if capacity is not None and per > capacity * (1 + CAPACITY_GROWTH):
        failures.append(
            f"{per:g} req/s per GPU is above the server's capacity: at most {capacity:.2f} req/s completed from "
            f"{sweep['capacity_from']:g} req/s on"
        )
        ratios.append(per / capacity if capacity else math.inf)
    # offered load is served when the server keeps up: rate x the output tokens a request got at the point read,
    # for measured and estimated rows alike (a measured point's own tokens/s can read above its offered rate when
    # its few Poisson arrivals came in a burst, and would price it cheaper than the same load estimated)
    per_request = (p.output_tokens_per_s / p.requests_per_s) if p.output_tokens_per_s and p.requests_per_s else None
    tps = rate * per_request if per_request else None
    good_fraction = (
        judged.good_fraction if judged.good_fraction is not None else (p.ok / p.requests if p.requests else 0)
    )
    goodput = judged.goodput_per_s if measured else good_fraction * rate
    if slo.min_goodput is not None:
        if goodput is None or goodput < slo.min_goodput or p.saturated:
            failures.append(f"goodput {0.0 if goodput is None else goodput:.2f} < {slo.min_goodput:g} req/s")
        ratios.append(slo.min_goodput / goodput if goodput else math.inf)
    gpu_hours = gpus / (tps * 3600) * 1e6 if tps else None
    if measured:
        basis = f"measured at {p.label} on one server"
    else:
        basis = f"{gpus} replica(s) at {per:g} req/s each, read from the point measured at {p.label}"
    return ServingOption(
        variant=label,
        gpus=gpus,
        source=source,
        basis=basis,
        rate_per_gpu=per,
        read_at_rate=p.value,
        meets=not failures,
        failures=failures,
        ttft_p95_ms=p.ttft_ms.p95 if p.ttft_ms else None,
        goodput_per_s=goodput,
        output_tokens_per_s=tps,
        gpu_hours_per_million_tokens=gpu_hours,
        usd_per_million_tokens=gpu_hours * price if gpu_hours is not None and price is not None else None,
        shortfall=max(ratios) if ratios else 0.0,
    )


def plan_serving(
    report: str | Path,
    slo: Slo,
    rate: float,
    *,
    gpu_hourly_cost: float | None = None,
    gpu_counts: tuple[int, ...] = DEFAULT_GPU_COUNTS,
) -> ServingPlan:
    """Every served model of ``report`` x every GPU count: does it meet ``slo`` at ``rate`` requests/s, and at what
    cost per million output tokens; the cheapest that meets it (measured rows win ties), else the closest."""
    if not (math.isfinite(rate) and rate > 0):
        raise InputError(f"--rate {rate:g} is not a request rate.", "Give requests per second, e.g. --rate 4.")
    if gpu_hourly_cost is not None and gpu_hourly_cost < 0:
        raise InputError("--gpu-hourly-cost cannot be negative.", "Pass the price of one GPU-hour in USD.")
    if not gpu_counts:
        raise InputError("--gpus gives no GPU count.", "E.g. --gpus 1,2,4,8.")
    odd = [n for n in gpu_counts if isinstance(n, bool) or not isinstance(n, int) or not 1 <= n <= MAX_GPUS]
    if odd:
        raise InputError(
            f"--gpus {odd[0]!r}: a GPU count is a whole number from 1 to {MAX_GPUS}.", "E.g. --gpus 1,2,4,8."
        )
    path = Path(report).expanduser()
    if not path.is_file():
        raise InputError(
            f"report {path} does not exist.", "Pass the report.json of `llmopt run` with evaluation.serving."
        )
    try:
        data = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, ValueError) as exc:
        raise InputError(
            f"report {path} is not readable JSON ({exc}).", "Pass a report.json of `llmopt run`."
        ) from None
    models, machine = _models_of(data, path)
    models = [(label, pts) for label, pts in models if any(p.mode == "rate" for p in pts)]
    if not models:
        raise InputError(
            f"{path} holds no serving measurements at request rates.",
            "Run the recipe with evaluation.serving (rates: [...]), or serve-bench --rates ... --out DIR.",
        )
    options = [
        _option(label, pts, n, rate, slo, gpu_hourly_cost) for label, pts in models for n in sorted(set(gpu_counts))
    ]
    meeting = [o for o in options if o.meets and o.gpu_hours_per_million_tokens is not None]
    recommended = min(
        meeting, key=lambda o: (o.gpu_hours_per_million_tokens, o.source != "measured", o.gpus), default=None
    )
    closest = None
    if recommended is None:
        ranked = [o for o in options if o.shortfall is not None]
        closest = min(ranked, key=lambda o: (o.shortfall, o.gpus), default=None)
    notes = [
        "measured rows: one server at exactly that rate; estimated rows: replicas, each at rate/N, read from the "
        "lowest measured rate at or above it (conservative); memory per GPU is as measured (no tensor parallelism)"
    ]
    if machine:
        notes.append(f"measured on {machine}: the costs price that machine at --gpu-hourly-cost per device-hour")
    if gpu_hourly_cost is None:
        notes.append("no --gpu-hourly-cost: options are ranked by device-hours per million output tokens")
    return ServingPlan(
        report=str(path),
        slo=str(slo),
        rate=rate,
        gpu_hourly_cost=gpu_hourly_cost,
        machine=machine,
        options=options,
        recommended=recommended,
        closest=closest,
        notes=notes,
    )
