"""Latency percentiles and throughput against request rate, one line per model (matplotlib, written to files).

Used by ``serve-bench --out`` (one line per served model) and by ``llmopt run`` with ``evaluation.serving`` (one
per variant, and the FP16 baseline)."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from llmopt.serving.metrics import PointResult

Series = tuple[str, Sequence[PointResult]]  # a model's label and its load points


def _save_to(folder: Path) -> Callable[[Any, str], Path]:
    def save(fig: Any, name: str) -> Path:
        folder.mkdir(parents=True, exist_ok=True)
        path = folder / name
        fig.tight_layout()
        fig.savefig(path, dpi=110)
        return path

    return save


def write_plots(series: Sequence[Series], folder: Path, *, save: Callable[[Any, str], Any] | None = None) -> list[Any]:
    """``serve-latency.png`` (TTFT and time per output token p50/p95 vs rate) and ``serve-throughput.png`` (output
    tokens/s vs rate). Only for rate sweeps of two rates or more; saturated points have no latency to draw. Points
    at capacity (offered more, delivered no more) are ringed on the throughput plot and dotted on the latency one.
    ``save(fig, name)`` writes a figure and returns what the list holds (default: a PNG in ``folder``)."""
    models = [(label, pts) for label, pts in series if len([p for p in pts if p.mode == "rate"]) >= 2]
    if not models:
        return []
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    save = save or _save_to(folder)
    written = []
    fig, axes = plt.subplots(1, 2, figsize=(11, 4))
    for ax, metric, title in ((axes[0], "ttft_ms", "TTFT"), (axes[1], "tpot_ms", "time per output token")):
        for label, points in models:
            pts = sorted((p for p in points if p.mode == "rate"), key=lambda p: p.value)
            for pct, style in (("p50", "-o"), ("p95", "--s")):
                xs = [p.value for p in pts if getattr(p, metric) is not None]
                ys = [getattr(getattr(p, metric), pct) for p in pts if getattr(p, metric) is not None]
                if xs:
                    ax.plot(xs, ys, style, label=f"{label} {pct}")
            for p in pts:
                if p.saturated:
                    ax.axvline(p.value, color="grey", alpha=0.3)
                elif p.at_capacity:
                    ax.axvline(p.value, color="grey", alpha=0.5, linestyle=":")
        ax.set_xlabel("request rate (req/s)")
        ax.set_ylabel("ms")
        ax.set_title(f"{title} (grey: saturated, dotted: at capacity)")
        if ax.get_legend_handles_labels()[0]:  # every point saturated: nothing drawn, no legend
            ax.legend(fontsize=7)
    written.append(save(fig, "serve-latency.png"))
    plt.close(fig)
    fig, ax = plt.subplots(figsize=(6, 4))
    for label, points in models:
        pts = sorted((p for p in points if p.mode == "rate"), key=lambda p: p.value)
        xs = [p.value for p in pts if p.output_tokens_per_s is not None]
        (line,) = ax.plot(
            xs, [p.output_tokens_per_s for p in pts if p.output_tokens_per_s is not None], "-o", label=label
        )
        full = [(p.value, t) for p in pts if p.at_capacity and (t := p.output_tokens_per_s) is not None]
        if full:
            ax.plot(
                [x for x, _ in full], [y for _, y in full], "o", markersize=12, markerfacecolor="none",
                color=line.get_color(), label=f"{label} at capacity",
            )  # fmt: skip
    ax.set_xlabel("request rate (req/s)")
    ax.set_ylabel("output tokens/s")
    ax.set_title("throughput (ringed: at capacity)")
    if ax.get_legend_handles_labels()[0]:
        ax.legend(fontsize=7)
    written.append(save(fig, "serve-throughput.png"))
    plt.close(fig)
    return written
