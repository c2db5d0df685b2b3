"""Statistics of timed runs, shared by the throughput bench and the runners (one definition of each)."""

from __future__ import annotations

import math
import statistics


def summary(values: list[float]) -> dict[str, float]:
    """Median with spread: min, max and the quartiles (inclusive method), and the count."""
    vals = sorted(values)
    if not vals:
        return {"n": 0}
    q1, _, q3 = statistics.quantiles(vals, n=4, method="inclusive") if len(vals) > 1 else (vals[0],) * 3
    return {
        "median": statistics.median(vals),
        "min": vals[0],
        "max": vals[-1],
        "q1": q1,
        "q3": q3,
        "n": len(vals),
    }


def percentile(values: list[float], pct: float) -> float:
    """Linear-interpolated percentile (numpy's default) of a non-empty list."""
    vals = sorted(values)
    pos = (len(vals) - 1) * pct / 100.0
    lo, hi = math.floor(pos), math.ceil(pos)
    return vals[lo] + (vals[hi] - vals[lo]) * (pos - lo)


def cost_per_million_tokens(tokens_per_s: float | None, hourly_cost: float | None) -> float | None:
    """Device cost of generating one million tokens at ``tokens_per_s``."""
    if not tokens_per_s or not hourly_cost:
        return None
    return hourly_cost / 3600.0 / tokens_per_s * 1e6
