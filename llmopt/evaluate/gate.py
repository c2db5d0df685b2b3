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
    max_kld: float | None = Field(
        None, ge=0, description="Largest allowed mean KL divergence KL(FP16 || artifact) per token, nats (0 or more)."
    )
    min_top1_pct: float | None = Field(
        None,
        ge=0,
        le=100,
        description="Smallest allowed top-1 agreement with FP16: % of tokens whose most likely next token is "
        "unchanged (0-100).",
    )
    min_decode_speedup: float | None = Field(None, gt=0, description="Smallest decode speedup over FP16.")
    at_batch: int = Field(1, ge=1, description="Batch size at which the decode speedup is read.")

    def is_empty(self) -> bool:
        return all(
            v is None
            for v in (self.max_ppl_increase_pct, self.max_ppl, self.max_kld, self.min_top1_pct, self.min_decode_speedup)
        )

    def needs_distribution(self) -> bool:
        """True when a threshold reads the KL divergence block (which --no-kld leaves out)."""
        return self.max_kld is not None or self.min_top1_pct is not None


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
            "Give a finite number: a percentage of 0 or more for --max-ppl-increase, 0 to 100 for --min-top1, "
            "0 or more for --max-kld, a positive number for --max-ppl and --min-decode-speedup.",
        ) from None


class GateCheck(BaseModel):
    name: str
    value: float | None
    threshold: float
    passed: bool
    message: str
    # How far inside the threshold the value is, in the value's unit: positive passes, negative fails by that
    # much (None: not measured). Records from before it was kept read as None.
    margin: float | None = None


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
                margin=None if delta is None else spec.max_ppl_increase_pct - delta,
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
                margin=None if ppl is None else spec.max_ppl - ppl,
                message=f"perplexity {ppl:.3f} (limit {spec.max_ppl:g})" if ppl is not None else "no perplexity",
            )
        )
    dist = _distribution(report)
    if spec.max_kld is not None:
        kld = dist.get("kld_mean")
        ok = kld is not None and kld <= spec.max_kld
        checks.append(
            GateCheck(
                name="max_kld",
                value=kld,
                threshold=spec.max_kld,
                passed=ok,
                margin=None if kld is None else spec.max_kld - kld,
                message=(
                    f"mean KL divergence {kld:.5f} nats vs FP16 (limit {spec.max_kld:g})"
                    + ("" if ok else f": over by {kld - spec.max_kld:.5f}")
                    if kld is not None
                    else "KL divergence was not measured (evaluate without --no-kld)"
                ),
            )
        )
    if spec.min_top1_pct is not None:
        top1 = dist.get("top1_agreement")
        pct = None if top1 is None else 100.0 * top1
        ok = pct is not None and pct >= spec.min_top1_pct
        checks.append(
            GateCheck(
                name="min_top1_pct",
                value=pct,
                threshold=spec.min_top1_pct,
                passed=ok,
                margin=None if pct is None else pct - spec.min_top1_pct,
                message=(
                    f"top-1 agreement with FP16 {pct:.2f}% (needs {spec.min_top1_pct:g}%)"
                    + ("" if ok else f": short by {spec.min_top1_pct - pct:.2f} points")
                    if pct is not None
                    else "top-1 agreement was not measured (evaluate without --no-kld)"
                ),
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
                margin=None if speedup is None else speedup - spec.min_decode_speedup,
                message=(
                    f"decode speedup {speedup:.2f}x at batch {spec.at_batch} (needs {spec.min_decode_speedup:g}x)"
                    if speedup is not None
                    else f"decode speed at batch {spec.at_batch} was not measured (run with --throughput)"
                ),
            )
        )
    return GateResult(passed=all(c.passed for c in checks), checks=checks)


def _distribution(report: dict[str, Any]) -> dict[str, Any]:
    """The artifact's KL divergence block ({} when it was not measured)."""
    block = (report.get("artifact") or {}).get("distribution")
    return block if isinstance(block, dict) else {}


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
    both perplexities, their errors, the paired delta vs FP16 and, with the stored thresholds, the gate. With
    a KL divergence block, its per-window means give its mean KLD and top-1 agreement (and their errors).
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
    dist = (evaluation.get("artifact") or {}).get("distribution")
    if dist is not None:
        wrong += _distribution_problems(dist, tokens)
    speed = evaluation.get("throughput")
    if speed:
        wrong += _speed_problems(speed)
    if gate is not None:
        wrong += _gate_problems(evaluation, gate)
    return wrong


def _distribution_problems(dist: Any, tokens: list[int]) -> list[str]:
    """The KL divergence block's mean and top-1 agreement (and their errors) against its per-window values.

    The percentiles, the maximum and Δp need every token's value, which is not stored: they are trusted."""
    from llmopt.evaluate.perplexity import _stderr_of_mean

    if not isinstance(dist, dict):
        return ["artifact.distribution is not a KL divergence record"]
    wrong = []
    count = sum(tokens)
    for per_window, mean_key, low, high in (
        ("window_kld", "kld_mean", -1e-6, math.inf),  # a KL divergence is never negative (rounding aside)
        ("window_top1", "top1_agreement", 0.0, 1.0),
    ):
        values = dist.get(per_window)
        if not isinstance(values, list) or not all(
            isinstance(v, int | float) and not isinstance(v, bool) and math.isfinite(v) and low <= v <= high
            for v in values
        ):
            wrong.append(f"artifact.distribution.{per_window} is missing or holds impossible values")
            continue
        if len(values) != len(tokens):
            wrong.append(f"artifact.distribution.{per_window} has {len(values)} windows where the settings make "
                         f"{len(tokens)}")  # fmt: skip
            continue
        mean = math.fsum(v * n for v, n in zip(values, tokens, strict=True)) / count
        stderr = _stderr_of_mean([float(v) for v in values], tokens)
        for key, value in ((mean_key, mean), (f"{mean_key.removesuffix('_mean')}_stderr", stderr)):
            if not _same(dist.get(key), value):
                wrong.append(f"artifact.distribution.{key} is {dist.get(key)!r}, its window values give {value:.6g}")
    if not _same(dist.get("tokens"), float(count)):
        wrong.append(f"artifact.distribution.tokens is {dist.get('tokens')!r}, the window settings give {count}")
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
            or ("margin" in old and not _same(old.get("margin"), new.margin))
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
