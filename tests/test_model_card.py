"""The model card's metadata is built with huggingface_hub's card classes (issue 13, item 5): each format's
library, tags and bit width, the base model and its relation, and the measured perplexity as ``model-index``
evaluation results, which huggingface_hub (and the Hub) read back as they were written."""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Any

import pytest

from llmopt.artifact import Artifact, CalibrationInfo
from tests.test_publish import make_artifact

hf = pytest.importorskip("huggingface_hub")


def with_evaluation(art_dir: Path, change: Any) -> Artifact:
    """The artifact with its recorded evaluation changed in llmopt.json (the record as a dict, whatever type
    the library reads it into)."""
    import json

    path = art_dir / "llmopt.json"
    manifest = json.loads(path.read_text())
    change(manifest["evaluation"])
    path.write_text(json.dumps(manifest))
    return Artifact.open(art_dir)


def card_of(tmp_path: Path, **kw: Any) -> tuple[str, Artifact]:
    from llmopt.model_card import render_card

    art = Artifact.open(make_artifact(tmp_path, **kw))
    return render_card(art, "org/smol-x"), art


def title_of(card: str) -> str:
    lines = card.splitlines()
    return lines[lines.index("# smol-x") + 2]


@pytest.mark.parametrize(
    ("backend", "fmt", "options", "library", "tags", "title"),
    [
        ("gptq", "gptq", {"bits": 4, "group_size": 64}, "transformers", {"gptq", "4-bit"}, "4-bit gptq quantization"),
        ("awq", "awq", {"bits": 4, "group_size": 64}, "transformers", {"awq", "4-bit"}, "4-bit awq quantization"),
        ("bnb-int8", "bnb-8bit", {}, "transformers", {"bitsandbytes", "8-bit", "int8"}, "8-bit bnb-int8"),
        ("bnb-nf4", "bnb-4bit", {}, "transformers", {"bitsandbytes", "4-bit", "nf4"}, "4-bit bnb-nf4"),
        ("gguf", "gguf", {"quant_type": "q4_k_m"}, "gguf", {"gguf", "q4_k_m"}, "~4.6 bpw gguf quantization"),
        ("gguf", "gguf", {"quant_type": "q8_0"}, "gguf", {"gguf", "q8_0"}, "8.5 bpw gguf quantization"),
        ("myplugin", "fp8", {"bits": 8}, "transformers", {"fp8", "8-bit"}, "8-bit myplugin quantization"),
    ],
)
def test_each_format_metadata(
    tmp_path: Path, backend: str, fmt: str, options: dict[str, Any], library: str, tags: set[str], title: str
) -> None:
    """library_name right for each format (GGUF: the Hub's `gguf` library, before: none), its tags and bit width
    in tags and title (GGUF: its type and bits per weight, before: neither)."""
    card, _ = card_of(tmp_path, fmt=fmt, backend=backend, options=options)
    data = hf.ModelCard(card).data
    assert data.library_name == library
    assert tags | {"llmopt", "quantized", backend} <= set(data.tags)
    assert data.base_model == "HuggingFaceTB/SmolLM2-135M-Instruct"
    assert data.to_dict()["base_model_relation"] == "quantized"
    assert data.pipeline_tag == "text-generation" and data.license == "apache-2.0"
    assert title_of(card).startswith(title)
    if fmt == "gguf":
        assert f"type `{options['quant_type']}`" in title_of(card)


def test_card_reads_back_as_written(tmp_path: Path) -> None:
    """The front matter is what huggingface_hub writes for this ModelCardData: loaded back (as the Hub's own
    tools load it), the data compare equal and the text comes out unchanged."""
    from llmopt.backends.base import format_card
    from llmopt.model_card import base_model_of, card_data, license_of

    card, art = card_of(tmp_path)
    m = art.manifest
    facts = format_card(m.backend, m.format, m.options, "org/smol-x")
    expected = card_data(art, "org/smol-x", facts, base_model=base_model_of(art), license=license_of(art))
    loaded = hf.ModelCard(card)
    assert loaded.data.to_dict() == expected.to_dict()
    assert loaded.content == card
    assert "model-index" in loaded.data.to_dict()


def test_perplexity_as_evaluation_results(tmp_path: Path) -> None:
    """This model's perplexity and its increase over FP16, with their standard errors, on the local text by
    file name and sha256 (never the local folder), as the Hub reads model-index."""
    import json

    card, art = card_of(tmp_path)
    ev = json.loads(art.manifest_path.read_text())["evaluation"]
    data = hf.ModelCard(card).data
    assert data.model_name == "smol-x"
    ppl, delta = data.eval_results
    assert (ppl.task_type, ppl.metric_type) == ("text-generation", "perplexity")
    assert ppl.metric_value == round(ev["artifact"]["perplexity"], 4)
    assert ppl.metric_args == {
        "stderr": round(ev["artifact"]["stderr"], 4),
        "fp16_baseline": round(ev["baseline"]["perplexity"], 4),
    }
    assert (delta.metric_type, delta.metric_value) == ("perplexity_increase_pct", round(ev["delta_pct"], 2))
    assert ppl.dataset_type == "eval.txt" and ppl.dataset_revision == "cd" * 32
    assert ppl.dataset_args is not None and ppl.dataset_args["context_length"] == ev["settings"]["context_length"]
    assert str(tmp_path) not in card.split("---")[1]
    assert not data.to_dict().get("datasets")  # a local text is no Hub dataset


def test_named_datasets_are_hub_datasets(tmp_path: Path) -> None:
    """wikitext2 (evaluation) and c4 (calibration) appear by their Hub ids, with config and split."""
    from llmopt.model_card import render_card

    art = with_evaluation(make_artifact(tmp_path), lambda ev: ev["settings"].update(dataset="wikitext2"))
    art.manifest.calibration = CalibrationInfo(dataset="c4", samples=8, seq_len=64, tokens_sha256="ef" * 32)
    data = hf.ModelCard(render_card(art, "org/smol-x")).data
    assert data.datasets == ["allenai/c4", "wikitext"]
    result = data.eval_results[0]
    assert (result.dataset_type, result.dataset_config, result.dataset_split) == (
        "wikitext",
        "wikitext-2-raw-v1",
        "test",
    )


def test_no_evaluation_no_results(tmp_path: Path) -> None:
    card, _ = card_of(tmp_path, evaluated=False)
    data = hf.ModelCard(card).data
    assert data.eval_results is None and "model-index" not in card


def test_without_huggingface_hub_the_card_says_what_to_install(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from llmopt.errors import BackendUnavailableError
    from llmopt.model_card import render_card

    art = Artifact.open(make_artifact(tmp_path))
    monkeypatch.setitem(sys.modules, "huggingface_hub", None)
    with pytest.raises(BackendUnavailableError, match="huggingface_hub") as exc:
        render_card(art, "org/smol-x")
    assert "llmopt[hub]" in (exc.value.hint or "")


def test_a_perplexity_that_is_no_number_is_not_a_result(tmp_path: Path) -> None:
    """An infinite perplexity (a model that broke) stays in the table but is not offered to the Hub as a score."""
    from llmopt.model_card import render_card

    art = with_evaluation(make_artifact(tmp_path), lambda ev: ev["artifact"].update(perplexity=float("inf")))
    card = render_card(art, "org/smol-x")
    assert "model-index" not in card and hf.ModelCard(card).data.eval_results is None


def _card_table(card: str) -> dict[str, dict[str, str]]:
    """The evaluation table of the card body: each row (by its first cell's first word) as {column: cell}."""
    lines = card.splitlines()
    start = next(i for i, line in enumerate(lines) if line.startswith("| model | scored in |"))
    head = [c.strip() for c in lines[start].strip("|").split("|")]
    rows = {}
    for line in lines[start + 2 :]:
        if not line.startswith("|"):
            break
        cells = [c.strip() for c in line.strip("|").split("|")]
        rows["baseline" if cells[0].startswith("FP16") else "artifact"] = dict(zip(head, cells, strict=True))
    return rows


def test_card_text_shows_kld_and_top1_when_measured(tmp_path: Path) -> None:
    """Issue 14, item 5: the card's text keeps the distribution numbers next to perplexity (not only in model-index):
    mean KLD ± stderr, p99 KLD and top-1 agreement ± stderr of this model, FP16's row as the reference, and a
    line saying what they measure with the other percentiles."""
    from llmopt.model_card import render_card
    from tests.evaldata import distribution

    art = with_evaluation(
        make_artifact(tmp_path),
        lambda ev: ev["artifact"].update(distribution=distribution(0.004309, ev["settings"], top1=0.953)),
    )
    dist = art.manifest.evaluation.artifact.distribution  # type: ignore[union-attr]
    assert dist is not None
    card = render_card(art, "org/smol-x")
    rows = _card_table(card)
    this, fp16 = rows["artifact"], rows["baseline"]
    assert this["mean KLD ± stderr"] == f"{dist.kld_mean:.5f} ± {dist.kld_stderr:.5f}"  # 3 significant digits
    assert this["p99 KLD"] == f"{dist.kld_p99:.4f}"
    assert this["top-1 agreement"] == f"{100 * dist.top1_agreement:.2f}% ± {100 * dist.top1_agreement_stderr:.2f}"
    assert (fp16["mean KLD ± stderr"], fp16["p99 KLD"], fp16["top-1 agreement"]) == ("0 (reference)", "0", "100%")
    assert this["perplexity"] and this["Δ vs FP16"].startswith("+1.80%")  # perplexity and Δ stay
    note = next(line for line in card.splitlines() if line.startswith("KLD: "))
    assert f"{dist.tokens:,} tokens" in note and f"top {dist.top_k} tokens" in note
    assert f"p99.9 {dist.kld_p999:.4f}" in note and f"max {dist.kld_max:.3f}" in note
    # and the same numbers where the Hub reads them
    metrics = {r.metric_type: r.metric_value for r in hf.ModelCard(card).data.eval_results}
    assert metrics["kl_divergence"] == round(dist.kld_mean, 6)
    assert metrics["top1_agreement"] == round(dist.top1_agreement, 6)


def test_card_text_of_an_evaluation_without_kld_keeps_its_columns(tmp_path: Path) -> None:
    """An evaluation from before KL divergence was measured (schema llmopt.eval/1, no ``distribution``), or one
    made with --no-kld, renders as before: no KLD columns, no KLD line, no KLD results."""
    card, art = card_of(tmp_path)
    ev = art.manifest.evaluation
    assert ev is not None and ev.schema_ == "llmopt.eval/1" and ev.artifact.distribution is None
    rows = _card_table(card)
    assert list(rows["artifact"]) == [
        "model", "scored in", "perplexity", "± stderr", "Δ vs FP16", "size on disk", "in memory"
    ]  # fmt: skip
    assert "KLD" not in card.split("## Evaluation against FP16")[1].split("## How to use")[0]
    assert {r.metric_type for r in hf.ModelCard(card).data.eval_results} == {"perplexity", "perplexity_increase_pct"}


def test_card_kld_cells_of_odd_recorded_numbers(tmp_path: Path) -> None:
    """A rounding-negative mean reads 0, an infinite maximum "–", a vanishing one at most 7 decimals: the card
    stays readable (the integrity check recomputes the mean, the percentiles are trusted as recorded)."""
    from llmopt.model_card import _distribution_note, _kld, render_card
    from tests.evaldata import distribution

    assert _kld(-1e-9) == "0.000" and _kld(float("inf")) == "–" and _kld(float("nan")) == "–"
    assert _kld(1e-12) == "0.0000000" and _kld(2.5e7) == "25,000,000"
    art = with_evaluation(
        make_artifact(tmp_path),
        lambda ev: ev["artifact"].update(distribution={**distribution(0.004, ev["settings"]), "kld_max": float("inf")}),
    )
    dist = art.manifest.evaluation.artifact.distribution  # type: ignore[union-attr]
    assert dist is not None and "max –" in _distribution_note(dist)
    assert "inf" not in render_card(art, "org/smol-x").split("## Evaluation against FP16")[1]
