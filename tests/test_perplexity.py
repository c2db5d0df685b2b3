"""Windowing and aggregation of the perplexity protocol (no model: NLLs come from a fixed table)."""

from __future__ import annotations

import math

import pytest

from llmopt.errors import DataError
from llmopt.evaluate.perplexity import aggregate, make_windows, paired_delta, score


def _scored_positions(windows, begin_offsets):
    out = []
    for w, begin in zip(windows, begin_offsets, strict=True):
        out.extend(range(begin + w.score_from, begin + len(w.ids)))
    return out


def test_non_overlapping_windows_score_every_token_but_the_first() -> None:
    ids = list(range(1000, 1010))  # 10 tokens
    windows = make_windows(ids, context_length=4, stride=4)
    # windows: [0:4] scores 1..3, [4:8] scores 5..7 (4 has no context inside its window), last [6:10] scores 8..9
    assert [w.ids for w in windows] == [ids[0:4], ids[4:8], ids[6:10]]
    assert [w.score_from for w in windows] == [1, 1, 2]
    assert sum(len(w.ids) - w.score_from for w in windows) == 3 + 3 + 2


def test_strided_windows_score_each_token_once() -> None:
    ids = list(range(50))
    windows = make_windows(ids, context_length=16, stride=8)
    begins = []
    b = 0
    for w in windows:
        begins.append(ids.index(w.ids[0]))
        b += 8
    scored = _scored_positions(windows, begins)
    assert scored == list(range(1, 50))  # every token after the first, exactly once, in order


def test_bos_windows_score_the_first_token_of_each_window() -> None:
    ids = list(range(10, 30))
    windows = make_windows(ids, context_length=6, stride=5, bos_id=1)
    assert all(w.ids[0] == 1 and len(w.ids) == 6 for w in windows)
    assert windows[0].score_from == 1  # the text's first token is scored, given only BOS
    total = sum(len(w.ids) - w.score_from for w in windows)
    assert total == len(ids)


def test_text_shorter_than_a_window_is_refused() -> None:
    with pytest.raises(DataError, match="fewer than one window"):
        make_windows(list(range(10)), context_length=64, stride=64)


def test_bad_stride_is_refused() -> None:
    with pytest.raises(DataError, match="stride"):
        make_windows(list(range(100)), context_length=16, stride=32)


def test_score_matches_hand_computation() -> None:
    ids = list(range(40))
    windows = make_windows(ids, context_length=10, stride=10)

    def nll(batch: list[list[int]], starts: list[int]) -> list[list[float]]:
        # NLL of token t is a fixed function of its id: the aggregate must be its plain mean.
        return [[0.01 * tok for tok in w[max(s, 1) :]] for w, s in zip(batch, starts, strict=True)]

    result = score(windows, nll, batch_size=2)
    scored = [t for w in windows for t in w.ids[w.score_from :]]
    expected_mean = sum(0.01 * t for t in scored) / len(scored)
    assert result.tokens_scored == len(scored)
    assert result.perplexity == pytest.approx(math.exp(expected_mean))
    assert result.stderr > 0


def test_stderr_of_identical_windows_is_zero_and_single_window_is_nan() -> None:
    r = aggregate([2.0, 2.0, 2.0], [10, 10, 10], 60.0, 30)
    assert r.stderr == pytest.approx(0.0)
    assert r.perplexity == pytest.approx(math.exp(2.0))
    assert math.isnan(aggregate([2.0], [10], 20.0, 10).stderr)


def test_paired_delta_cancels_shared_window_difficulty() -> None:
    base = [1.0, 3.0, 2.0, 4.0]
    art = [b + 0.1 for b in base]  # the same shift on every window
    delta, se = paired_delta(art, base, [5, 5, 5, 5])
    assert delta == pytest.approx(100 * (math.exp(0.1) - 1))
    assert se == pytest.approx(0.0, abs=1e-9)
