"""Perplexity on fixed token ids, with a standard error.

Protocol (the same for every artifact, or comparisons are meaningless):
the text is tokenized once, with the baseline's tokenizer, without special tokens. Windows of
``context_length`` tokens start every ``stride`` tokens. In each window, the tokens not already
scored by an earlier window are scored, each given everything before it in the window; the very
first token of the text has no context and is never scored. With ``add_bos`` the BOS id is put in
front of every window (taking one position of the context) so that a window's first token is scored
too. Perplexity = exp(mean NLL over all scored tokens). Its standard error comes from the spread of
per-window mean NLLs (tokens inside a window are correlated; windows much less so), propagated
through exp (delta method).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

from llmopt.errors import DataError
from llmopt.specs import check_settings  # re-exported: the window checks live with the settings


@dataclass(frozen=True)
class Window:
    ids: list[int]
    score_from: int  # index inside ids of the first scored token


@dataclass
class PerplexityResult:
    perplexity: float
    stderr: float
    mean_nll: float
    tokens_scored: int
    windows: int
    window_nll: list[float] = field(default_factory=list)  # per-window mean NLL
    window_tokens: list[int] = field(default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        return {
            "perplexity": self.perplexity,
            "stderr": self.stderr,
            "mean_nll": self.mean_nll,
            "tokens_scored": self.tokens_scored,
            "windows": self.windows,
            "window_nll": self.window_nll,
        }


def make_windows(
    ids: Sequence[int], context_length: int, stride: int, *, bos_id: int | None = None
) -> list[Window]:
    """Cut ``ids`` into scoring windows (see the module docstring)."""
    check_settings(context_length, stride, add_bos=bos_id is not None)
    body = context_length - (1 if bos_id is not None else 0)
    if len(ids) < body:
        raise DataError(
            f"the evaluation text has {len(ids)} tokens, fewer than one window of {context_length}.",
            "Give more text, or lower --context.",
        )
    step = min(stride, body)
    windows: list[Window] = []
    scored_until = 0 if bos_id is not None else 1  # first position not yet scored
    begin = 0
    while True:
        end = min(begin + body, len(ids))
        if end - begin < body:  # last short window: shift back so every window has equal length
            begin = max(0, end - body)
        chunk = list(ids[begin:end])
        first = max(scored_until - begin, 0 if bos_id is not None else 1)
        if bos_id is not None:
            chunk = [bos_id, *chunk]
            first += 1
        if first < len(chunk):
            windows.append(Window(chunk, first))
        scored_until = end
        if end >= len(ids):
            break
        begin += step
    return windows


def require_error_bar(
    windows: Sequence[Window], tokens: int, context_length: int, stride: int, *, add_bos: bool = False
) -> None:
    """Refuse, before any scoring, a text that makes fewer than two windows: a perplexity's standard error comes
    from the spread of the per-window scores, and one window has none (it would be stored as NaN)."""
    if len(windows) >= 2:
        return
    body = context_length - (1 if add_bos else 0)
    # with exactly one window's worth of tokens a smaller stride cuts no second window: only --context helps
    shorter = (
        "lower --context or --stride (recipe: evaluation.context_length, evaluation.stride)"
        if tokens > body
        else "lower --context (recipe: evaluation.context_length)"
    )
    raise DataError(
        f"the evaluation text makes only one scoring window ({tokens} tokens, --context {context_length}, "
        f"--stride {stride}): the perplexity's error bar needs two or more windows.",
        f"Give longer text (or a larger --max-tokens), or {shorter}, so that the text makes two or more windows.",
    )


def score(
    windows: list[Window],
    nll_fn: Callable[[list[list[int]], list[int]], list[list[float]]],
    *,
    batch_size: int = 1,
    on_batch: Callable[[int], None] | None = None,
) -> PerplexityResult:
    """Run ``nll_fn`` over the windows in batches and aggregate."""
    check_settings(2, batch_size=batch_size)
    window_nll: list[float] = []
    window_tokens: list[int] = []
    total = 0.0
    count = 0
    for i in range(0, len(windows), batch_size):
        batch = windows[i : i + batch_size]
        rows = nll_fn([w.ids for w in batch], [w.score_from for w in batch])
        for w, row in zip(batch, rows, strict=True):
            expected = len(w.ids) - w.score_from
            if len(row) != expected:
                raise RuntimeError(f"runner returned {len(row)} NLLs for a window that scores {expected}")
            s = math.fsum(row)
            total += s
            count += len(row)
            window_nll.append(s / len(row))
            window_tokens.append(len(row))
        if on_batch:
            on_batch(len(batch))
    return aggregate(window_nll, window_tokens, total, count)


def _stderr_of_mean(values: list[float], tokens: list[int]) -> float:
    """Standard error of the token-weighted mean of per-window values (nan with one window)."""
    k = len(values)
    if k < 2:
        return float("nan")
    count = sum(tokens)
    mean = sum(v * n for v, n in zip(values, tokens, strict=True)) / count
    var = sum((n / count) ** 2 * (v - mean) ** 2 for v, n in zip(values, tokens, strict=True)) * k / (k - 1)
    return math.sqrt(var)


def paired_delta(
    artifact_window_nll: list[float], baseline_window_nll: list[float], window_tokens: list[int]
) -> tuple[float, float]:
    """Perplexity change in % and its standard error, from per-window NLL differences.

    Both models score the same windows, so the window-to-window spread of the text cancels out:
    this error bar is much tighter than combining the two perplexities' own errors.
    """
    diffs = [a - b for a, b in zip(artifact_window_nll, baseline_window_nll, strict=True)]
    count = sum(window_tokens)
    mean_diff = sum(d * n for d, n in zip(diffs, window_tokens, strict=True)) / count
    factor = math.exp(mean_diff)
    return 100.0 * (factor - 1.0), 100.0 * factor * _stderr_of_mean(diffs, window_tokens)


def aggregate(window_nll: list[float], window_tokens: list[int], total: float, count: int) -> PerplexityResult:
    mean = total / count
    # Tokens inside a window are correlated; window means much less so: the error comes from them.
    se_nll = _stderr_of_mean(window_nll, window_tokens)
    ppl = math.exp(mean)
    return PerplexityResult(
        perplexity=ppl,
        stderr=ppl * se_nll,
        mean_nll=mean,
        tokens_scored=count,
        windows=len(window_nll),
        window_nll=window_nll,
        window_tokens=window_tokens,
    )
