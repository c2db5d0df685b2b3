"""Gate: thresholds from the recipe or CLI, applied to an evaluation report."""

from __future__ import annotations

import math
from typing import Any

from pydantic import BaseModel, ConfigDict, Field, ValidationError

from llmopt.errors import ArtifactError, InputError


class GateSpec(BaseModel):
    """Thresholds; a threshold left unset is not checked."""

    # A negative limit or NaN makes a gate nothing can pass (or, for NaN, that compares false everywhere)
    # and prints as "limit +-5%": refused up front rather than recorded as a meaningful check.
    model_config = ConfigDict(extra="forbid", allow_inf_nan=False)
    max_ppl_increase_pct: float | None = Field(
        None, ge=0, description="Largest allowed perplexity increase over FP16, % (0 or more)."
    )
    max_ppl: float | None = Field(None, gt=0, description="Largest allowed absolute perplexity.")
    min_decode_speedup: float | None = Field(None, gt=0, description="Smallest decode speedup over FP16.")
    at_batch: int = Field(1, ge=1, description="Batch size at which the decode speedup is read.")

    def is_empty(self) -> bool:
        return self.max_ppl_increase_pct is None and self.max_ppl is None and self.min_decode_speedup is None


def gate_spec(**thresholds: Any) -> GateSpec:
    """A GateSpec from command-line values; a meaningless threshold is bad input (exit 2), not a traceback."""
    try:
        return GateSpec(**thresholds)
    except ValidationError as exc:
        err = exc.errors()[0]
        name = str(err["loc"][0]) if err["loc"] else "gate"
        flag = "--" + name.replace("_pct", "").replace("_", "-")
        raise InputError(
            f"{flag} {err.get('input')!r} is not a usable threshold: {err['msg']}.",
            "Give a finite number: a percentage of 0 or more for --max-ppl-increase, "
            "a positive number for --max-ppl and --min-decode-speedup.",
        ) from None


class GateCheck(BaseModel):
    name: str
    value: float | None
    threshold: float
    passed: bool
    message: str


class GateResult(BaseModel):
    passed: bool
    checks: list[GateCheck]

    def failures(self) -> list[GateCheck]:
        return [c for c in self.checks if not c.passed]


def apply_gate(spec: GateSpec, report: dict[str, Any]) -> GateResult:
    checks: list[GateCheck] = []
    if spec.max_ppl_increase_pct is not None:
        delta = report.get("delta_pct")
        ok = delta is not None and delta <= spec.max_ppl_increase_pct
        checks.append(
            GateCheck(
                name="max_ppl_increase_pct",
                value=delta,
                threshold=spec.max_ppl_increase_pct,
                passed=ok,
                message=(
                    f"perplexity +{delta:.2f}% vs FP16 (limit +{spec.max_ppl_increase_pct:g}%)"
                    if delta is not None
                    else "perplexity delta was not measured"
                )
                + ("" if ok or delta is None else f": over by {delta - spec.max_ppl_increase_pct:.2f} points"),
            )
        )
    if spec.max_ppl is not None:
        ppl = (report.get("artifact") or {}).get("perplexity")
        ok = ppl is not None and ppl <= spec.max_ppl
        checks.append(
            GateCheck(
                name="max_ppl",
                value=ppl,
                threshold=spec.max_ppl,
                passed=ok,
                message=f"perplexity {ppl:.3f} (limit {spec.max_ppl:g})" if ppl is not None else "no perplexity",
            )
        )
    if spec.min_decode_speedup is not None:
        speedup = _decode_speedup(report, spec.at_batch)
        ok = speedup is not None and speedup >= spec.min_decode_speedup
        checks.append(
            GateCheck(
                name="min_decode_speedup",
                value=speedup,
                threshold=spec.min_decode_speedup,
                passed=ok,
                message=(
                    f"decode speedup {speedup:.2f}x at batch {spec.at_batch} (needs {spec.min_decode_speedup:g}x)"
                    if speedup is not None
                    else f"decode speed at batch {spec.at_batch} was not measured (run with --throughput)"
                ),
            )
        )
    return GateResult(passed=all(c.passed for c in checks), checks=checks)


def _decode_speedup(report: dict[str, Any], batch: int) -> float | None:
    throughput = report.get("throughput") or {}
    speedups = throughput.get("decode_speedup") or {}
    value = speedups.get(str(batch))
    return float(value) if value is not None else None


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


def _window_tokens(settings: dict[str, Any]) -> list[int]:
    """Tokens scored per window: they follow from the text length and the window settings alone."""
    from llmopt.evaluate.perplexity import make_windows

    total, context, stride = settings.get("tokens_total"), settings.get("context_length"), settings.get("stride")
    if not all(isinstance(v, int) and not isinstance(v, bool) for v in (total, context, stride)):
        raise ValueError("settings.tokens_total, context_length and stride are not all recorded")
    assert isinstance(total, int) and isinstance(context, int) and isinstance(stride, int)
    if total > 100_000_000:
        raise ValueError(f"settings.tokens_total {total} is not a plausible text length")
    bos = 0 if settings.get("add_bos") else None
    try:
        windows = make_windows(range(total), context, stride, bos_id=bos)
    except InputError as exc:
        raise ValueError(f"the window settings cannot have produced this evaluation ({exc.message})") from None
    return [len(w.ids) - w.score_from for w in windows]


def _side(name: str, block: dict[str, Any], tokens: list[int]) -> tuple[list[float], list[str]]:
    """Recompute one model's perplexity numbers from its per-window NLLs; the stored numbers that differ."""
    from llmopt.evaluate.perplexity import _stderr_of_mean

    nll = block.get("window_nll")
    if not isinstance(nll, list) or not all(isinstance(v, int | float) and not isinstance(v, bool) for v in nll):
        raise ValueError(f"{name}.window_nll (the per-window scores) is missing")
    if len(nll) != len(tokens):
        raise ValueError(f"{name}.window_nll has {len(nll)} windows where the settings make {len(tokens)}")
    if not all(math.isfinite(v) and v >= 0 for v in nll):
        raise ValueError(f"{name}.window_nll holds a value that no model can score (negative or not finite)")
    count = sum(tokens)
    mean = math.fsum(v * n for v, n in zip(nll, tokens, strict=True)) / count
    ppl = math.exp(mean)
    derived = {
        "mean_nll": mean,
        "perplexity": ppl,
        "stderr": ppl * _stderr_of_mean([float(v) for v in nll], tokens),
        "tokens_scored": float(count),
        "windows": float(len(tokens)),
    }
    wrong = [
        f"{name}.{key} is {block.get(key)!r}, its window scores give {value:.6g}"
        for key, value in derived.items()
        if not _same(block.get(key), value)
    ]
    return [float(v) for v in nll], wrong


def evaluation_problems(evaluation: dict[str, Any], gate: dict[str, Any] | None = None) -> list[str]:
    """The stored numbers of an evaluation (and of its gate record) that do not follow from its raw numbers.

    The raw numbers are the per-window mean NLLs of both models and the window settings; from them follow
    both perplexities, their errors, the paired delta vs FP16 and, with the stored thresholds, the gate.
    An empty list means the summary is consistent, not that the raw numbers are genuine.
    """
    from llmopt.evaluate.perplexity import paired_delta

    settings = evaluation.get("settings") or {}
    try:
        tokens = _window_tokens(settings)
        if not tokens:
            raise ValueError("the window settings make no windows")
        base, wrong = _side("baseline", evaluation.get("baseline") or {}, tokens)
        art, wrong_art = _side("artifact", evaluation.get("artifact") or {}, tokens)
    except ValueError as exc:
        return [str(exc)]
    wrong += wrong_art
    for key, value in (("tokens_scored", sum(tokens)), ("windows", len(tokens))):
        if not _same(settings.get(key), float(value)):
            wrong.append(f"settings.{key} is {settings.get(key)!r}, the window settings give {value}")
    delta, delta_se = paired_delta(art, base, tokens)
    if not _same(evaluation.get("delta_pct"), delta):
        wrong.append(f"delta_pct is {evaluation.get('delta_pct')!r}, the window scores give {delta:+.4f}%")
    if not _same(evaluation.get("delta_pct_stderr"), delta_se):
        wrong.append(
            f"delta_pct_stderr is {evaluation.get('delta_pct_stderr')!r}, the window scores give {delta_se:.4g}"
        )
    speed = evaluation.get("throughput")
    if speed:
        wrong += _speed_problems(speed)
    if gate is not None:
        wrong += _gate_problems(evaluation, gate)
    return wrong


def _speed_problems(speed: dict[str, Any]) -> list[str]:
    def median(block: Any, key: str) -> float | None:
        value = ((block or {}).get(key) or {}).get("median") if isinstance(block, dict) else None
        return float(value) if isinstance(value, int | float) and not isinstance(value, bool) else None

    wrong = []
    base_decode = (speed.get("baseline") or {}).get("decode") or {}
    art_decode = (speed.get("artifact") or {}).get("decode") or {}
    stored = speed.get("decode_speedup") or {}
    for batch in sorted(set(stored) | set(art_decode)):
        a, b = median(art_decode.get(batch), "tokens_per_s"), median(base_decode.get(batch), "tokens_per_s")
        ratio = a / b if a and b else None
        if not _same(stored.get(batch), ratio):
            wrong.append(f"throughput.decode_speedup[{batch}] is {stored.get(batch)!r}, the medians give {ratio!r}")
    return wrong


def _gate_problems(evaluation: dict[str, Any], gate: dict[str, Any]) -> list[str]:
    try:
        spec = GateSpec.model_validate(gate.get("spec"))
    except ValidationError:
        return ["gate.spec (the thresholds the gate was applied with) is missing or not valid thresholds"]
    again = apply_gate(spec, evaluation)
    wrong = []
    if gate.get("passed") is not again.passed:
        wrong.append(f"gate.passed is {gate.get('passed')!r}, its thresholds give {again.passed}")
    stored = gate.get("checks")
    if not isinstance(stored, list) or len(stored) != len(again.checks):
        wrong.append("gate.checks are not the checks its thresholds make")
        return wrong
    for old, new in zip(stored, again.checks, strict=True):
        fresh = new.model_dump(mode="json")
        if (
            not isinstance(old, dict)
            or any(old.get(k) != fresh[k] for k in ("name", "passed", "message"))
            or not (_same(old.get("value"), new.value) and _same(old.get("threshold"), new.threshold))
        ):
            wrong.append(f"gate check {fresh['name']} does not follow from the numbers (recomputed: {new.message})")
    return wrong


def require_consistent(evaluation: dict[str, Any], gate: dict[str, Any] | None, where: str) -> None:
    """Raise (exit 5) when a stored evaluation's summary does not follow from its own raw numbers."""
    wrong = evaluation_problems(evaluation, gate)
    if wrong:
        listed = "; ".join(wrong[:3]) + (f"; and {len(wrong) - 3} more" if len(wrong) > 3 else "")
        raise ArtifactError(
            f"{where}: the stored evaluation does not add up: {listed}.",
            "The manifest was edited or damaged: evaluate the artifact again (`llmopt eval ...`) before publishing.",
        )
