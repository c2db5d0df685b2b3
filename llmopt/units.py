"""Sizes for people: the one byte format of reports and model cards (the CLI's tables keep their own,
``cli/_common.human_bytes``, whose output differs)."""

from __future__ import annotations


def fmt_bytes(n: float | None) -> str:
    """``1.23 GB`` / ``45.6 MB`` / ``7.8 KB`` (decimal units); a dash for unknown."""
    if n is None:
        return "–"
    if n >= 1e9:
        return f"{n / 1e9:.2f} GB"
    return f"{n / 1e6:.1f} MB" if n >= 1e6 else f"{n / 1e3:.1f} KB"
