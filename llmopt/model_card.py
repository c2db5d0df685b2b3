"""The model card (README.md) that ``llmopt publish`` uploads with an artifact (llmopt/hub.py).

Rendered from the artifact's manifest alone: YAML metadata for the Hub, the evaluation against FP16,
the recipe, provenance and how to load the model. Never written into the artifact folder, whose file
hashes must not change. Also the ``.eval_results/`` files of the tasks a user maps to Hub benchmarks
(``benchmark_result``; https://huggingface.co/docs/hub/eval-results).
"""

from __future__ import annotations

import json
import math
import re
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from llmopt.artifact import MANIFEST_NAME, Artifact, FileEntry, files_digest
from llmopt.backends.base import format_card
from llmopt.backends.format_card import FormatCard
from llmopt.errors import InputError
from llmopt.results import Distribution, EvalReport, ModelScore, TaskScore
from llmopt.source import HUB_ID
from llmopt.units import fmt_bytes

CARD_NAME = "README.md"


# --- model card ------------------------------------------------------------------------------------


def source_license(art: Artifact) -> str | None:
    """The license of the model quantized, from its README front matter or config.json, if present."""
    root = Path(art.manifest.source.resolved_path)
    readme = root / "README.md"
    if readme.is_file():
        text = readme.read_text(encoding="utf-8", errors="replace")
        if text.startswith("---"):
            end = text.find("\n---", 3)
            if end > 0:
                import yaml

                try:
                    meta = yaml.safe_load(text[3:end])
                except yaml.YAMLError:
                    meta = None
                if isinstance(meta, dict) and isinstance(meta.get("license"), str):
                    return str(meta["license"])
    config = root / "config.json"
    if config.is_file():
        try:
            value = json.loads(config.read_text()).get("license")
        except ValueError:
            value = None
        if isinstance(value, str):
            return value
    return None


def _recipe_publish(art: Artifact) -> dict[str, Any]:
    """The ``publish`` section of the recipe the artifact was made from (empty when none)."""
    resolved = (art.manifest.recipe or {}).get("resolved") or {}
    section = resolved.get("publish") if isinstance(resolved, dict) else None
    return section if isinstance(section, dict) else {}


def license_of(art: Artifact, explicit: str | None = None) -> str | None:
    """The card's license: given, else the recipe's ``publish.license``, else the source model's own."""
    if explicit:
        return explicit
    from_recipe = _recipe_publish(art).get("license")
    if isinstance(from_recipe, str) and from_recipe:
        return from_recipe
    return source_license(art)


def _recipe_base_model(art: Artifact) -> str | None:
    resolved = (art.manifest.recipe or {}).get("resolved") or {}
    base = _recipe_publish(art).get("base_model")
    if base:
        return str(base)
    source = (resolved.get("model") or {}).get("source")
    if isinstance(source, str) and HUB_ID.match(source) and not Path(source).exists():
        return source
    return None


def base_model_of(art: Artifact, explicit: str | None = None) -> str | None:
    """Hub id of the model quantized: given, else from the recipe, else the source when it is a Hub id."""
    if explicit:
        return explicit
    found = _recipe_base_model(art)
    if found:
        return found
    src = art.manifest.source.model
    if HUB_ID.match(src) and not Path(src).expanduser().exists():
        return src
    return None


def _public(value: Any) -> Any:
    """Local paths shortened to their last part: a model card must not show the machine's folders."""
    if isinstance(value, dict):
        return {k: _public(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_public(v) for v in value]
    if isinstance(value, str) and (value.startswith(("/", "~", "./", "../")) or re.match(r"^[A-Za-z]:\\", value)):
        return ".../" + Path(value).name
    return value


def _how_to_load(facts: FormatCard) -> list[str]:
    lines: list[str] = []
    for snippet in facts.load:
        lines += ["", snippet.intro, "", f"```{snippet.language}", *snippet.code.splitlines(), "```"]
    return lines[1:]


def _dtype_cell(value: Any) -> str:
    """The dtype a side was scored in, as the evaluation recorded it; never a guess."""
    return f"`{value}`" if isinstance(value, str) and value else "not recorded"


def _scored_baseline(art: Artifact, baseline: ModelScore | None, base_model: str | None) -> dict[str, str]:
    """What the baseline row may claim: the model that was actually scored, by Hub id only when it was one.

    A local folder is named by its last path part and its weights' sha256 (when the manifest has them for
    that folder); a card must not present a local rebuild as the Hub model it may have come from.
    """
    scored = str(baseline.model or "") if baseline else ""
    local = not (HUB_ID.match(scored) and not Path(scored).expanduser().exists()) if scored else True
    if scored and not local:
        return {"label": scored}
    src = art.manifest.source
    name = Path(scored).name if scored else Path(src.model).name
    same_as_source = (
        not scored
        or scored in (src.model, src.resolved_path)
        or (Path(scored).expanduser().resolve() == Path(src.resolved_path).expanduser().resolve())
    )
    hashes = src.weights_sha256 if same_as_source else {}
    if hashes:
        digest = ", ".join(f"`{k}` sha256 `{v[:16]}…`" for k, v in sorted(hashes.items()))
        label = f"local `{name}`, {digest}"
    else:
        label = f"local `{name}`, weights not hashed in the manifest"
    note = ""
    if base_model:
        note = (
            f"The FP16 baseline scored was a local copy (`{name}`), identified by its weights' sha256 in the table; "
            f"it was not downloaded from [{base_model}](https://huggingface.co/{base_model}) for this evaluation."
        )
    return {"label": label, "note": note}


def render_card(
    art: Artifact,
    repo_id: str,
    *,
    revision: str | None = None,
    base_model: str | None = None,
    license: str | None = None,
    tags: list[str] | None = None,
    files: dict[str, FileEntry] | None = None,
    benchmarks: Sequence[Benchmark] | None = None,
) -> str:
    """The model card (README.md): YAML metadata, evaluation against FP16, recipe, provenance, usage.

    ``benchmarks``: the tasks also published as Hub benchmark results (``.eval_results/``), named under the task
    table."""
    import yaml

    m = art.manifest
    ev = m.evaluation
    gate = m.gate
    options = {k: v for k, v in m.options.items() if k != "_resolved"}
    facts = format_card(m.backend, m.format, options, repo_id, revision)
    bits = facts.bits
    base = base_model_of(art, base_model)
    lic = license_of(art, license)

    recipe_tags = _recipe_publish(art).get("tags")
    extra_tags = [str(t) for t in [*(tags or []), *(recipe_tags if isinstance(recipe_tags, list) else [])]]
    data = card_data(art, repo_id, facts, base_model=base, license=lic, tags=extra_tags)

    name = repo_id.split("/")[-1]
    base_ref = f"[{base}](https://huggingface.co/{base})" if base else f"`{Path(m.source.model).name}`"
    s = ev.settings if ev else None
    b = ev.baseline if ev else None
    a = ev.artifact if ev else None
    width = facts.bit_width or (f"{bits}-bit" if bits else None)
    kind = f"`{m.format}` format" + (f", type `{facts.quant_type}`" if facts.quant_type else "")
    lines = [
        "---",
        _metadata_yaml(data),
        "---",
        "",
        f"# {name}",
        "",
        f"{width} " if width else "",
    ]
    lines[-1] += (
        f"{m.backend} quantization ({kind}) of {base_ref}, made with "
        # no link: llmopt has no registry page or public home of its own, and a link to an unclaimed
        # package name is one anyone could take over
        f"llmopt {m.llmopt_version} and published only after passing "
        "its quality gate."
    )
    lines += ["", "## Evaluation against FP16", ""]
    if s:
        lines.append(
            f"Perplexity on `{_public(s.dataset)}` "
            f"(text sha256 `{(s.text_sha256 or '')[:16]}…`): "
            f"{s.tokens_scored or 0:,} tokens scored in windows of {s.context_length} "
            f"(stride {s.stride}{', BOS added' if s.add_bos else ''}) on "
            f"**{s.device or '?'}**. Both models were scored on exactly the same token ids."
        )
        lines.append("")
    scored_base = _scored_baseline(art, b, base)
    if scored_base.get("note"):
        lines += [scored_base["note"], ""]
    speed = ev.throughput.decode_speedup if ev and ev.throughput else {}
    speed_col = bool(speed)
    # the token-distribution comparison, when measured (an evaluation from before it, or --no-kld, has none)
    dist = a.distribution if a else None
    header = ["model", "scored in", "perplexity", "± stderr", "Δ vs FP16"]
    if dist is not None:
        header += ["mean KLD ± stderr", "p99 KLD", "top-1 agreement"]
    header += ["size on disk", "in memory"]
    if speed_col:
        header.append("decode speedup")
    lines += ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    if b:
        row = [
            f"FP16 baseline ({scored_base['label']})",
            _dtype_cell(b.dtype),
            f"{b.perplexity:.4f}",
            f"{b.stderr:.4f}",
            "–",
            *(["0 (reference)", "0", "100%"] if dist is not None else []),
            fmt_bytes(b.size_bytes),
            fmt_bytes(b.footprint_bytes),
        ]
        lines.append("| " + " | ".join(row + (["1.00x"] if speed_col else [])) + " |")
    if ev and a:
        delta = ev.delta_pct
        dse = ev.delta_pct_stderr
        row = [
            f"**this model** ({m.backend})",
            # before the evaluation recorded a dtype per side, settings.dtype was the artifact's
            _dtype_cell(a.dtype or (s.dtype if s else None)),
            f"{a.perplexity:.4f}",
            f"{a.stderr:.4f}",
            ("–" if delta is None else f"{delta:+.2f}%") + (f" ± {dse:.2f}" if dse is not None else ""),
            *(_distribution_cells(dist) if dist is not None else []),
            fmt_bytes(a.size_bytes),
            fmt_bytes(a.footprint_bytes),
        ]
        if speed_col:
            row.append(
                ", ".join(
                    f"{float(v):.2f}x @ batch {k}"
                    for k, v in sorted(speed.items(), key=lambda kv: int(kv[0]))
                    if v is not None
                )
            )
        lines.append("| " + " | ".join(row) + " |")
    if dist is not None:
        lines += ["", _distribution_note(dist)]
    if ev is not None:
        lines += _task_lines(ev, benchmarks or ())
    if gate and gate.checks:
        lines += ["", "**Gate** (all must pass to publish):", ""]
        lines += [f"- {'✅' if c.passed else '❌'} {c.message}" for c in gate.checks]

    lines += ["", "## How to use", ""]
    lines += _how_to_load(facts)

    lines += [
        "",
        "## Quantization",
        "",
        f"- method: `{m.backend}`, format `{m.format}`, loaded by `{m.runner}`",
    ]
    if m.quantize_seconds is not None:
        lines.append(f"- quantized in {m.quantize_seconds:.1f} s on {m.environment.device}")
    if m.calibration:
        c = m.calibration
        lines.append(
            f"- calibration: `{_public(c.dataset)}`, {c.samples} samples × {c.seq_len} tokens "
            f"(token ids sha256 `{c.tokens_sha256[:16]}…`)"
        )
    else:
        lines.append("- calibration: none (this method needs none)")
    lines += ["", "Options:", "", "```yaml", yaml.safe_dump(options, sort_keys=True).rstrip(), "```"]

    resolved = (m.recipe or {}).get("resolved")
    if resolved:
        variant = (m.recipe or {}).get("variant")
        lines += [
            "",
            "## Recipe",
            "",
            f"The llmopt recipe this artifact was made from{f' (variant `{variant}`)' if variant else ''}; "
            "local paths are shortened.",
            "",
            "```yaml",
            yaml.safe_dump(_public(resolved), sort_keys=False, allow_unicode=True).rstrip(),
            "```",
        ]

    lines += ["", "## Provenance", ""]
    lines.append(f"- llmopt {m.llmopt_version} (manifest schema {m.schema_version}), created {m.created_at}")
    if m.source.weights_sha256:
        lines.append(
            "- source weights sha256: " + ", ".join(f"`{k}` `{v}`" for k, v in m.source.weights_sha256.items())
        )
    table = files or m.files
    lines.append(f"- files digest (what the evaluation saw): `{files_digest(table)}`")
    env = (ev.environment if ev else None) or m.environment.model_dump()
    pk = env.get("packages") or {}
    if pk:
        lines.append("- evaluated with: " + ", ".join(f"{k} {v}" for k, v in sorted(pk.items())))
    lines.append(f"- python {env.get('python', '?')} on {env.get('platform', '?')}")
    lines += ["", "| file | size | sha256 |", "|---|---|---|"]
    lines += [f"| `{rel}` | {e.size:,} | `{e.sha256}` |" for rel, e in sorted(table.items())]
    lines += ["", f"The full record is in [`{MANIFEST_NAME}`]({MANIFEST_NAME})."]
    text = "\n".join(lines).rstrip() + "\n"
    # parsed back by the Hub's own card class: metadata it cannot read fails here, not on upload
    ModelCard, _, _ = _card_classes()
    ModelCard(text)
    return text


# --- metadata through huggingface_hub's card classes --------------------------------------------------------

# The front matter's key order before the card classes (and the Hub's own model card template): kept, so that
# an upgrade changes what the metadata says, not where it says it.
_KEY_ORDER = [
    "base_model",
    "base_model_relation",
    "license",
    "library_name",
    "pipeline_tag",
    "tags",
    "datasets",
    "model_name",
    "eval_results",
]


def _card_classes() -> tuple[Any, Any, Any]:
    """huggingface_hub's ModelCard, ModelCardData and EvalResult (the ``hub`` extra)."""
    try:
        from huggingface_hub import EvalResult, ModelCard, ModelCardData
    except ImportError:
        from llmopt.errors import BackendUnavailableError

        raise BackendUnavailableError(
            "the model card needs huggingface_hub.", "pip install 'llmopt[hub]'  (or: pip install huggingface_hub)"
        ) from None
    return ModelCard, ModelCardData, EvalResult


def _metadata_yaml(data: Any) -> str:
    try:
        return str(data.to_yaml(original_order=_KEY_ORDER))
    except TypeError:  # huggingface_hub before original_order: its own order, same content
        return str(data.to_yaml())


def card_data(
    art: Artifact,
    repo_id: str,
    facts: FormatCard,
    *,
    base_model: str | None,
    license: str | None,
    tags: list[str] | None = None,
) -> Any:
    """The card's metadata as huggingface_hub's ``ModelCardData``: base model and its relation, license, the
    format's library and tags, the Hub datasets the artifact was calibrated and evaluated on, and the measured
    perplexity as ``model-index`` evaluation results (what the Hub shows in its evaluation panel)."""
    _, ModelCardData, _ = _card_classes()
    m = art.manifest
    bits = facts.bits
    tag_list = ["llmopt", "quantized", *facts.tags, m.backend]
    if bits:
        tag_list.append(f"{bits}-bit")
    if facts.quant_type:
        tag_list.append(facts.quant_type)
    tag_list += tags or []
    fields: dict[str, Any] = {
        "license": license,
        "library_name": facts.library_name,
        "pipeline_tag": "text-generation",
        "tags": list(dict.fromkeys(tag_list)),
    }
    if base_model:
        fields["base_model"] = base_model
        fields["base_model_relation"] = "quantized"
    used = (m.calibration.dataset if m.calibration else None, m.evaluation.settings.dataset if m.evaluation else None)
    datasets = [hub_id for hub_id in map(_hub_dataset, used) if hub_id]
    if datasets:
        fields["datasets"] = list(dict.fromkeys(datasets))
    results = eval_results(m.evaluation)
    if results:
        fields["model_name"] = repo_id.split("/")[-1]
        fields["eval_results"] = results
    return ModelCardData(**{k: v for k, v in fields.items() if v is not None})


def _hub_dataset(spec: str | None) -> str | None:
    """The Hub id behind a named dataset (``wikitext2`` -> ``wikitext``); None for a local text."""
    from llmopt.data import NAMED_DATASETS

    named = NAMED_DATASETS.get(spec or "")
    return str(named["path"]) if named else None


def eval_results(evaluation: EvalReport | None) -> list[Any]:
    """The evaluation as ``model-index`` results: this model's perplexity (its standard error, the FP16
    baseline's and the window settings as arguments) and the perplexity increase over FP16, on the dataset
    scored: a Hub dataset by its id, config and split, a local text by its file name and sha256."""
    _, _, EvalResult = _card_classes()
    if evaluation is None:
        return []
    s, a, b = evaluation.settings, evaluation.artifact, evaluation.baseline
    ppl = a.perplexity
    if not isinstance(ppl, int | float) or ppl != ppl or ppl in (float("inf"), float("-inf")):
        return []
    spec = s.dataset or ""
    from llmopt.data import NAMED_DATASETS

    named = NAMED_DATASETS.get(spec)
    text_sha = s.text_sha256 or None
    if named:
        dataset = {
            "dataset_type": str(named["path"]),
            "dataset_name": spec,
            "dataset_config": named.get("name"),
            "dataset_split": named.get("split"),
        }
    else:
        file_name = Path(spec).name or "text"  # never the machine's folders
        dataset = {"dataset_type": file_name, "dataset_name": f"{file_name} (local text)", "dataset_revision": text_sha}
    window = {"context_length": s.context_length, "stride": s.stride, "add_bos": s.add_bos}
    if s.tokens_scored is not None:
        window["tokens_scored"] = s.tokens_scored
    common = {"task_type": "text-generation", "task_name": "Text Generation", **dataset, "dataset_args": window or None}
    ppl_args = {"stderr": _rounded(a.stderr), "fp16_baseline": _rounded(b.perplexity)}
    results = [
        EvalResult(
            **common,
            metric_type="perplexity",
            metric_name="Perplexity",
            metric_value=_rounded(ppl),
            metric_args={k: v for k, v in ppl_args.items() if v is not None} or None,
        )
    ]
    delta = evaluation.delta_pct
    if isinstance(delta, int | float) and delta == delta:
        dse = _rounded(evaluation.delta_pct_stderr, 2)
        results.append(
            EvalResult(
                **common,
                metric_type="perplexity_increase_pct",
                metric_name="Perplexity increase vs FP16 (%)",
                metric_value=round(float(delta), 2),
                metric_args={"stderr": dse} if dse is not None else None,
            )
        )
    # the token-distribution comparison (default since KL divergence is measured): what a --max-kld /
    # --min-top1 gate judged, so a card reader sees the numbers behind those checks too
    dist = a.distribution
    if dist is not None:
        for metric, name, value, err in (
            ("kl_divergence", "Mean KL divergence vs FP16 (nats)", dist.kld_mean, dist.kld_stderr),
            ("top1_agreement", "Top-1 agreement with FP16", dist.top1_agreement, dist.top1_agreement_stderr),
        ):
            rounded = _rounded(value, 6)
            if rounded is None or rounded in (float("inf"), float("-inf")):
                continue
            args = {"stderr": _rounded(err, 6), "top_k": dist.top_k}
            results.append(
                EvalResult(
                    **common,
                    metric_type=metric,
                    metric_name=name,
                    metric_value=rounded,
                    metric_args={k: v for k, v in args.items() if v is not None},
                )
            )
    return results + task_eval_results(evaluation)


def _kld_decimals(value: float) -> int:
    """Decimals that show about three significant digits of a KL divergence (0.274, 0.00431), three to seven."""
    if not math.isfinite(value) or value <= 0:
        return 3
    return min(7, max(3, 2 - math.floor(math.log10(value))))


def _distribution_cells(dist: Distribution) -> list[str]:
    """This model's cells of the card's KLD columns: mean KLD ± stderr, p99 KLD, top-1 agreement ± stderr."""
    places = _kld_decimals(dist.kld_mean)
    return [
        f"{_kld(dist.kld_mean, places)} ± {_kld(dist.kld_stderr, places)}",
        _kld(dist.kld_p99),
        f"{100 * dist.top1_agreement:.2f}% ± {100 * dist.top1_agreement_stderr:.2f}",
    ]


def _distribution_note(dist: Distribution) -> str:
    """What the KLD columns measure, under the table."""
    return (
        f"KLD: KL(FP16 ‖ this model) between the next-token distributions on the same {dist.tokens:,} tokens, "
        f"in nats per token, over FP16's top {dist.top_k} tokens plus the rest's mass (a lower bound of the full "
        "vocabulary's): mean ± stderr over the windows; p99, its 99th percentile over the tokens (median "
        f"{_kld(dist.kld_median)}, p90 {_kld(dist.kld_p90)}, p99.9 {_kld(dist.kld_p999)}, max {_kld(dist.kld_max)}). "
        "Top-1 agreement: the share of tokens whose most likely next token is the same for both models."
    )


def _kld(value: float, places: int | None = None) -> str:
    """A KL divergence for the card: "–" when not a number, 0 for the float rounding below it (KLD is never
    negative), beyond 1,000 without decimals."""
    if not math.isfinite(value):
        return "–"
    value = max(value, 0.0)
    if value >= 1000:
        return f"{value:,.0f}"
    return f"{value:.{_kld_decimals(value) if places is None else places}f}"


def _task_lines(ev: EvalReport, benchmarks: Sequence[Benchmark] = ()) -> list[str]:
    """The downstream accuracy table of the card body (nothing when no tasks were run), and the line saying which
    of its tasks are also published as Hub benchmark results."""
    tasks = ev.artifact.tasks
    if tasks is None:
        return []
    if tasks.not_run:
        return ["", f"Downstream tasks ({', '.join(_public(t) for t in tasks.requested)}): {tasks.not_run}."]
    limit = f", the first {tasks.limit} examples of each task" if tasks.limit else ""
    out = [
        "",
        f"Downstream accuracy with {tasks.harness or 'lm-eval'} on the same examples for both models{limit}; "
        "recovery = this model / FP16, with its paired standard error:",
        "",
        "| task | metric | n | FP16 | this model | recovery |",
        "|---|---|---|---|---|---|",
    ]
    for c in ev.task_recovery or []:
        cells = [
            c.task,
            c.metric,
            str(c.n),
            _with_error(c.baseline, c.baseline_stderr),
            _with_error(c.artifact, c.artifact_stderr),
            _with_error(c.recovery, c.recovery_stderr),
        ]
        out.append("| " + " | ".join(cells) + " |")
    if benchmarks:
        primary = {c.task: c.metric for c in ev.task_recovery or [] if c.primary}
        mapped = ", ".join(
            " ".join(w for w in (b.task, primary.get(b.task)) if w)
            + f" as [{b.dataset_id}](https://huggingface.co/datasets/{b.dataset_id}) task `{b.task_id}`"
            for b in benchmarks
        )
        doc = f"[Hub benchmark results]({HUB_EVAL_RESULTS_DOC})"
        out += ["", f"Also published as {doc} (`{EVAL_RESULTS_DIR}/`, in %): {mapped}."]
    return out


def _with_error(value: float | None, err: float | None) -> str:
    if value is None:
        return "–"
    return f"{value:.3f}" + (f" ± {err:.3f}" if err is not None else "")


# lm-eval loads a local task's data with these `datasets` builders: the data is no Hub dataset
_LOCAL_LOADERS = ("json", "csv", "parquet", "text", "arrow")


def task_eval_results(evaluation: EvalReport) -> list[Any]:
    """This model's lm-eval task scores as ``model-index`` results (every metric, its error, n and FP16's value
    as arguments; the recovery of the metric the gate reads as a result of its own)."""
    _, _, EvalResult = _card_classes()
    tasks = evaluation.artifact.tasks
    if tasks is None or tasks.not_run:
        return []
    results = []
    by_metric = {(c.task, c.metric): c for c in evaluation.task_recovery or []}
    for score in tasks.scores:
        value = _rounded(score.value, 6)
        if value is None or value in (float("inf"), float("-inf")):
            continue
        hub = score.dataset if score.dataset and score.dataset not in _LOCAL_LOADERS else None
        dataset: dict[str, Any] = (
            {"dataset_type": hub, "dataset_name": score.task, "dataset_config": score.dataset_config}
            if hub
            else {
                "dataset_type": score.task,
                "dataset_name": f"{score.task} (local task)",
                "dataset_revision": tasks.files_sha256,
            }
        )
        common = {"task_type": "text-generation", "task_name": score.task, **dataset}
        c = by_metric.get((score.task, score.metric))
        args = {
            "stderr": _rounded(score.stderr, 6),
            "n": score.n,
            "fp16": _rounded(c.baseline, 6) if c else None,
            "harness": tasks.harness,
        }
        results.append(
            EvalResult(
                **common,
                metric_type=score.metric,
                metric_name=f"{score.task} {score.metric}",
                metric_value=value,
                metric_args={k: v for k, v in args.items() if v is not None},
            )
        )
        if c is not None and c.primary and c.recovery is not None:
            rec_args = {"stderr": _rounded(c.recovery_stderr, 6), "n": c.n}
            results.append(
                EvalResult(
                    **common,
                    metric_type=f"{score.metric}_recovery",
                    metric_name=f"{score.task} {score.metric} recovery vs FP16",
                    metric_value=_rounded(c.recovery, 6),
                    metric_args={k: v for k, v in rec_args.items() if v is not None},
                )
            )
    return results


def _rounded(value: Any, digits: int = 4) -> float | None:
    return round(float(value), digits) if isinstance(value, int | float) and value == value else None


# --- Hub benchmark results (.eval_results/) ---------------------------------------------------------------

EVAL_RESULTS_DIR = ".eval_results"
HUB_EVAL_RESULTS_DOC = "https://huggingface.co/docs/hub/eval-results"


@dataclass(frozen=True)
class Benchmark:
    """An lm-eval task the evaluation ran, mapped by the user to a Hub benchmark: a dataset registered as a
    Benchmark and a task of its ``eval.yaml``. llmopt cannot check either offline, so the mapping is the user's."""

    task: str
    dataset_id: str
    task_id: str

    @property
    def path(self) -> str:
        """Where its result goes in the model repo."""
        return f"{EVAL_RESULTS_DIR}/{self.task}.yaml"


def task_hub_dataset(score: TaskScore) -> str | None:
    """The Hub dataset lm-eval read a task's data from; None for a local task (or one that did not record it)."""
    return score.dataset if score.dataset and score.dataset not in _LOCAL_LOADERS else None


def _refuse(b: Benchmark, why: str, hint: str) -> InputError:
    return InputError(f"cannot publish task '{b.task}' as a result of the Hub benchmark {b.dataset_id}: {why}.", hint)


def _quantization_words(art: Artifact) -> str:
    """The quantization in a few words, from what the backend says about its format: '4-bit gptq g128'."""
    m = art.manifest
    options = {k: v for k, v in m.options.items() if k != "_resolved"}
    facts = format_card(m.backend, m.format, options, "org/name", None)
    width = facts.bit_width or (f"{facts.bits}-bit" if facts.bits else None)
    group = options.get("group_size")
    words = [width, m.backend, facts.quant_type]
    if isinstance(group, int) and not isinstance(group, bool) and group > 0:
        words.append(f"g{group}")
    return " ".join(w for w in words if w)


def benchmark_result(
    art: Artifact, benchmark: Benchmark, *, local_data: bool = False, source_url: str | None = None
) -> dict[str, Any]:
    """The ``.eval_results/`` entry of one mapped task (https://huggingface.co/docs/hub/eval-results).

    ``value``: this artifact's score of the task's primary metric (the one its recovery and gate read), in %.
    No ``revision`` and no ``date``: llmopt records neither the task data's Hub revision nor when the evaluation
    ran (the Hub then dates the result by its commit). No ``verifyToken``: only the Hub's own evaluators make one.
    ``source_url``: where the per-example scores behind the value are (the repo's ``llmopt.json``).

    Raises InputError (nothing is published) when the evaluation did not run the task, has no score of it for
    this artifact, scored a subset (``--task-limit``), or its metric is no share to give in %; and for a local
    task (the user's own copy of the data) unless ``local_data`` says that copy is the benchmark's data.
    """
    ev = art.manifest.evaluation
    tasks = ev.artifact.tasks if ev else None
    if ev is None or tasks is None:
        raise _refuse(
            benchmark,
            "its stored evaluation ran no lm-eval tasks",
            f"Evaluate it again with --tasks {benchmark.task}, or leave the mapping out.",
        )
    if tasks.not_run:
        raise _refuse(
            benchmark,
            f"the evaluation has no task score for this artifact ({tasks.not_run})",
            "Publish it without benchmark mappings: .eval_results/ takes only a score measured on this artifact.",
        )
    ran = sorted({s.task for s in tasks.scores})
    if benchmark.task not in ran:
        raise _refuse(
            benchmark,
            f"the stored evaluation did not run that task; it ran: {', '.join(ran) or 'none'}",
            f"Map one of those tasks, or evaluate again with --tasks {benchmark.task}.",
        )
    c = next((c for c in ev.task_recovery or [] if c.task == benchmark.task and c.primary), None)
    score = next((s for s in tasks.scores if c and s.task == c.task and s.metric == c.metric), None)
    if c is None or score is None:
        raise _refuse(
            benchmark,
            "the evaluation holds no FP16 comparison of that task (the metric its recovery reads)",
            "Evaluate it again with --baseline and --tasks, so both models are scored on the same examples.",
        )
    if tasks.limit is not None and score.n >= tasks.limit:
        raise _refuse(
            benchmark,
            f"it was scored on the first {tasks.limit} examples only (--task-limit), and a leaderboard compares "
            "scores over the whole benchmark",
            "Evaluate it again without --task-limit, or leave the mapping out.",
        )
    if score.examples is None:
        raise _refuse(
            benchmark,
            "its stored evaluation kept no per-example scores, so the value cannot be checked against them",
            f"Evaluate it again with --tasks {benchmark.task} (llmopt keeps every example's score now).",
        )
    shares = all(0.0 <= v <= 1.0 for v in score.examples)
    if not (shares and 0.0 <= score.value <= 1.0):
        raise _refuse(
            benchmark,
            f"its metric {c.metric} is not a mean of per-example scores between 0 and 1, so it cannot be given "
            "as the percentage a benchmark reports",
            "Leave the mapping out; the card's model-index still lists the score.",
        )
    hub_data = task_hub_dataset(score)
    if hub_data is None and not local_data:
        raise _refuse(
            benchmark,
            "it is a local task (lm-eval read its data from your file"
            + (f", task files sha256 {tasks.files_sha256}" if tasks.files_sha256 else "")
            + "), not from the Hub",
            "If that file is the benchmark's own data, say so with --benchmark-local-data (recipe: "
            "publish.benchmark_local_data: true); else leave the mapping out.",
        )
    data = (
        f"data {hub_data}" + (f" ({score.dataset_config})" if score.dataset_config else "")
        if hub_data
        else "data a local copy" + (f" (task files sha256 {tasks.files_sha256})" if tasks.files_sha256 else "")
    )
    recovery = f"recovery {c.recovery:.3f}" if c.recovery is not None else "no recovery: FP16 scored 0"
    notes = (
        f"{tasks.harness or 'lm-eval'} {c.task} {c.metric}, n={score.n}, {data}; {_quantization_words(art)} "
        f"quantized by llmopt {art.manifest.llmopt_version}; FP16 baseline {100 * c.baseline:.2f} ({recovery})"
    )
    entry: dict[str, Any] = {
        "dataset": {"id": benchmark.dataset_id, "task_id": benchmark.task_id},
        "value": round(100 * score.value, 2),
    }
    if source_url:
        entry["source"] = {"url": source_url, "name": f"llmopt evaluation record ({MANIFEST_NAME})"}
    entry["notes"] = notes
    return entry


def eval_results_yaml(entry: dict[str, Any]) -> bytes:
    """One ``.eval_results/`` file: a YAML list holding the entry."""
    import yaml

    # no line folding: the notes stay one line in the file too
    return yaml.safe_dump([entry], sort_keys=False, allow_unicode=True, width=math.inf).encode()
