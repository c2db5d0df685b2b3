"""Latency percentiles and throughput against request rate, one line per model (matplotlib, written to files)."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from llmopt.serving.bench import ServeBenchResult


def write_plots(result: ServeBenchResult, folder: Path) -> list[Path]:
    """``serve-latency.png`` (TTFT and E2E p50/p95 vs rate) and ``serve-throughput.png`` (output tokens/s and
    goodput vs rate). Only for rate sweeps of two rates or more; saturated points have no latency to draw."""
    models = [m for m in result.models if len([p for p in m.points if p.mode == "rate"]) >= 2]
    if not models:
        return []
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    folder.mkdir(parents=True, exist_ok=True)
    written = []
    fig, axes = plt.subplots(1, 2, figsize=(11, 4))
    for ax, metric, title in ((axes[0], "ttft_ms", "TTFT"), (axes[1], "tpot_ms", "time per output token")):
        for m in models:
            pts = sorted((p for p in m.points if p.mode == "rate"), key=lambda p: p.value)
            for pct, style in (("p50", "-o"), ("p95", "--s")):
                xs = [p.value for p in pts if getattr(p, metric) is not None]
                ys = [getattr(getattr(p, metric), pct) for p in pts if getattr(p, metric) is not None]
                if xs:
                    ax.plot(xs, ys, style, label=f"{m.label} {pct}")
            for p in pts:
                if p.saturated:
                    ax.axvline(p.value, color="grey", alpha=0.3)
        ax.set_xlabel("request rate (req/s)")
        ax.set_ylabel("ms")
        ax.set_title(f"{title} (grey: saturated)")
        if ax.get_legend_handles_labels()[0]:  # every point saturated: nothing drawn, no legend
            ax.legend(fontsize=7)
    fig.tight_layout()
    path = folder / "serve-latency.png"
    fig.savefig(path, dpi=110)
    plt.close(fig)
    written.append(path)
    fig, ax = plt.subplots(figsize=(6, 4))
    for m in models:
        pts = sorted((p for p in m.points if p.mode == "rate"), key=lambda p: p.value)
        xs = [p.value for p in pts if p.output_tokens_per_s is not None]
        ax.plot(xs, [p.output_tokens_per_s for p in pts if p.output_tokens_per_s is not None], "-o", label=m.label)
    ax.set_xlabel("request rate (req/s)")
    ax.set_ylabel("output tokens/s")
    ax.set_title("throughput")
    if ax.get_legend_handles_labels()[0]:
        ax.legend(fontsize=7)
    fig.tight_layout()
    path = folder / "serve-throughput.png"
    fig.savefig(path, dpi=110)
    plt.close(fig)
    written.append(path)
    return written
