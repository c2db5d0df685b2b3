"""Gate: thresholds from the recipe or CLI, applied to an evaluation report."""

from __future__ import annotations

from typing import Any

from pydantic import BaseModel, ConfigDict, Field


class GateSpec(BaseModel):
    """Thresholds; a threshold left unset is not checked."""

    model_config = ConfigDict(extra="forbid")
    max_ppl_increase_pct: float | None = Field(None, description="Largest allowed perplexity increase over FP16, %.")
    max_ppl: float | None = Field(None, gt=0, description="Largest allowed absolute perplexity.")
    min_decode_speedup: float | None = Field(None, gt=0, description="Smallest decode speedup over FP16.")
    at_batch: int = Field(1, ge=1, description="Batch size at which the decode speedup is read.")

    def is_empty(self) -> bool:
        return self.max_ppl_increase_pct is None and self.max_ppl is None and self.min_decode_speedup is None


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
