"""Gate: thresholds from the recipe or CLI (``specs.GateSpec``), applied to an evaluation report."""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any

from llmopt.errors import ArtifactError, InputError
from llmopt.results import Distribution, EvalReport, EvalSettings, GateCheck, GateResult, ModelScore, SpeedReport
from llmopt.specs import GateSpec, gate_spec

# GateSpec and gate_spec live in llmopt/specs.py, GateCheck and GateResult in llmopt/results.py; importable here too.
__all__ = [
    "GateCheck",
    "GateResult",
    "GateSpec",
    "apply_gate",
    "evaluation_problems",
    "gate_spec",
    "require_consistent",
]


def _report(report: EvalReport | Mapping[str, Any]) -> EvalReport:
    return report if isinstance(report, EvalReport) else EvalReport.model_validate(report)


def apply_gate(spec: GateSpec, report: EvalReport | Mapping[str, Any]) -> GateResult:
    """The checks of ``spec`` on ``report``'s numbers; the result records the thresholds (``spec``)."""
    ev = _report(report)
    checks: list[GateCheck] = []
    if spec.max_ppl_increase_pct is not None:
        t, delta = spec.max_ppl_increase_pct, ev.delta_pct
        text = f"perplexity {delta:+.2f}% vs FP16 (limit +{t:g}%)" if delta is not None else ""
        checks.append(_check("max_ppl_increase_pct", delta, t, True, text, "perplexity delta was not measured",
                             ": over by {:.2f} points"))  # fmt: skip
    if spec.max_ppl is not None:
        t, ppl = spec.max_ppl, ev.artifact.perplexity
        text = f"perplexity {ppl:.3f} (limit {t:g})" if ppl is not None else ""
        checks.append(_check("max_ppl", ppl, t, True, text, "no perplexity"))
    dist = ev.artifact.distribution
    if spec.max_kld is not None:
        t, kld = spec.max_kld, (dist.kld_mean if dist is not None else None)
        text = f"mean KL divergence {kld:.5f} nats vs FP16 (limit {t:g})" if kld is not None else ""
        missing = "KL divergence was not measured (evaluate without --no-kld)"
        checks.append(_check("max_kld", kld, t, True, text, missing, ": over by {:.5f}"))
    if spec.min_top1_pct is not None:
        t, pct = spec.min_top1_pct, (100.0 * dist.top1_agreement if dist is not None else None)
        text = f"top-1 agreement with FP16 {pct:.2f}% (needs {t:g}%)" if pct is not None else ""
        missing = "top-1 agreement was not measured (evaluate without --no-kld)"
        checks.append(_check("min_top1_pct", pct, t, False, text, missing, ": short by {:.2f} points"))
    if spec.min_decode_speedup is not None:
        t, b, speedup = spec.min_decode_speedup, spec.at_batch, ev.decode_speedup(spec.at_batch)
        text = f"decode speedup {speedup:.2f}x at batch {b} (needs {t:g}x)" if speedup is not None else ""
        missing = f"decode speed at batch {b} was not measured (run with --throughput)"
        checks.append(_check("min_decode_speedup", speedup, t, False, text, missing))
    if spec.min_recovery is not None:
        checks += _recovery_checks(spec.min_recovery, ev)
    if spec.needs_serving():
        checks += serving_checks(spec, ev)
    return GateResult(passed=all(c.passed for c in checks), checks=checks, spec=spec)


def _recovery_checks(threshold: float, ev: EvalReport) -> list[GateCheck]:
    """``min_recovery:TASK`` for each task, on its primary metric (acc_norm, else acc); one failing check when
    no task accuracy was measured (no --tasks, or a format lm-eval cannot run)."""
    primary = [c for c in ev.task_recovery or [] if c.primary]
    if not primary:
        tasks = ev.artifact.tasks
        missing = (
            f"task accuracy recovery was not measured: {tasks.not_run}"
            if tasks is not None and tasks.not_run
            else "task accuracy recovery was not measured (evaluate with --tasks)"
        )
        return [_check("min_recovery", None, threshold, False, "", missing)]
    checks = []
    for c in primary:
        rec = c.recovery
        se = f" ± {c.recovery_stderr:.3f}" if c.recovery_stderr is not None else ""
        text = (
            f"{c.task} {c.metric} recovery {rec:.3f}{se} ({c.artifact:.3f} vs FP16 {c.baseline:.3f}; "
            f"needs {threshold:g})"
            if rec is not None
            else ""
        )
        missing = f"{c.task} {c.metric}: FP16 scored 0, so no recovery can be read"
        checks.append(_check(f"min_recovery:{c.task}", rec, threshold, False, text, missing, ": short by {:.3f}"))
    return checks


_SLO_LABEL = {"ttft": "TTFT", "itl": "inter-token latency", "tpot": "time per output token", "e2e": "end-to-end"}


def serving_checks(spec: GateSpec, ev: EvalReport) -> list[GateCheck]:
    """The serving SLO (``spec.slo``, ``spec.min_goodput``) at ``spec.slo_at_rate``, or at every load point,
    judged on the artifact's stored per-request latencies (so a changed SLO needs no new measurement)."""
    from llmopt.serving.metrics import with_slo

    slo = spec.serving_slo()
    serving = ev.serving
    if serving is None:
        # no result: the recipe has no evaluation.serving, or serving failed (the variant's error says why)
        why = "serving was not measured (no evaluation.serving in the recipe, or serving failed: see its error)"
        return [_check("slo", None, 0, True, "", why)]
    points = serving.points
    if spec.slo_at_rate is not None:
        points = [p for p in points if p.mode == "rate" and p.value == spec.slo_at_rate]
    if not points:
        at = f" at {spec.slo_at_rate:g} req/s" if spec.slo_at_rate is not None else ""
        why = f"; serving stopped early: {serving.failed}" if serving.failed else ""
        return [_check("slo", None, 0, True, "", f"serving was not measured{at}{why}")]
    checks: list[GateCheck] = []
    for point in points:
        judged = with_slo(point, slo)
        for c in judged.slo_checks:
            name = f"slo.{c.name}@{point.label.replace(' req/s', '/s').replace(' ', '')}"
            if c.name == "min_goodput":  # never unmeasured: apply_slo always computes a goodput
                text = f"goodput {c.value or 0:.2f} req/s at {point.label} (needs {c.limit:g})"
                if point.saturated:
                    text += f"; saturated: {point.saturation_note}"
                checks.append(_check(name, c.value, c.limit, False, text, "goodput was not measured"))
                if point.saturated and checks[-1].passed:  # a saturated server's goodput is not sustained
                    checks[-1] = checks[-1].model_copy(update={"passed": False})
            elif c.name == "errors":
                text = f"{c.value:g} of {point.requests} requests failed at {point.label}"
                checks.append(_check(name, c.value, 0, True, text, "no requests"))
            else:
                metric, pct = c.name.split("_")[:2]
                text = (
                    f"{_SLO_LABEL[metric]} {pct} {c.value:,.1f} ms at {point.label} (limit {c.limit:g} ms)"
                    if c.value is not None
                    else ""
                )
                missing = (
                    f"{_SLO_LABEL[metric]} {pct} not reported at {point.label}: the server saturated "
                    f"({point.saturation_note})"
                    if point.saturated
                    else f"{_SLO_LABEL[metric]} {pct} was not measured at {point.label}"
                )
                checks.append(_check(name, c.value, c.limit, True, text, missing))
    return checks


def _check(
    name: str, value: float | None, threshold: float, at_most: bool, text: str, missing: str, gap: str | None = None
) -> GateCheck:
    """One threshold check: ``value`` at most (or at least) ``threshold``; ``gap`` formats how far off a failure is."""
    if value is None:
        return GateCheck(name=name, value=None, threshold=threshold, passed=False, margin=None, message=missing)
    margin = threshold - value if at_most else value - threshold
    ok = margin >= 0
    message = text + ("" if ok or gap is None else gap.format(-margin))
    return GateCheck(name=name, value=value, threshold=threshold, passed=ok, margin=margin, message=message)


# --- integrity: the summary must follow from the raw numbers stored next to it ------------------------

_REL_TOL = 1e-9  # what float summation order can change; an edit by hand is far larger


def _same(stored: Any, recomputed: float | None) -> bool:
    if recomputed is None:
        return stored is None
    if isinstance(stored, bool) or not isinstance(stored, int | float):
        return False
    if math.isnan(recomputed) or math.isnan(stored):
        return math.isnan(recomputed) and math.isnan(stored)
    return math.isclose(float(stored), recomputed, rel_tol=_REL_TOL, abs_tol=1e-12)


def _window_tokens(settings: EvalSettings | Mapping[str, Any]) -> list[int]:
    """Tokens scored per window: they follow from the text length and the window settings alone."""
    from llmopt.evaluate.perplexity import make_windows

    s = settings if isinstance(settings, EvalSettings) else EvalSettings.model_validate(settings)
    total, context, stride = s.tokens_total, s.context_length, s.stride
    if total is None:
        raise ValueError("settings.tokens_total, context_length and stride are not all recorded")
    if total > 100_000_000:
        raise ValueError(f"settings.tokens_total {total} is not a plausible text length")
    bos = 0 if s.add_bos else None
    try:
        windows = make_windows(range(total), context, stride, bos_id=bos)
    except InputError as exc:
        raise ValueError(f"the window settings cannot have produced this evaluation ({exc.message})") from None
    return [len(w.ids) - w.score_from for w in windows]


def _side(name: str, score: ModelScore, tokens: list[int]) -> tuple[list[float], list[str]]:
    """Recompute one model's perplexity numbers from its per-window NLLs; the stored numbers that differ."""
    from llmopt.evaluate.perplexity import _stderr_of_mean

    nll = score.window_nll
    if nll is None:
        raise ValueError(f"{name}.window_nll (the per-window scores) is missing")
    if len(nll) != len(tokens):
        raise ValueError(f"{name}.window_nll has {len(nll)} windows where the settings make {len(tokens)}")
    if not all(math.isfinite(v) and v >= 0 for v in nll):
        raise ValueError(f"{name}.window_nll holds a value that no model can score (negative or not finite)")
    count = sum(tokens)
    mean = math.fsum(v * n for v, n in zip(nll, tokens, strict=True)) / count
    ppl = math.exp(mean)
    derived = {
        "mean_nll": (score.mean_nll, mean),
        "perplexity": (score.perplexity, ppl),
        "stderr": (score.stderr, ppl * _stderr_of_mean(list(nll), tokens)),
        "tokens_scored": (score.tokens_scored, float(count)),
        "windows": (score.windows, float(len(tokens))),
    }
    wrong = [
        f"{name}.{key} is {stored!r}, its window scores give {value:.6g}"
        for key, (stored, value) in derived.items()
        if not _same(stored, value)
    ]
    return list(nll), wrong


def evaluation_problems(
    evaluation: EvalReport | Mapping[str, Any], gate: GateResult | Mapping[str, Any] | None = None
) -> list[str]:
    """The stored numbers of an evaluation (and of its gate record) that do not follow from its raw numbers.

    The raw numbers are the per-window mean NLLs of both models and the window settings; from them follow
    both perplexities, their errors, the paired delta vs FP16 and, with the stored thresholds, the gate. With
    a KL divergence block, its per-window means give its mean KLD and top-1 agreement (and their errors).
    An empty list means the summary is consistent, not that the raw numbers are genuine.
    """
    from llmopt.evaluate.perplexity import paired_delta

    ev = _report(evaluation)
    settings = ev.settings
    try:
        tokens = _window_tokens(settings)
        if not tokens:
            raise ValueError("the window settings make no windows")
        base, wrong = _side("baseline", ev.baseline, tokens)
        art, wrong_art = _side("artifact", ev.artifact, tokens)
    except ValueError as exc:
        return [str(exc)]
    wrong += wrong_art
    for key, stored, value in (
        ("tokens_scored", settings.tokens_scored, sum(tokens)),
        ("windows", settings.windows, len(tokens)),
    ):
        if not _same(stored, float(value)):
            wrong.append(f"settings.{key} is {stored!r}, the window settings give {value}")
    delta, delta_se = paired_delta(art, base, tokens)
    if not _same(ev.delta_pct, delta):
        wrong.append(f"delta_pct is {ev.delta_pct!r}, the window scores give {delta:+.4f}%")
    if not _same(ev.delta_pct_stderr, delta_se):
        wrong.append(f"delta_pct_stderr is {ev.delta_pct_stderr!r}, the window scores give {delta_se:.4g}")
    if ev.artifact.distribution is not None:
        wrong += _distribution_problems(ev.artifact.distribution, tokens)
    if ev.throughput:
        wrong += _speed_problems(ev.throughput)
    if ev.task_recovery is not None:
        wrong += _task_problems(ev)
    for side, tasks in (("baseline", ev.baseline.tasks), ("artifact", ev.artifact.tasks)):
        if tasks is not None:
            wrong += _task_score_problems(side, tasks)
    if gate is not None:
        wrong += _gate_problems(ev, gate if isinstance(gate, GateResult) else GateResult.model_validate(gate))
    return wrong


def _distribution_problems(dist: Distribution, tokens: list[int]) -> list[str]:
    """The KL divergence block's mean and top-1 agreement (and their errors) against its per-window values.

    The percentiles, the maximum and Δp need every token's value, which is not stored: they are trusted."""
    from llmopt.evaluate.perplexity import _stderr_of_mean

    wrong = []
    count = sum(tokens)
    for per_window, values, low, high, pairs in (
        # a KL divergence is never negative (float rounding aside)
        ("window_kld", dist.window_kld, -1e-6, math.inf,
         (("kld_mean", dist.kld_mean), ("kld_stderr", dist.kld_stderr))),
        ("window_top1", dist.window_top1, 0.0, 1.0,
         (("top1_agreement", dist.top1_agreement), ("top1_agreement_stderr", dist.top1_agreement_stderr))),
    ):  # fmt: skip
        if values is None or not all(math.isfinite(v) and low <= v <= high for v in values):
            wrong.append(f"artifact.distribution.{per_window} is missing or holds impossible values")
            continue
        if len(values) != len(tokens):
            wrong.append(
                f"artifact.distribution.{per_window} has {len(values)} windows where the settings make {len(tokens)}"
            )
            continue
        mean = math.fsum(v * n for v, n in zip(values, tokens, strict=True)) / count
        derived = (mean, _stderr_of_mean(list(values), tokens))
        for (key, stored), value in zip(pairs, derived, strict=True):
            if not _same(stored, value):
                wrong.append(f"artifact.distribution.{key} is {stored!r}, its window values give {value:.6g}")
    if not _same(dist.tokens, float(count)):
        wrong.append(f"artifact.distribution.tokens is {dist.tokens!r}, the window settings give {count}")
    return wrong


def _task_problems(ev: EvalReport) -> list[str]:
    """The task recoveries against both models' per-example task scores."""
    from llmopt.evaluate.tasks import compare

    base, art = ev.baseline.tasks, ev.artifact.tasks
    if base is None or art is None:
        return ["task_recovery is recorded without both models' task scores"]
    again = {(c.task, c.metric): c for c in compare(base, art)}
    wrong = []
    for c in ev.task_recovery or []:
        new = again.get((c.task, c.metric))
        if new is None:
            wrong.append(f"task_recovery {c.task} {c.metric} has no task scores behind it")
        elif not (_same(c.recovery, new.recovery) and _same(c.recovery_stderr, new.recovery_stderr)):
            wrong.append(f"task_recovery {c.task} {c.metric} is {c.recovery!r}, the task scores give {new.recovery!r}")
        elif c.primary != new.primary or not (_same(c.baseline, new.baseline) and _same(c.artifact, new.artifact)):
            wrong.append(f"task_recovery {c.task} {c.metric} does not follow from the task scores")
    if len(again) != len(ev.task_recovery or []):
        wrong.append("task_recovery does not list the metrics both models were scored on")
    return wrong


def _task_score_problems(side: str, tasks: Any) -> list[str]:
    """Each task score against its own per-example values: the mean, the count, and (acc, acc_norm: lm-eval's
    mean_stderr, the sample standard deviation over sqrt(n)) the standard error the card prints."""
    import statistics

    wrong = []
    for s in tasks.scores:
        if s.examples is None:  # a corpus-level metric has no per-example values
            continue
        n = len(s.examples)
        name = f"{side}.tasks {s.task} {s.metric}"
        if s.n != n or (s.doc_ids is not None and len(s.doc_ids) != n):
            wrong.append(f"{name}: n is {s.n!r}, it lists {n} examples")
        elif tasks.limit is not None and n > tasks.limit:
            wrong.append(f"{name}: {n} examples, more than its limit {tasks.limit}")
        elif n and not _same(s.value, statistics.fmean(s.examples)):
            wrong.append(f"{name}: value is {s.value!r}, its examples give {statistics.fmean(s.examples)!r}")
        elif s.metric.split(",")[0] in ("acc", "acc_norm") and n > 1 and s.stderr is not None:
            se = statistics.stdev(s.examples) / math.sqrt(n)
            if not _same(s.stderr, se):
                wrong.append(f"{name}: stderr is {s.stderr!r}, its examples give {se!r}")
    return wrong


def _speed_problems(speed: SpeedReport) -> list[str]:
    # the raw speed blocks are the bench records (dicts of measurements), read as such
    def median(block: Any, key: str) -> float | None:
        value = ((block or {}).get(key) or {}).get("median") if isinstance(block, dict) else None
        return float(value) if isinstance(value, int | float) and not isinstance(value, bool) else None

    wrong = []
    base_decode = speed.baseline.get("decode") or {}
    art_decode = speed.artifact.get("decode") or {}
    stored = speed.decode_speedup
    for batch in sorted(set(stored) | set(art_decode)):
        a, b = median(art_decode.get(batch), "tokens_per_s"), median(base_decode.get(batch), "tokens_per_s")
        ratio = a / b if a and b else None
        if not _same(stored.get(batch), ratio):
            wrong.append(f"throughput.decode_speedup[{batch}] is {stored.get(batch)!r}, the medians give {ratio!r}")
    return wrong


def _gate_problems(evaluation: EvalReport, gate: GateResult) -> list[str]:
    if gate.spec is None:
        return ["gate.spec (the thresholds the gate was applied with) is missing or not valid thresholds"]
    again = apply_gate(gate.spec, evaluation)
    wrong = []
    if gate.passed is not again.passed:
        wrong.append(f"gate.passed is {gate.passed!r}, its thresholds give {again.passed}")
    if len(gate.checks) != len(again.checks):
        wrong.append("gate.checks are not the checks its thresholds make")
        return wrong
    for old, new in zip(gate.checks, again.checks, strict=True):
        if (
            (old.name, old.passed, old.message) != (new.name, new.passed, new.message)
            or not (_same(old.value, new.value) and _same(old.threshold, new.threshold))
            or (old.margin is not None and not _same(old.margin, new.margin))
        ):
            wrong.append(f"gate check {new.name} does not follow from the numbers (recomputed: {new.message})")
    return wrong


def require_consistent(
    evaluation: EvalReport | Mapping[str, Any], gate: GateResult | Mapping[str, Any] | None, where: str
) -> None:
    """Raise (exit 5) when a stored evaluation's summary does not follow from its own raw numbers."""
    wrong = evaluation_problems(evaluation, gate)
    if wrong:
        listed = "; ".join(wrong[:3]) + (f"; and {len(wrong) - 3} more" if len(wrong) > 3 else "")
        raise ArtifactError(
            f"{where}: the stored evaluation does not add up: {listed}.",
            "The manifest was edited or damaged: evaluate the artifact again (`llmopt eval ...`) before publishing.",
        )
