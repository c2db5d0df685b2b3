"""Evaluation numbers that add up: synthetic per-window scores and everything that follows from them.

llmopt refuses a stored evaluation whose perplexities, delta or gate do not follow from its per-window NLLs
(llmopt.evaluate.gate.evaluation_problems), so a stand-in evaluation must be built the way api.evaluate builds
one: scores first, the summary derived from them.
"""

from __future__ import annotations

import math
from typing import Any

from llmopt.evaluate.gate import _window_tokens
from llmopt.evaluate.perplexity import aggregate, paired_delta


def scored(
    delta_pct: float,
    *,
    context_length: int = 128,
    stride: int | None = None,
    windows: int = 4,
    base_nll: float = 3.4,
) -> dict[str, Any]:
    """``settings`` (the window part), ``baseline``, ``artifact``, ``delta_pct`` and ``delta_pct_stderr``
    for an artifact about ``delta_pct`` % worse than its baseline, with a little spread between windows."""
    settings = {
        "context_length": context_length,
        "stride": stride or context_length,
        "add_bos": False,
        "tokens_total": context_length * windows,
    }
    tokens = _window_tokens(settings)
    base = [base_nll + 0.1 * math.sin(i) for i in range(len(tokens))]
    shift = math.log1p(delta_pct / 100.0)
    wobble = [0.002 * math.cos(3 * i) for i in range(len(tokens))]
    mean_wobble = sum(w * n for w, n in zip(wobble, tokens, strict=True)) / sum(tokens)
    art = [b + shift + w - mean_wobble for b, w in zip(base, wobble, strict=True)]

    def block(nll: list[float]) -> dict[str, Any]:
        total = math.fsum(v * n for v, n in zip(nll, tokens, strict=True))
        return aggregate(nll, tokens, total, sum(tokens)).to_dict()

    delta, delta_se = paired_delta(art, base, tokens)
    settings.update({"tokens_scored": sum(tokens), "windows": len(tokens)})
    return {
        "settings": settings,
        "baseline": block(base),
        "artifact": block(art),
        "delta_pct": delta,
        "delta_pct_stderr": delta_se,
    }


def distribution(kld_mean: float, settings: dict[str, Any], *, top1: float = 0.93) -> dict[str, Any]:
    """An ``artifact.distribution`` block (KL divergence and top-1 agreement vs FP16) whose means and errors
    follow from its per-window values, for the windows of ``settings`` (``scored(...)["settings"]``)."""
    from llmopt.evaluate.perplexity import _stderr_of_mean

    tokens = _window_tokens(settings)
    kl = [kld_mean * (1 + 0.1 * math.sin(i)) for i in range(len(tokens))]
    agree = [top1 - 0.01 * math.cos(i) for i in range(len(tokens))]
    count = sum(tokens)

    def mean(values: list[float]) -> float:
        return math.fsum(v * n for v, n in zip(values, tokens, strict=True)) / count

    k = mean(kl)
    return {
        "tokens": count,
        "top_k": 32,
        "kld_mean": k,
        "kld_stderr": _stderr_of_mean(kl, tokens),
        "kld_median": k * 0.8,
        "kld_p90": k * 2,
        "kld_p99": k * 5,
        "kld_p999": k * 9,
        "kld_max": k * 20,
        "top1_agreement": mean(agree),
        "top1_agreement_stderr": _stderr_of_mean(agree, tokens),
        "delta_p_mean": -0.001,
        "delta_p_rms": 0.01,
        "window_kld": kl,
        "window_top1": agree,
    }
