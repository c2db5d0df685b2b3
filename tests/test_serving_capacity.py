"""The capacity rule across the points of a rate sweep: offered at least 2x more, the server delivered no more.

Points are built from plain numbers (achieved requests/s and output tokens/s per offered rate), as serve-bench
measured them; the GPU rows are those of docs/serving.md's H200 section."""

from __future__ import annotations

import json
import random
from typing import Any

import pytest

from llmopt.results import ServingReport
from llmopt.serving import bench
from llmopt.serving.bench import ModelServing, ServeBenchResult, ServerInfo, gate
from llmopt.serving.metrics import (
    CAPACITY_GROWTH,
    CAPACITY_RATE_STEP,
    LatencyStats,
    PointResult,
    RequestLatency,
    apply_slo,
    capacity_text,
    mark_capacity,
    parse_slo,
    saturation_point,
    sweep_verdict,
)


def _stats(v: float) -> LatencyStats:
    return LatencyStats(n=8, mean=v, p50=v, p90=v, p95=v, p99=v, max=v)


def point(
    value: float,
    requests_per_s: float,
    tokens_per_s: float | None,
    *,
    mode: str = "rate",
    saturated: bool = False,
    latencies: list[RequestLatency] | None = None,
    **kw: Any,
) -> PointResult:
    return PointResult(
        mode=mode, value=value, requests=48, ok=48, errors=0, duration_s=48 / requests_per_s,
        requests_per_s=requests_per_s, output_tokens_per_s=tokens_per_s, prompt_tokens_per_s=None,
        tokens_from="usage", ttft_ms=None if saturated else _stats(200.0), itl_ms=None if saturated else _stats(110.0),
        tpot_ms=None if saturated else _stats(110.0), e2e_ms=None if saturated else _stats(7000.0),
        saturated=saturated, saturation_note="queueing" if saturated else None,
        latencies=latencies or [], **kw,
    )  # fmt: skip


def sweep(rows: list[tuple[float, float, float | None]], **kw: Any) -> list[PointResult]:
    return [point(v, rps, tps, **kw) for v, rps, tps in rows]


def marked(points: list[PointResult]) -> dict[float, float | None]:
    """rate -> the rate it is at capacity since, for the points marked."""
    mark_capacity(points)
    return {p.value: p.capacity_since for p in points if p.at_capacity}


# transformers serve on an H200 (docs/serving.md, 2026-12-03): no queue at any rate, throughput flat from 64 req/s
GPU_FP16 = [(4.0, 2.8, 180.0), (16.0, 5.0, 318.0), (64.0, 6.4, 407.0), (256.0, 6.1, 387.0)]
GPU_NF4 = [(4.0, 2.6, 167.0), (16.0, 4.8, 306.0), (64.0, 5.4, 343.0), (256.0, 5.1, 329.0)]
# the brief's round numbers: 32 output tokens a request, flat from 16 req/s
ROUND = [(4.0, 105 / 32, 105.0), (16.0, 390 / 32, 390.0), (64.0, 402 / 32, 402.0), (256.0, 399 / 32, 399.0)]


def test_constants_are_the_documented_ones() -> None:
    assert CAPACITY_RATE_STEP == 2.0 and CAPACITY_GROWTH == 0.10


@pytest.mark.parametrize("rows", [GPU_FP16, GPU_NF4], ids=["fp16", "nf4"])
def test_transformers_serve_on_the_gpu_is_at_capacity_from_64_not_sustaining_256(rows: list[Any]) -> None:
    points = sweep(rows)
    assert not any(p.saturated for p in points)  # what the queueing test alone said: "sustained up to 256"
    assert marked(points) == {256.0: 64.0}
    top = points[-1]
    assert top.ttft_ms is not None and top.e2e_ms is not None  # nothing queued: its percentiles stand
    assert "256 req/s offered (4x 64)" in (top.capacity_note or "") and f"{rows[2][2]:,.0f} tok/s" in (
        top.capacity_note or ""
    )
    sat = saturation_point(points)
    assert sat["saturated_at"] is None and sat["note"] is None
    assert sat["capacity_from"] == 64.0 and sat["at_capacity"] == [256.0]
    assert sat["capacity_tokens_per_s"] == rows[2][2] and sat["capacity_requests_per_s"] == rows[2][1]
    # 16 req/s is more than the ~6 req/s the server completes at most: not sustained either
    assert sat["sustained_up_to"] == 4.0


def test_round_numbers_capacity_reached_at_16() -> None:
    points = sweep(ROUND)
    assert marked(points) == {64.0: 16.0, 256.0: 16.0}
    assert capacity_text(points[2]) == "at capacity (402 tok/s since 16 req/s)"
    assert capacity_text(points[1]) == ""
    sat = saturation_point(points)
    assert sat["capacity_from"] == 16.0 and sat["capacity_tokens_per_s"] == 402.0
    assert sat["at_capacity"] == [64.0, 256.0] and sat["sustained_up_to"] == 4.0
    verdict = sweep_verdict(sat)
    assert verdict is not None and "capacity 402 tok/s, 12.56 req/s, reached at 16 req/s (no more at 64, 256" in verdict
    assert "keeps up at 4 req/s" in verdict


def test_a_sweep_that_keeps_growing_has_no_capacity() -> None:
    points = sweep([(1.0, 1.0, 32.0), (2.0, 1.9, 61.0), (4.0, 3.9, 125.0), (8.0, 7.6, 243.0)])
    assert marked(points) == {}
    sat = saturation_point(points)
    assert sat["capacity_from"] is None and sat["at_capacity"] == [] and sat["sustained_up_to"] == 8.0
    assert sweep_verdict(sat) is None


def test_llama_cpp_queues_but_still_grows_no_capacity() -> None:
    """llama.cpp's CUDA server on the same GPU: saturated (queueing) at 64 and 256, throughput still growing."""
    points = [
        point(4, 4.2, 267.0),
        point(16, 15.0, 963.0),
        point(64, 20.4, 1308.0, saturated=True),
        point(256, 27.3, 1749.0, saturated=True),
    ]
    assert marked(points) == {}
    sat = saturation_point(points)
    assert sat["saturated_at"] == 64.0 and sat["sustained_up_to"] == 16.0 and sat["capacity_from"] is None


def test_a_point_both_queueing_and_at_capacity_keeps_both() -> None:
    points = [point(4, 4.0, 128.0), point(16, 15.0, 480.0), point(64, 15.5, 490.0, saturated=True)]
    assert marked(points) == {64.0: 16.0}
    top = points[-1]
    assert top.saturated and top.ttft_ms is None  # its percentiles still dropped: queueing
    sat = saturation_point(points)
    assert sat["saturated_at"] == 64.0 and sat["capacity_from"] == 16.0 and sat["sustained_up_to"] == 16.0
    assert bench._point_line(top).startswith("saturated: queueing") and "at capacity (490 tok/s since 16" in (
        bench._point_line(top)
    )


def test_unsorted_input_gives_the_same_verdict_on_the_same_points() -> None:
    ordered = sweep(ROUND)
    expected = saturation_point(ordered)
    shuffled = sweep(ROUND)
    random.Random(3).shuffle(shuffled)
    assert [p.value for p in shuffled] != [p.value for p in ordered]
    assert marked(shuffled) == {64.0: 16.0, 256.0: 16.0}
    assert saturation_point(shuffled) == expected


def test_a_single_rate_is_not_judged() -> None:
    points = [point(256, 6.1, 387.0)]
    assert marked(points) == {}
    assert saturation_point(points)["sustained_up_to"] == 256.0


def test_a_concurrency_point_is_left_out() -> None:
    """A closed loop's clients wait for their answers: the server is never offered more than it delivers."""
    points = sweep([(1.0, 3.0, 96.0), (4.0, 6.0, 192.0), (16.0, 6.1, 195.0), (64.0, 6.0, 190.0)], mode="concurrency")
    assert marked(points) == {}
    sat = saturation_point(points)
    assert sat["capacity_from"] is None and sat["at_capacity"] == [] and sat["sustained_up_to"] is None
    # and a concurrency point never serves as the reference of a rate point
    mixed = [point(1, 6.0, 192.0, mode="concurrency"), point(8, 6.0, 192.0)]
    assert marked(mixed) == {}


@pytest.mark.parametrize(
    ("low", "high", "expected"),
    [
        ((16, 10.0, 400.0), (32, 9.5, 380.0), True),  # a 5% dip at 2x: still a plateau
        ((16, 10.0, 400.0), (32, 10.9, 436.0), True),  # +9%: within the noise
        ((16, 10.0, 400.0), (24, 10.0, 400.0), False),  # 1.5x and flat: not judged
        ((16, 10.0, 400.0), (32, 11.2, 448.0), False),  # +12%: still growing
        ((16, 10.0, 400.0), (32, 10.0, 460.0), False),  # tokens grew (longer answers): more delivered
        ((16, 10.0, 400.0), (32, 11.5, 400.0), False),  # requests grew (shorter answers): more delivered
        ((16, 10.0, None), (32, 10.2, None), True),  # no token counts: requests/s decide
        ((16, 10.0, 400.0), (32, 10.2, None), True),  # tokens known at one point only: requests/s decide
    ],
)
def test_noise_and_step_thresholds(low: tuple[Any, ...], high: tuple[Any, ...], expected: bool) -> None:
    points = [point(*low), point(*high)]
    assert bool(marked(points)) is expected


def test_a_plateau_that_grows_again_later_was_not_the_limit() -> None:
    points = sweep([(16.0, 10.0, 400.0), (32.0, 10.2, 405.0), (64.0, 14.0, 560.0)])
    assert marked(points) == {}
    # the same judgement is made again when a point is added: a mark made on the first two is cleared
    first_two = points[:2]
    assert marked(first_two) == {32.0: 16.0}
    assert marked(points) == {} and not points[1].at_capacity and points[1].capacity_note is None


def test_a_flat_throughput_from_a_burst_as_fast_as_one_request_alone_is_the_trace_not_the_server() -> None:
    """48 requests arriving within a fraction of one request's time: no run shows more than 48 / E2E req/s, however
    fast the server. Requests that ran as fast as one alone are that bound; slowed ones are the server's limit."""

    def lat(ttft: float, tpot: float) -> list[RequestLatency]:
        return [RequestLatency(ok=True, ttft_ms=ttft, tpot_ms=tpot, e2e_ms=ttft + 63 * tpot)] * 48

    alone = {"unloaded_ttft_ms": 40.0, "unloaded_tpot_ms": 8.0}
    fast = [point(512, 80.0, 5120.0, latencies=lat(45, 8.5), **alone),
            point(2048, 84.0, 5376.0, latencies=lat(46, 8.6), **alone)]  # fmt: skip
    assert marked(fast) == {}
    slowed = [point(512, 80.0, 5120.0, latencies=lat(45, 8.5), **alone),
              point(2048, 84.0, 5376.0, latencies=lat(60, 30.0), **alone)]  # fmt: skip
    assert marked(slowed) == {2048.0: 512.0}
    queued = [point(512, 80.0, 5120.0, **alone), point(2048, 84.0, 5376.0, saturated=True, **alone)]
    assert marked(queued) == {2048.0: 512.0}


def test_failed_and_empty_points_are_not_read() -> None:
    empty = point(64, 6.0, 400.0)
    empty.ok, empty.requests_per_s, empty.output_tokens_per_s = 0, 0.0, None
    assert marked([point(16, 6.0, 400.0), empty]) == {}
    cut = point(64, 6.0, 400.0, interrupted=True)
    assert marked([point(16, 6.0, 400.0), cut]) == {}


def test_an_at_capacity_point_fails_the_gate_only_on_its_own_numbers() -> None:
    lat = [RequestLatency(ok=True, ttft_ms=200.0, tpot_ms=110.0, e2e_ms=7000.0)] * 48
    points = [point(v, rps, tps, latencies=lat) for v, rps, tps in GPU_FP16]
    mark_capacity(points)
    top = points[-1]
    modest = parse_slo("ttft_p95=500ms,min_goodput=2")
    greedy = parse_slo("ttft_p95=500ms,min_goodput=200")
    assert modest is not None and greedy is not None
    apply_slo(top, None, modest)
    assert top.at_capacity and top.slo_passed  # 6 good req/s delivered: the check asked for 2
    apply_slo(top, None, greedy)
    failed = [c.name for c in top.slo_checks if not c.passed]
    assert failed == ["min_goodput"]  # fails on goodput itself, once

    modest = parse_slo("ttft_p95=500ms,min_goodput=2,at_rate=256")
    assert modest is not None
    for p in points:
        apply_slo(p, None, modest)
    result = ServeBenchResult(
        created="", machine="", trace={},
        models=[ModelServing(label="m", model="m", role="model", server=ServerInfo(kind="url", url=""),
                             points=points, saturation=saturation_point(points))],
    )  # fmt: skip
    g = gate(result, modest)
    assert g["passed"] and g["at_capacity"] == ["256 req/s"] and "saturated_at" not in g


def test_a_report_stored_before_capacity_still_loads() -> None:
    old_point = point(256, 6.1, 387.0).model_dump(mode="json")
    for key in ("at_capacity", "capacity_since", "capacity_note", "unloaded_tpot_ms"):
        old_point.pop(key)
    loaded = PointResult.model_validate(old_point)
    assert not loaded.at_capacity and loaded.capacity_since is None and loaded.capacity_note is None
    old_saturation = {"saturated_at": None, "sustained_up_to": 256.0, "note": None}
    report = ServingReport.model_validate(
        {"schema": "llmopt.serving/1", "points": [old_point], "saturation": old_saturation}
    )
    assert report.points[0].at_capacity is False
    assert sweep_verdict(report.saturation) is None  # an old summary reads as before
    stored = ServeBenchResult.model_validate_json(
        json.dumps(
            {
                "created": "",
                "machine": "",
                "trace": {},
                "models": [
                    {"label": "m", "model": None, "role": "model", "server": {"kind": "url", "url": ""},
                     "points": [old_point], "saturation": old_saturation}
                ],
            }
        )
    )  # fmt: skip
    assert stored.models[0].points[0].at_capacity is False
    # and the judgement can be made on the stored numbers
    points = [PointResult.model_validate(dict(old_point, value=v, requests_per_s=r, output_tokens_per_s=t))
              for v, r, t in GPU_FP16]  # fmt: skip
    assert saturation_point(points)["capacity_from"] == 64.0


def test_plots_ring_the_points_at_capacity(tmp_path: Any) -> None:
    pytest.importorskip("matplotlib")
    from llmopt.serving.plots import write_plots

    points = sweep(GPU_FP16)
    mark_capacity(points)
    figs: dict[str, Any] = {}
    write_plots([("fp16", points)], tmp_path, save=lambda fig, name: figs.setdefault(name, fig))
    throughput = figs["serve-throughput.png"].axes[0]
    rings = [ln for ln in throughput.get_lines() if ln.get_label() == "fp16 at capacity"]
    assert len(rings) == 1 and list(rings[0].get_xdata()) == [256.0]
    latency = figs["serve-latency.png"].axes[0]
    assert [ln.get_xdata()[0] for ln in latency.get_lines() if ln.get_linestyle() == ":"] == [256.0]


def test_a_rate_at_capacity_is_never_sustained_even_within_the_plateau_requests() -> None:
    """Four requests at 1 req/s that happened to arrive in a burst completed 1.9 req/s; 2 req/s delivered no more.
    2 req/s is within the plateau's requests/s (+10%), but it is at capacity: not sustained."""
    points = [point(1, 1.9, 60.0), point(2, 1.95, 62.0)]
    assert marked(points) == {2.0: 1.0}
    assert saturation_point(points)["sustained_up_to"] == 1.0


def test_the_terminal_table_and_the_run_report_say_at_capacity(capsys: pytest.CaptureFixture[str]) -> None:
    """`serve-bench`'s table and verdict line, and a run's serving cell and report.md table, name the capacity (the
    GPU sweep of transformers serve read "kept up at every rate swept" before the rule)."""
    from llmopt.cli.serve_bench import render
    from llmopt.report import serving_text

    points = sweep(GPU_FP16)
    mark_capacity(points)
    saturation = saturation_point(points)
    model = ModelServing(
        label="fp16", model=None, role="model", server=ServerInfo(kind="transformers", url=""), points=points,
        saturation=saturation,
    )  # fmt: skip
    render(ServeBenchResult(created="", machine="", trace={"requests": 48}, models=[model]))
    out = " ".join(capsys.readouterr().out.split())  # the table may wrap a cell
    assert "fp16 at 256 req/s: 256 req/s offered (4x 64)" in out
    assert "fp16: capacity 407 tok/s" in out and "reached at 64 req/s" in out and "keeps up at" in out
    assert "kept up at every rate swept" not in out
    report = ServingReport.model_validate({"schema": "llmopt.serving/1", "points": points, "saturation": saturation})
    assert serving_text(report) == "at capacity from 64 req/s"


def test_a_partial_point_of_a_server_that_died_is_not_read() -> None:
    """A point cut short (the server exited) never makes a capacity, nor counts as sustained."""
    points = sweep([(4.0, 3.9, 125.0), (16.0, 3.9, 124.0)])
    points[1].interrupted = True
    assert marked(points) == {}
    assert saturation_point(points)["sustained_up_to"] == 4.0


def test_a_server_that_falls_over_is_named_so() -> None:
    points = sweep([(1.0, 1.0, 32.0), (2.0, 2.0, 64.0), (4.0, 3.9, 125.0), (8.0, 0.4, 12.0)])
    mark_capacity(points)
    note = points[-1].capacity_note or ""
    assert points[-1].at_capacity and "90% fewer requests completed" in note and "less than" not in note


def test_zero_throughput_on_both_sides_is_flat_not_growth() -> None:
    points = sweep([(4.0, 3.0, 0.0), (16.0, 3.0, 0.0)])
    assert marked(points) == {16.0: 4.0}


def test_estimate_never_recommends_a_rate_past_the_capacity() -> None:
    """`estimate --slo --rate 256` on a sweep at capacity from 64 (6.4 req/s at most): one GPU does not meet 256 req/s,
    nor 4 GPUs at 64 req/s each."""
    from llmopt.estimate.serving import _option

    points = sweep(GPU_FP16)
    mark_capacity(points)
    slo = parse_slo("ttft_p95=500ms")
    one = _option("fp16", points, 1, 256.0, slo, 3.0)
    assert not one.meets and any("above the server's capacity" in f for f in one.failures)
    four = _option("fp16", points, 4, 256.0, slo, 3.0)
    assert not four.meets and any("at most 6.40 req/s" in f for f in four.failures)
    assert _option("fp16", points, 1, 4.0, slo, 3.0).meets  # what it does sustain
