"""Serving in recipes (evaluation.serving, gates.slo / min_goodput), the SLO gate on stored measurements, and the
cost optimizer (`llmopt estimate --slo --rate`), on load points measured against tests/servestub.py, a real
streaming server whose delays are known."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest

from llmopt.errors import InputError, RecipeError
from llmopt.evaluate.gate import apply_gate
from llmopt.recipe import load_recipe, parse_recipe, recipe_json_schema
from llmopt.results import EvalReport, EvalSettings, ModelScore, ServingReport
from llmopt.serving.bench import Target, serve_bench
from llmopt.serving.metrics import parse_slo
from llmopt.specs import GateSpec, ServingSpec
from tests.helpers import run_cli
from tests.servestub import StubServer

# --- recipes --------------------------------------------------------------------------------------------------


def _recipe(**extra: Any) -> dict[str, Any]:
    data: dict[str, Any] = {
        "model": {"source": "some/model"},
        "evaluation": {"dataset": "text.txt"},
        "variants": [{"name": "q8", "method": "gguf", "options": {"quant_type": "q8_0"}}],
    }
    for key, value in extra.items():
        section, _, field = key.partition("__")
        if field:
            data.setdefault(section, {})[field] = value
        else:
            data[section] = value
    return data


def test_serving_section_and_slo_gates_parse_and_resolve() -> None:
    recipe = parse_recipe(
        _recipe(
            evaluation__serving={"rates": [1, 2], "requests": 8, "prompt_len": "32-64", "output_len": 16},
            gates__slo={"ttft_p95_ms": 500, "itl_p95_ms": 50},
            gates__min_goodput=0.5,
        )
    )
    serving = recipe.evaluation.serving
    assert serving is not None and serving.rates == [1.0, 2.0] and serving.requests == 8
    assert str(serving.prompt_len) == "32-64" and serving.trace().output_len.a == 16
    slo = recipe.gate_for(recipe.variants[0]).serving_slo()
    assert slo.limits == {"ttft_p95": 500.0, "itl_p95": 50.0} and slo.min_goodput == 0.5
    resolved = recipe.resolved()
    assert resolved["evaluation"]["serving"]["prompt_len"] == "32-64"
    assert resolved["variants"][0]["gate"]["slo"] == {"ttft_p95_ms": 500, "itl_p95_ms": 50}
    # the resolved recipe loads again as the same recipe (it travels with every artifact)
    again = parse_recipe(resolved | {"variants": [{k: v for k, v in resolved["variants"][0].items() if k != "gate"}]})
    assert again.evaluation.serving == serving
    # `serving: {}` is one rate, 1 request/s
    assert parse_recipe(_recipe(evaluation__serving={})).evaluation.serving.rates == [1.0]  # type: ignore[union-attr]
    # a gate record without SLO keys is written as before
    assert "slo" not in GateSpec(max_ppl=10).model_dump()


def test_schema_lists_the_serving_keys() -> None:
    schema = json.dumps(recipe_json_schema())
    for key in ("ServingSpec", "slo_at_rate", "min_goodput", "ttft_p95_ms"):
        assert key in schema


def test_per_variant_slo_override() -> None:
    recipe = parse_recipe(
        _recipe(
            evaluation__serving={"rates": [1, 4]},
            gates__slo={"ttft_p95_ms": 500},
            variants=[
                {"name": "a", "method": "gguf", "options": {"quant_type": "q8_0"}},
                {"name": "b", "method": "gguf", "options": {"quant_type": "q4_0"}, "gate": {"slo": {"e2e_p99_s": 2}}},
            ],
        )
    )
    a, b = recipe.variants
    assert recipe.gate_for(a).serving_slo().limits == {"ttft_p95": 500.0}
    assert recipe.gate_for(b).serving_slo().limits == {"e2e_p99": 2000.0}


@pytest.mark.parametrize(
    ("yaml_tail", "words"),
    [
        ("gates:\n  slo: {ttft_p95_ms: 500}\n", ["gates on slo/min_goodput", "add evaluation.serving"]),
        ("gates:\n  slo: {ttft_q95: 500}\n", [":8:", "gates.slo: unknown SLO key 'ttft_q95'"]),
        ("gates:\n  slo: {ttft_p95_ms: -1}\n", [":8:", "must be a positive number"]),
        ("evaluation:\n  dataset: t.txt\n  serving: {rates: [0]}\n", ["rates must be positive"]),
        ("evaluation:\n  dataset: t.txt\n  serving: {rate: 2}\n", ["unknown key 'rate'", "did you mean 'rates'"]),
        ("evaluation:\n  dataset: t.txt\n  serving: {output_len: lots}\n", ["'lots' is not a length"]),
        ("evaluation:\n  dataset: t.txt\n  serving: {server: tgi}\n", ["serving.server"]),
    ],
)
def test_bad_serving_keys_name_file_and_line(tmp_path: Path, yaml_tail: str, words: list[str]) -> None:
    head = "model: {source: some/model}\nvariants:\n  - {name: q8, method: gguf, options: {quant_type: q8_0}}\n"
    body = head + ("" if "evaluation:" in yaml_tail else "evaluation:\n  dataset: t.txt\n") + "\n" + yaml_tail
    if "evaluation:" in yaml_tail:
        body = head + "\n\n\n" + yaml_tail
    path = tmp_path / "r.yaml"
    path.write_text(body)
    with pytest.raises(RecipeError) as err:
        load_recipe(path)
    text = str(err.value)
    assert str(path) in text
    for w in words:
        assert w in text, text


def test_slo_at_rate_must_be_swept() -> None:
    with pytest.raises(RecipeError, match=r"slo_at_rate 3 is not among evaluation\.serving\.rates"):
        parse_recipe(
            _recipe(evaluation__serving={"rates": [1, 2]}, gates__slo={"ttft_p95_ms": 9}, gates__slo_at_rate=3)
        )


# --- the gate on stored measurements ---------------------------------------------------------------------------


def _measure(stub: StubServer, rates: list[float], requests: int = 8) -> ServingReport:
    spec = ServingSpec(rates=rates, requests=requests, warmup=1, output_len=8, prompt_len=16)
    result = serve_bench([Target(role="model", model=None, url=stub.url)], spec.trace())
    m = result.models[0]
    return ServingReport(
        model="stub", spec=spec.model_dump(mode="json"), machine=result.machine, points=m.points, failed=m.failed
    )


def _evaluation(serving: ServingReport | None) -> EvalReport:
    score = ModelScore(perplexity=10.0, stderr=0.1, mean_nll=2.3, tokens_scored=100, windows=1)
    return EvalReport(
        settings=EvalSettings(context_length=64, stride=64), baseline=score, artifact=score, serving=serving
    )


def test_slo_gate_reads_the_stored_latencies_at_any_slo() -> None:
    """TTFT is injected at 150 ms: a 100 ms limit fails, a 400 ms one passes, on the same measurement (no server)."""
    with StubServer(ttft=0.15, itl=0.01) as stub:
        serving = _measure(stub, [2.0, 4.0])
    ev = _evaluation(serving)
    tight = apply_gate(GateSpec(slo={"ttft_p95_ms": 100}), ev)
    loose = apply_gate(GateSpec(slo={"ttft_p95_ms": 400}, min_goodput=1.0), ev)
    assert not tight.passed and loose.passed
    assert [c.name for c in tight.checks] == ["slo.ttft_p95_ms@2/s", "slo.ttft_p95_ms@4/s"]
    assert "TTFT p95" in tight.checks[0].message and "limit 100 ms" in tight.checks[0].message
    assert tight.checks[0].value == pytest.approx(150, abs=60)
    goodput = next(c for c in loose.checks if c.name.startswith("slo.min_goodput@4"))
    assert goodput.value is not None and goodput.value > 1.0
    # read at one rate only
    at2 = apply_gate(GateSpec(slo={"ttft_p95_ms": 400}, slo_at_rate=2), ev)
    assert [c.name for c in at2.checks] == ["slo.ttft_p95_ms@2/s"]
    # the round trip through JSON (the manifest) keeps what the gate needs
    again = EvalReport.model_validate(json.loads(json.dumps(ev.to_json())))
    assert apply_gate(GateSpec(slo={"ttft_p95_ms": 100}), again) == tight


def test_slo_gate_without_serving_or_at_a_saturated_rate() -> None:
    missing = apply_gate(GateSpec(slo={"ttft_p95_ms": 100}), _evaluation(None))
    assert not missing.passed and "serving was not measured" in missing.checks[0].message
    # one request at a time, each ~0.5 s: 8 req/s saturates it; no percentile is held against the limit
    with StubServer(ttft=0.1, itl=0.05, serialize=True) as stub:
        serving = _measure(stub, [8.0], requests=10)
    assert serving.points[0].saturated
    gate = apply_gate(GateSpec(slo={"ttft_p95_ms": 100000}, min_goodput=0.1), _evaluation(serving))
    assert not gate.passed
    ttft = gate.checks[0]
    assert ttft.value is None and "saturated" in ttft.message
    assert not next(c for c in gate.checks if "min_goodput" in c.name).passed


# --- the cost optimizer -----------------------------------------------------------------------------------------


def _run_report(tmp_path: Path, fast: ServingReport, slow: ServingReport) -> Path:
    """A run report as `llmopt run` writes it (variants[].evaluation.serving), from real measurements."""
    from llmopt.report import build_run_report

    rows = []
    for name, serving in (("fast", fast), ("slow", slow)):
        rows.append({"name": name, "method": "gguf", "status": "passed", "evaluation": _evaluation(serving).to_json()})
    report = build_run_report(recipe={"name": "t"}, variants=rows, output=tmp_path)
    path = tmp_path / "report.json"
    path.write_text(json.dumps(report.to_json()))
    return path


@pytest.fixture(scope="module")
def measured_report(tmp_path_factory: pytest.TempPathFactory) -> Path:
    tmp = tmp_path_factory.mktemp("plan")
    with StubServer(ttft=0.05, itl=0.01) as stub:
        fast = _measure(stub, [1.0, 2.0, 4.0])
    with StubServer(ttft=0.3, itl=0.01) as stub:
        slow = _measure(stub, [1.0, 2.0, 4.0])
    return _run_report(tmp, fast, slow)


def test_optimizer_recommends_the_cheapest_that_meets_the_slo(measured_report: Path) -> None:
    from llmopt.estimate.serving import plan_serving

    slo = parse_slo("ttft_p95=200ms")
    assert slo is not None
    plan = plan_serving(measured_report, slo, 4.0, gpu_hourly_cost=2.0)
    rows = {(o.variant, o.gpus): o for o in plan.options}
    assert set(rows) == {(v, n) for v in ("fast", "slow") for n in (1, 2, 4, 8)}
    assert rows["fast", 1].source == "measured" and rows["fast", 1].read_at_rate == 4.0
    assert rows["fast", 2].source == "estimated" and rows["fast", 2].read_at_rate == 2.0
    assert rows["fast", 8].read_at_rate == 1.0  # 0.5 req/s per GPU, read at the lowest rate swept above it
    assert not rows["slow", 1].meets and rows["fast", 1].meets
    rec = plan.recommended
    assert rec is not None and (rec.variant, rec.gpus) == ("fast", 1)
    # cost: the price of one GPU-hour over the output tokens it serves per hour
    tps = rows["fast", 1].output_tokens_per_s
    assert tps is not None and rec.usd_per_million_tokens == pytest.approx(2.0 / 3600 / tps * 1e6)
    assert rows["fast", 2].usd_per_million_tokens > rec.usd_per_million_tokens  # two GPUs for the same tokens
    # a rate above every swept rate per GPU is not known, not guessed
    high = plan_serving(measured_report, slo, 64.0, gpu_counts=(1, 8))
    assert all(not o.meets for o in high.options if o.gpus == 1)
    assert high.options[0].read_at_rate is None and "not known" in high.options[0].basis


def test_optimizer_cli_none_meets_names_the_closest_and_exits_3(measured_report: Path, tmp_path: Path) -> None:
    args = ["estimate", "--report", str(measured_report), "--slo", "ttft_p95=10ms", "--rate", "2"]
    r = run_cli([*args, "--json"], cwd=tmp_path)
    assert r.returncode == 3, r.stderr
    data = json.loads(r.stdout)
    assert data["recommended"] is None and data["closest"]["variant"] == "fast"
    r = run_cli([*args[:4], "ttft_p95=200ms", "--rate", "2", "--gpu-hourly-cost", "1.5"], cwd=tmp_path)
    assert r.returncode == 0, r.stderr
    assert "Recommended" in r.stdout and "fast on 1 GPU(s)" in r.stdout and "measured" in r.stdout


@pytest.mark.parametrize(
    ("args", "words"),
    [
        (["--slo", "ttft_p95=1s", "--rate", "2"], "--slo, --rate and --report go together"),
        (["--slo", "ttft_p95=1s", "--rate", "-1", "--report", "R"], "is not a request rate"),
        (["--slo", "ttft_p95=1s", "--rate", "2", "--report", "R", "--gpus", "a"], "is not a list of GPU counts"),
        (["--slo", "nonsense=1", "--rate", "2", "--report", "R"], "is not known"),
        (["--slo", "ttft_p95=1s", "--rate", "2", "--report", "missing.json"], "does not exist"),
        (["--slo", "ttft_p95=1s", "--rate", "2", "--report", "E"], "holds no serving measurements"),
    ],
)
def test_optimizer_bad_input_exits_2(measured_report: Path, tmp_path: Path, args: list[str], words: str) -> None:
    (tmp_path / "E").write_text(json.dumps({"variants": [{"name": "x", "status": "passed"}]}))
    args = [str(measured_report) if a == "R" else a for a in args]
    r = run_cli(["estimate", *args], cwd=tmp_path)
    assert r.returncode == 2, r.stderr
    assert words in r.stderr and "Traceback" not in r.stderr


def test_estimate_without_model_or_slo_is_bad_input(tmp_path: Path) -> None:
    r = run_cli(["estimate"], cwd=tmp_path)
    assert r.returncode == 2 and "give a MODEL" in r.stderr


def test_an_unknown_slo_key_in_the_recipe_is_refused_at_load() -> None:
    with pytest.raises(RecipeError, match="unknown SLO key"):
        parse_recipe(_recipe(evaluation__serving={}, gates__slo={"latency": 5}))
    with pytest.raises(InputError):
        parse_slo("ttft_p95=fast")


def test_run_slo_flag_is_checked_before_any_work(tmp_path: Path) -> None:
    recipe = tmp_path / "r.yaml"
    recipe.write_text(
        "model: {source: nowhere}\nevaluation: {dataset: t.txt}\n"
        "variants:\n  - {name: q8, method: gguf, options: {quant_type: q8_0}}\n"
    )
    r = run_cli(["run", str(recipe), "--slo", "ttft_p95=soon"], cwd=tmp_path)
    assert r.returncode == 2 and "is not a duration" in r.stderr
    r = run_cli(["run", str(recipe), "--slo", "ttft_p95=500ms"], cwd=tmp_path)
    assert r.returncode == 2 and "add evaluation.serving" in r.stderr
    r = run_cli(["run", str(recipe), "--slo", "ttft_p95=500ms,at_rate=3", "--set", "evaluation.serving.rates=[1]"])
    assert r.returncode == 2 and "slo_at_rate 3 is not among evaluation.serving.rates" in r.stderr
    assert not (tmp_path / "llmopt-runs").exists()
