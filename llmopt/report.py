"""Run reports: ``report.json`` (schema ``llmopt.run/1``), ``report.md`` and PNG plots.

One report covers the variants of one ``llmopt run``, or of several runs merged with ``llmopt report
merge`` (one CI job per variant). Plots need matplotlib (``pip install 'llmopt[report]'``); without it
they are skipped and the report says so.

``report.json``::

    schema, llmopt_version, created_at, seconds, output,
    recipe: {name, file, resolved} (merged: {names: [...]}),
    settings: the evaluation settings (dataset, tokens, context, stride, dtype, device),
    baseline: the FP16 baseline's result (perplexity, stderr, size_bytes, ...),
    state: complete | running (the run is still going, or was killed outright) | interrupted | incomplete
    (a merged report in which some variant did not run in any of the merged runs),
    variants: [{name, method, format, status: passed | gate_failed | error | not_run, artifact,
                quantize: {reused, seconds, reason}, evaluation_reused,
                perplexity, stderr, delta_pct, delta_pct_stderr, size_bytes, size_ratio,
                decode_speedup, gate, publish, error: {stage, type, message, hint, exit_code},
                evaluation: the full llmopt.eval/2 report (/1 when reused from before; its ``serving``: the
                variant served under load)}],
    baseline_serving: the FP16 model served under load, once per run (evaluation.serving),
    counts: {passed, gate_failed, error, not_run}, exit_code (null while running, 130 interrupted),
    files: {json, markdown, plots}, notes, sources
"""

from __future__ import annotations

import json
import math
import os
from collections.abc import Mapping
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from pydantic import ValidationError

from llmopt import __version__
from llmopt.atomic import write_atomic, write_json_atomic, write_text_atomic
from llmopt.errors import EXIT_BUG, EXIT_GATE, EXIT_OK, InputError
from llmopt.results import RUN_SCHEMA, Distribution, RunReport, ServingReport, VariantOutcome
from llmopt.serving.metrics import capacity_text, with_slo
from llmopt.specs import GateSpec
from llmopt.units import fmt_bytes

PLOTS_DIR = "plots"
_COMPARABLE = ("tokens_sha256", "context_length", "stride", "add_bos")


def _now() -> str:
    return datetime.now(UTC).isoformat(timespec="seconds")


def run_exit_code(variants: list[VariantOutcome]) -> int:
    """0 all passed; else the first error's code in recipe order; else 3 (a gate failed)."""
    for v in variants:
        if v.status == "error":
            return int((v.error.exit_code if v.error else None) or EXIT_BUG)
    if any(v.status != "passed" for v in variants):
        return EXIT_GATE
    return EXIT_OK


def build_run_report(
    *,
    recipe: dict[str, Any],
    variants: list[VariantOutcome] | list[Mapping[str, Any]],
    output: Path,
    seconds: float | None = None,
    sources: list[str] | None = None,
    notes: list[str] | None = None,
) -> RunReport:
    rows = [
        (v if isinstance(v, VariantOutcome) else VariantOutcome.model_validate(v)).summarized() for v in variants
    ]
    first = next((r.evaluation for r in rows if r.evaluation), None)
    counts = {s: sum(1 for r in rows if r.status == s) for s in ("passed", "gate_failed", "error", "not_run")}
    return RunReport(
        llmopt_version=__version__,
        created_at=_now(),
        seconds=round(seconds, 1) if seconds is not None else None,
        output=str(output),
        recipe=recipe,
        settings=first.settings if first else None,
        # FP16's row: a variant that ran the tasks carries FP16's task scores too (a GGUF first variant does not)
        baseline=next((r.evaluation.baseline for r in rows if r.evaluation and r.evaluation.baseline.tasks), None)
        or (first.baseline if first else None),
        environment=first.environment if first else None,
        state="complete",
        variants=rows,
        counts=counts,
        exit_code=run_exit_code(rows),
        files={},
        notes=list(notes or []),
        sources=sources or None,
    )


# --- writing ---------------------------------------------------------------------------------------


def write_report(report: RunReport, out: Path, *, plots: bool = True) -> RunReport:
    """Write plots, report.md and report.json (last) into ``out``; each file appears whole or not at all.

    ``plots=False`` (the reports written while a run goes on) leaves the plots to the final report.
    """
    out.mkdir(parents=True, exist_ok=True)
    plot_files: list[str] = []
    if plots:
        try:
            plot_files, plot_notes = write_plots(report, out)
        except OSError as exc:  # the plots are a view of the report: never lose the report to them
            # the file in the way: an atomic write's rename names it second (the first is its temp file)
            where = exc.filename2 or exc.filename or out / PLOTS_DIR
            plot_files, plot_notes = [], [f"plots not written: {exc.strerror or exc} ({where})"]
        report.notes.extend(n for n in plot_notes if n not in report.notes)
    report.files = {"json": "report.json", "markdown": "report.md", "plots": plot_files}
    write_text_atomic(out / "report.md", render_markdown(report))
    write_json_atomic(out / "report.json", report.to_json())
    return report


def _num(x: float | None, fmt: str) -> str:
    return "–" if x is None else format(x, fmt)


def display_dataset(spec: str | None) -> str:
    """A dataset as shown to people: a file's name, not the full local path."""
    if not spec:
        return "?"
    return Path(spec).name if ("/" in spec or os.sep in spec) else spec


def gate_text(row: VariantOutcome) -> str:
    if row.status == "not_run":
        return "not run"
    if row.status == "error":
        return f"error ({row.error.stage if row.error else '?'})"
    if row.gate is None or not row.gate.checks:
        return "no thresholds"
    return "pass" if row.gate.passed else "FAIL"


def delta_text(row: VariantOutcome) -> str:
    d = row.delta_pct
    if d is None:
        return "–"
    se = row.delta_pct_stderr
    return f"{d:+.2f}%" + (f" ± {se:.2f}" if se is not None else "")


def quantize_text(row: VariantOutcome) -> str:
    q = row.quantize
    if q is None or q.seconds is None:
        return "–"
    return f"{q.seconds:.1f} s" + (" (reused)" if q.reused else "")


def _distribution(r: VariantOutcome) -> Distribution | None:
    ev = r.evaluation
    return ev.artifact.distribution if ev is not None and ev.artifact is not None else None


def has_distribution(report: RunReport) -> bool:
    """Whether any variant carries KL-divergence numbers (then the table shows their columns)."""
    return any(_distribution(r) is not None for r in report.variants)


def task_columns(report: RunReport) -> list[tuple[str, str]]:
    """(task, metric) of each task the table shows: the metric its recovery gate reads, in first-seen order."""
    seen: list[tuple[str, str]] = []
    for r in report.variants:
        for c in (r.evaluation.task_recovery or []) if r.evaluation else []:
            if c.primary and (c.task, c.metric) not in seen:
                seen.append((c.task, c.metric))
    return seen


def _task_cell(r: VariantOutcome, task: str, metric: str) -> str:
    """A variant's accuracy on a task and its recovery against FP16; why it was not run; or a dash."""
    ev = r.evaluation
    if ev is None:
        return "–"
    c = next((c for c in ev.task_recovery or [] if c.task == task and c.metric == metric), None)
    if c is None:
        not_run = ev.artifact.tasks.not_run if ev.artifact.tasks else None
        return not_run.split(":")[0] if not_run else "–"
    rec = (
        "–"
        if c.recovery is None
        else f"{c.recovery:.3f}" + (f" ± {c.recovery_stderr:.3f}" if c.recovery_stderr is not None else "")
    )
    return f"{c.artifact:.3f} (recovery {rec})"


def _baseline_task_cell(report: RunReport, task: str, metric: str) -> str:
    tasks = report.baseline.tasks if report.baseline else None
    score = next((s for s in tasks.scores if s.task == task and s.metric == metric), None) if tasks else None
    if score is None:
        return "–"
    return f"{score.value:.3f}" + (f" ± {score.stderr:.3f}" if score.stderr is not None else "")
def _serving(r: VariantOutcome) -> ServingReport | None:
    return r.evaluation.serving if r.evaluation is not None else None


def has_serving(report: RunReport) -> bool:
    """Whether any variant was served under load (then the table shows a serving column)."""
    return report.baseline_serving is not None or any(_serving(r) is not None for r in report.variants)


SERVING_COLUMN = "serving (top rate)"


def serving_text(serving: ServingReport | None) -> str:
    """The table's compact serving cell: p95 TTFT and goodput at the highest rate swept, or where it saturated."""
    if serving is None:
        return "–"
    points = serving.rate_points() or serving.points
    if not points:
        return "failed" if serving.failed else "–"
    top = points[-1]
    if top.saturated:
        text = f"saturated at {top.label}"
    elif top.at_capacity and top.capacity_since is not None:
        text = f"at capacity from {top.capacity_since:g} req/s"
    elif top.ttft_ms is not None:
        text = f"TTFT p95 {top.ttft_ms.p95:,.0f} ms at {top.label}"
    else:
        text = f"no TTFT at {top.label}"
    if serving.failed:
        text += " (server failed)"
    return text


def table_header(report: RunReport) -> list[str]:
    head = TABLE_HEADER[:4]
    if has_distribution(report):
        head = [*head, "mean KLD", "top-1 agree"]
    head += [f"{task} {metric}" for task, metric in task_columns(report)]
    tail = TABLE_HEADER[4:]
    if has_serving(report):
        tail = [*tail[:-1], SERVING_COLUMN, tail[-1]]
    return [*head, *tail]


def table_rows(report: RunReport) -> list[list[str]]:
    """Rows of the summary table: FP16 baseline first, then each variant in order (columns: table_header)."""
    rows: list[list[str]] = []
    base = report.baseline
    kld = has_distribution(report)
    tasks = task_columns(report)
    serve = has_serving(report)
    if base:
        first = ["FP16 baseline", "–", f"{base.perplexity:.4f} ± {base.stderr:.4f}", "–"]
        first += ["0 (reference)", "100%"] if kld else []
        first += [_baseline_task_cell(report, t, m) for t, m in tasks]
        rows.append(
            [
                *first,
                fmt_bytes(base.size_bytes),
                "–",
                *([serving_text(report.baseline_serving)] if serve else []),
                "–",
            ]
        )
    for r in report.variants:
        ppl = r.perplexity
        cells = [r.name, r.method, "–" if ppl is None else f"{ppl:.4f} ± {_num(r.stderr, '.4f')}", delta_text(r)]
        if kld:
            d = _distribution(r)
            cells += (
                [f"{d.kld_mean:.4f} ± {d.kld_stderr:.4f}", f"{100 * d.top1_agreement:.2f}%"] if d else ["–", "–"]
            )
        cells += [_task_cell(r, t, m) for t, m in tasks]
        serving = [serving_text(_serving(r))] if serve else []
        rows.append([*cells, fmt_bytes(r.size_bytes), quantize_text(r), *serving, gate_text(r)])
    return rows


TABLE_HEADER = [
    "variant",
    "method",
    "perplexity ± stderr",
    "Δ vs FP16",
    "size on disk",
    "quantize time",
    "gate",
]


def render_markdown(report: RunReport) -> str:
    counts = report.counts
    recipe = report.recipe
    title = recipe.get("name") or ", ".join(recipe.get("names") or []) or "recipe"
    lines = [f"# llmopt run: {title}", ""]
    lines.append(
        f"{report.created_at or ''} · llmopt {report.llmopt_version or '?'} · "
        f"{len(report.variants)} variant(s): {counts.get('passed', 0)} passed, "
        f"{counts.get('gate_failed', 0)} failed the gate, {counts.get('error', 0)} errored"
        + (f", {counts['not_run']} not run" if counts.get("not_run") else "")
        + (f" · exit code {report.exit_code}" if report.exit_code is not None else " · no exit code yet")
    )
    state = report.state
    if state == "running":
        lines += ["", "**Run in progress** (or killed before it finished): variants marked `not run` have not run yet."]
    elif state == "interrupted":
        lines += ["", "**Run interrupted**: variants marked `not run` did not run; the same command finishes them."]
    elif state == "incomplete":
        lines += ["", "**Incomplete**: variants marked `not run` did not run in any of the merged runs."]
    s = report.settings
    if s:
        lines += [
            "",
            f"Perplexity on `{display_dataset(s.dataset)}`: "
            f"{s.tokens_scored or 0:,} tokens scored, "
            f"context {s.context_length}, stride {s.stride}, {s.dtype or '?'} on "
            f"{s.device or '?'}. Δ is the paired change of perplexity against the FP16 baseline on the "
            "same tokens.",
        ]
    if task_columns(report):
        tasks = report.baseline.tasks if report.baseline else None
        limit = f", the first {tasks.limit} examples of each task" if tasks and tasks.limit else ""
        lines += [
            "",
            f"Task columns: accuracy on lm-eval tasks ({tasks.harness if tasks else 'lm-eval'}{limit}), the same "
            "examples for every model; recovery = variant / FP16 with its paired standard error.",
        ]
    header = table_header(report)
    lines += ["", "| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(c.replace("|", "\\|") for c in row) + " |" for row in table_rows(report)]

    checks = [(r.name, c) for r in report.variants for c in (r.gate.checks if r.gate else [])]
    if checks:
        lines += ["", "## Gate checks", ""]
        lines += [f"- {name}: {'pass' if c.passed else '**FAIL**'} — {c.message}" for name, c in checks]
    speed = [(r.name, r.decode_speedup) for r in report.variants if r.decode_speedup]
    if speed:
        lines += ["", "## Decode speed vs FP16", ""]
        for name, sp in speed:
            parts = ", ".join(
                f"batch {b}: {float(v):.2f}x" for b, v in sorted(sp.items(), key=lambda kv: int(kv[0])) if v is not None
            )
            lines.append(f"- {name}: {parts}")
    lines += _serving_markdown(report)
    for r in report.variants:
        if r.error is None:
            continue
        if "## Errors" not in lines:
            lines += ["", "## Errors", ""]
        e = r.error
        hint = f" → {e.hint}" if e.hint else ""
        lines.append(f"- {r.name} ({e.stage}, exit {e.exit_code}): {e.message}{hint}")
    published = [(r.name, r.publish) for r in report.variants if r.publish]
    if published:
        lines += ["", "## Published", ""]
        for name, p in published:
            where = p.get("url") or p.get("repo_id")
            rev = f" (branch `{p['revision']}`)" if p.get("revision") else ""
            rev += f" as `{p['file']}`" if p.get("file") else ""  # gguf-one-repo: the variant's file there
            lines.append(f"- {name} → {where}{rev}, commit {str(p.get('commit_oid') or '')[:12]}")
    plots = report.files.get("plots") or []
    if plots:
        lines += ["", "## Plots", ""]
        lines += [f"![{Path(p).stem.replace('_', ' ')}]({p})" for p in plots]
    if report.notes:
        lines += ["", "## Notes", ""]
        lines += [f"- {n}" for n in report.notes]
    if report.sources:
        lines += ["", "Merged from: " + ", ".join(f"`{src}`" for src in report.sources)]
    return "\n".join(lines) + "\n"


def _ms(stats: Any, pct: str) -> str:
    return "–" if stats is None else f"{getattr(stats, pct):,.0f}"


def _serving_markdown(report: RunReport) -> list[str]:
    """Per served model, a row per load point: latency percentiles, throughput, goodput, saturation."""
    served = [("FP16 baseline", report.baseline_serving, _recipe_gate(report))] if report.baseline_serving else []
    served += [(r.name, s, r.gate.spec if r.gate else None) for r in report.variants if (s := _serving(r)) is not None]
    if not served:
        return []
    first = served[0][1]
    spec = first.spec
    kinds = ", ".join(sorted({str(s.server.get("kind")) for _, s, _ in served}))
    lines = [
        "",
        "## Serving under load",
        "",
        f"Each model behind its own server ({kinds}) "
        f"on {first.machine or '?'}, the same seeded trace: {spec.get('requests')} requests per rate, prompts of "
        f"{spec.get('prompt_len')} tokens, {spec.get('output_len')} output tokens. Latencies in ms; "
        "a saturated point (the server did not keep up) has no percentiles. Goodput and SLO: against each "
        "model's gate (`slo`, `min_goodput`), where it has one.",
        "",
        "| model | load | ok | TTFT p50 | TTFT p95 | ITL p95 | E2E p95 | output tok/s | goodput/s | SLO | note |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for name, s, gate in served:
        target = gate.serving_slo() if gate is not None else None
        for p in s.points:
            if target is not None and (target.at_rate is None or (p.mode == "rate" and p.value == target.at_rate)):
                p = with_slo(p, target)
            slo = "–" if p.slo_passed is None else ("pass" if p.slo_passed else "FAIL")
            note = "; ".join(
                t for t in ((p.saturation_note or "saturated") if p.saturated else "", capacity_text(p)) if t
            )
            lines.append(
                f"| {name} | {p.label} | {p.ok}/{p.requests} | {_ms(p.ttft_ms, 'p50')} | {_ms(p.ttft_ms, 'p95')} | "
                f"{_ms(p.itl_ms, 'p95')} | {_ms(p.e2e_ms, 'p95')} | {_num(p.output_tokens_per_s, ',.1f')} | "
                f"{_num(p.goodput_per_s, '.2f')} | {slo} | {note.replace('|', '/')} |"
            )
        if s.failed:
            lines.append(f"| {name} | – | – | – | – | – | – | – | – | – | server failed: {s.failed} |")
    cost = [
        (name, p)
        for name, s, _ in served
        for p in s.points
        if p.cost_per_million_tokens is not None and not p.saturated
    ]
    if cost:
        lines += ["", "Cost per million output tokens: " + "; ".join(
            f"{name} at {p.label} ${p.cost_per_million_tokens:.3f}" for name, p in cost
        )]  # fmt: skip
    return lines


def _recipe_gate(report: RunReport) -> GateSpec | None:
    """The recipe's default gate (what the FP16 model's serving is shown against)."""
    gates = (report.recipe.get("resolved") or {}).get("gates")
    try:
        return GateSpec.model_validate(gates) if isinstance(gates, dict) else None
    except ValidationError:
        return None


# --- plots -----------------------------------------------------------------------------------------


def write_plots(report: RunReport, out: Path) -> tuple[list[str], list[str]]:
    """PNG plots (paths relative to ``out``) and notes about what was skipped."""
    measured = [r for r in report.variants if r.perplexity is not None]
    if not measured:
        return [], ["plots skipped: no variant was evaluated"]
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return [], ["plots skipped: matplotlib is not installed (pip install 'llmopt[report]')"]

    plots: list[str] = []
    notes: list[str] = []
    (out / PLOTS_DIR).mkdir(exist_ok=True)

    fig, ax = plt.subplots(figsize=(7, 4.5), dpi=120)
    base = report.baseline
    if base and base.size_bytes:
        ax.errorbar(
            [base.size_bytes / 1e6], [base.perplexity], yerr=[base.stderr or 0],
            fmt="*", markersize=14, color="black", capsize=3, label="FP16 baseline",
        )  # fmt: skip
        ax.annotate("FP16", (base.size_bytes / 1e6, base.perplexity), textcoords="offset points", xytext=(6, 6))
    colors = {"passed": "tab:green", "gate_failed": "tab:red"}
    for r in measured:
        x, ppl = (r.size_bytes or 0) / 1e6, r.perplexity or 0.0
        ax.errorbar(
            [x], [ppl], yerr=[r.stderr or 0], fmt="o", capsize=3, color=colors.get(r.status, "tab:gray"),
        )  # fmt: skip
        ax.annotate(r.name, (x, ppl), textcoords="offset points", xytext=(6, -12), fontsize=8)
    ax.set_xlabel("size on disk (MB)")
    ax.set_ylabel("perplexity (lower is better)")
    dataset = report.settings.dataset if report.settings else None
    ax.set_title(f"Perplexity vs size · {display_dataset(dataset)} · green: gate passed, red: failed")
    ax.title.set_fontsize(9)
    ax.grid(alpha=0.3)
    plots.append(_save_fig(fig, out, "perplexity_vs_size.png"))
    plt.close(fig)

    dists = [(r, d) for r in measured if (d := _distribution(r)) is not None]
    if dists:
        try:
            fig = _kld_figure(plt, dists, display_dataset(dataset))
        except (ValueError, OverflowError, ArithmeticError) as exc:  # hand-edited numbers: the report still counts
            notes.append(f"no KLD plot: the recorded KL divergences cannot be drawn ({exc})")
        else:
            plots.append(_save_fig(fig, out, KLD_PLOT))
            plt.close(fig)
    else:
        notes.append("no KLD plot: no variant has KL-divergence measurements")

    speed = [(r.name, r.decode_speedup) for r in measured if r.decode_speedup]
    if speed:
        batches = sorted({int(b) for _, sp in speed for b in sp})
        fig, ax = plt.subplots(figsize=(7, 4.5), dpi=120)
        width = 0.8 / max(len(batches), 1)
        for j, b in enumerate(batches):
            xs = [i + j * width for i in range(len(speed))]
            ys = [float(sp.get(str(b)) or 0) for _, sp in speed]
            ax.bar(xs, ys, width=width, label=f"batch {b}")
        ax.axhline(1.0, color="black", linewidth=1, linestyle="--")
        ax.set_xticks([i + width * (len(batches) - 1) / 2 for i in range(len(speed))])
        ax.set_xticklabels([name for name, _ in speed], rotation=20, ha="right", fontsize=8)
        ax.set_ylabel("decode speedup vs FP16 (x)")
        ax.set_title("Decode speedup vs FP16 (dashed: FP16)")
        ax.legend(fontsize=8)
        ax.grid(axis="y", alpha=0.3)
        plots.append(_save_fig(fig, out, "decode_speedup.png"))
        plt.close(fig)
    else:
        notes.append("no decode-speed plot: no variant has throughput measurements")
    series = [("FP16", report.baseline_serving.points)] if report.baseline_serving else []
    series += [(r.name, s.points) for r in report.variants if (s := _serving(r)) is not None]
    if series:
        from llmopt.serving.plots import write_plots as serving_plots

        drawn = serving_plots(series, out / PLOTS_DIR, save=lambda fig, name: _save_fig(fig, out, name))
        plots += drawn
        if not drawn:
            notes.append("no serving plots: they need a sweep of two request rates or more")
    return plots, notes


KLD_PLOT = "kld_distribution.png"
# the per-token statistics a Distribution keeps (per-token values are not stored), drawn left to right
_KLD_MARKS = (
    ("kld_median", "median", "o"),
    ("kld_p90", "p90", "s"),
    ("kld_p99", "p99", "D"),
    ("kld_p999", "p99.9", "^"),
    ("kld_max", "max", "x"),
)


def _kld_figure(plt: Any, dists: list[tuple[VariantOutcome, Distribution]], dataset: str) -> Any:
    """One row per variant: its per-token KL divergence against FP16 from the stored statistics (median, p90,
    p99, p99.9, max, joined by a line) and the mean ± stderr, on a log axis (a linear one when every value is 0).
    A variant whose values are all 0 (the same distributions as FP16) is said so in words: a log axis has no 0."""
    from matplotlib.lines import Line2D
    from matplotlib.ticker import NullFormatter
    from matplotlib.transforms import blended_transform_factory

    def drawable(v: float) -> bool:  # a log axis reaches 1e-12 at most; inf, nan and subnormals are not drawn
        return math.isfinite(v) and (v == 0 or 1e-12 <= abs(v) <= 1e12)

    fig, ax = plt.subplots(figsize=(7, max(2.6, 1.4 + 0.55 * len(dists))), dpi=120)
    positive = [
        v for _, d in dists for v in (d.kld_mean, *(getattr(d, k) for k, _, _ in _KLD_MARKS)) if v > 0 and drawable(v)
    ]
    log = bool(positive)
    colors = {"passed": "tab:green", "gate_failed": "tab:red"}
    text_at = blended_transform_factory(ax.transAxes, ax.transData)
    for y, (r, d) in enumerate(dists):
        color = colors.get(r.status, "tab:gray")
        marks = [(max(getattr(d, key), 0.0), label, marker) for key, label, marker in _KLD_MARKS]
        shown = [(v, label, marker) for v, label, marker in marks if drawable(v) and (v > 0 or not log)]
        if not shown:
            ax.text(0.02, y, "0 at every token (the same as FP16)", transform=text_at, va="center", fontsize=8)
            continue
        ax.plot([v for v, _, _ in shown], [y] * len(shown), color=color, linewidth=1.5, zorder=1)
        for v, _, marker in shown:
            ax.scatter([v], [y], marker=marker, s=36, color=color, zorder=2)
        stderr = d.kld_stderr if math.isfinite(d.kld_stderr) and d.kld_stderr > 0 else 0.0
        if drawable(d.kld_mean) and d.kld_mean >= 0 and (d.kld_mean > 0 or not log):
            # on a log axis the error bar stops short of 0
            low = min(stderr, 0.99 * d.kld_mean) if log else stderr
            ax.errorbar(
                [d.kld_mean], [y], xerr=[[max(low, 0.0)], [stderr]], fmt="*", markersize=11, color="black",
                capsize=3, zorder=3,
            )  # fmt: skip
    if log:
        ax.set_xscale("log")
        # whole decades: a labelled tick at each, none between (minor labels of a short span overlap)
        low, high = math.floor(math.log10(min(positive))), math.ceil(math.log10(max(positive)))
        ax.set_xlim(10.0**low / 1.25, 10.0 ** max(high, low + 1) * 1.25)
        ax.xaxis.set_minor_formatter(NullFormatter())
    ax.set_yticks(range(len(dists)))
    ax.set_yticklabels([r.name if len(r.name) <= 32 else r.name[:31] + "…" for r, _ in dists], fontsize=8)
    ax.set_ylim(len(dists) - 0.5, -0.5)  # the first variant on top, as in the table
    top_k = sorted({d.top_k for _, d in dists})
    ax.set_xlabel(
        "KL(FP16 ‖ variant) per token, nats" + (" (log scale)" if log else "")
        + f"; FP16's top {'/'.join(map(str, top_k))} tokens + the rest"
    )  # fmt: skip
    ax.set_title(f"KL divergence vs FP16 per token · {dataset} · green: gate passed, red: failed", pad=20)
    ax.title.set_fontsize(9)
    ax.xaxis.label.set_fontsize(8)
    ax.grid(axis="x", alpha=0.3, which="both" if log else "major")
    legend = [Line2D([], [], linestyle="", marker=m, color="dimgray", label=label) for _, label, m in _KLD_MARKS]
    legend.append(Line2D([], [], linestyle="", marker="*", markersize=9, color="black", label="mean ± stderr"))
    # between the title and the axis: a legend inside would cover a row
    ax.legend(handles=legend, fontsize=7, loc="lower center", bbox_to_anchor=(0.5, 1.0), ncols=6, frameon=False)
    return fig


def _save_fig(fig: Any, out: Path, name: str) -> str:
    rel = f"{PLOTS_DIR}/{name}"
    target = out / rel
    fig.tight_layout()
    write_atomic(target, lambda f: fig.savefig(f, format="png"))
    return rel


# --- merging ---------------------------------------------------------------------------------------


def load_report(path: str | Path) -> tuple[Path, RunReport]:
    p = Path(path)
    if p.is_dir():
        p = p / "report.json"
    if not p.is_file():
        raise InputError(f"{path} has no report.json.", "Give report.json files or the folders `llmopt run` wrote.")
    try:
        data = json.loads(p.read_text())
    except ValueError as exc:
        raise InputError(f"{p} is not valid JSON: {exc}", "Give a report.json written by `llmopt run`.") from None
    if not isinstance(data, dict) or data.get("schema") != RUN_SCHEMA:
        raise InputError(
            f"{p} is not a run report (schema {data.get('schema') if isinstance(data, dict) else None!r}, "
            f"expected {RUN_SCHEMA}).",
            "Give report.json files written by `llmopt run`.",
        )
    try:
        return p, RunReport.model_validate(data)
    except ValueError as exc:
        first = exc.errors()[0] if isinstance(exc, ValidationError) and exc.errors() else None
        where = ".".join(str(x) for x in first["loc"]) + ": " + first["msg"] if first else str(exc)
        newer = "newer llmopt" in where
        raise InputError(
            f"{p} is not a valid run report: {where}.",
            "Upgrade llmopt (pip install -U llmopt) to read it." if newer else "Give report.json files written by "
            "`llmopt run`.",
        ) from None


def merge_reports(paths: list[str | Path], out: str | Path) -> RunReport:
    """Combine several run reports (e.g. one per CI job) into one, written into ``out``.

    Refuses reports measured on different tokens or windows (their perplexities are not comparable).
    A variant present in several reports is taken from the newest one.
    """
    from llmopt.outputs import check_run_folder, claim_run_folder

    if not paths:
        raise InputError("no reports to merge.", "Give one or more report.json files or run folders.")
    out_dir = Path(out)
    # the same rules as a run's folder: new, empty, or made by llmopt; never a folder of the user's
    check_run_folder(out_dir, False, flag="-o", can_overwrite=False)
    loaded = [load_report(p) for p in paths]
    for path, _ in loaded:
        if Path(path).resolve().parent == out_dir.resolve():
            raise InputError(
                f"-o {out} holds {Path(path).name}, one of the reports to merge: the merged report would replace it.",
                "Write the merged report into a new folder, e.g. -o merged/.",
            )
    notes: list[str] = []
    ref_path, ref_settings = None, None
    devices: set[str] = set()
    by_name: dict[str, tuple[str, VariantOutcome]] = {}
    order: list[str] = []
    names: list[str] = []
    for path, data in sorted(loaded, key=lambda pd: str(pd[1].created_at or "")):
        settings = data.settings
        if settings:
            devices.add(str(settings.device))
            if ref_settings is None:
                ref_path, ref_settings = path, settings
            else:
                diff = [k for k in _COMPARABLE if getattr(settings, k) != getattr(ref_settings, k)]
                if diff:
                    raise InputError(
                        f"{path} was measured with different {', '.join(diff)} than {ref_path}: "
                        "their perplexities are not comparable.",
                        "Merge only reports made with the same evaluation settings (text, context, stride).",
                    )
        rname = data.recipe.get("name")
        if rname and rname not in names:
            names.append(rname)
        base_dir = path.parent
        for v in data.variants:
            row = v.model_copy()
            if row.artifact and not Path(row.artifact).is_absolute():
                # keep pointing at the same folder from the merged report's place
                row.artifact = os.path.relpath((base_dir / row.artifact).resolve(), out_dir.resolve())
            if row.status == "not_run" and row.name in by_name:
                continue  # an interrupted run's placeholder never hides a variant another run finished
            if row.name in by_name:
                notes.append(f"variant {row.name} is in {by_name[row.name][0]} and {path}: kept the newer")
            else:
                order.append(row.name)
            by_name[row.name] = (str(path), row)
    if len(devices) > 1:
        notes.append(f"variants were measured on different devices: {', '.join(sorted(devices))}")
    report = build_run_report(
        recipe={"name": names[0] if len(names) == 1 else None, "names": names},
        variants=[by_name[n][1] for n in order],
        output=out_dir,
        sources=[str(p) for p, _ in loaded],
        notes=notes,
    )
    report.state = "incomplete" if any(v.status == "not_run" for v in report.variants) else "complete"
    # the FP16 model served: the newest report's measurement (each job of a fleet serves it with the same trace)
    served = [d.baseline_serving for _, d in sorted(loaded, key=lambda pd: str(pd[1].created_at or ""))]
    report.baseline_serving = next((b for b in reversed(served) if b is not None), None)
    claim_run_folder(out_dir)
    write_report(report, out_dir)
    return report
