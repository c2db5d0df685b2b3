"""KL divergence and top-1 agreement against FP16 (llmopt/evaluate/kld.py) on the real SmolLM2, cut short."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from tests.helpers import first_layers


@pytest.fixture(scope="module")
def cut(assets: dict[str, Path], tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    from transformers import AutoTokenizer

    from llmopt.evaluate.perplexity import make_windows

    model = first_layers(assets["model"], tmp_path_factory.mktemp("kld") / "smol-2l", 2)
    tok = AutoTokenizer.from_pretrained(model)
    ids = tok(assets["eval_text"].read_text()[:8000], add_special_tokens=False)["input_ids"][:600]
    windows = make_windows(ids, 128, 96)
    return {"model": model, "windows": windows, "tokens": [len(w.ids) - w.score_from for w in windows]}


def _runner(path: Path) -> Any:
    from llmopt.runners.hf import HFRunner

    return HFRunner(path, "cpu")


def _reference(runner: Any, cut: dict[str, Any], folder: Path, batch_size: int = 1, k: int = 256) -> Any:
    from llmopt.evaluate import kld

    writer = kld.ReferenceWriter(folder, "key", cut["tokens"], runner.n_vocab, k)
    _, ref = kld.build_reference(cut["windows"], runner.kld_reference, runner.n_vocab, writer, batch_size=batch_size)
    return ref


def _quantize_in_place(runner: Any, bits: int = 4) -> None:
    """Round every decoder linear weight to ``bits`` bits per output row: a real (if plain) quantization error."""
    import torch

    with torch.no_grad():
        for name, module in runner.model.named_modules():
            if isinstance(module, torch.nn.Linear) and ".layers." in name:
                w = module.weight
                scale = w.abs().amax(dim=1, keepdim=True) / (2 ** (bits - 1) - 1)
                w.copy_(torch.round(w / scale) * scale)


def test_fp16_against_itself_is_exactly_zero(cut: dict[str, Any], tmp_path: Path) -> None:
    from llmopt.evaluate import kld

    runner = _runner(cut["model"])
    try:
        ref = _reference(runner, cut, tmp_path / "ref")
        _, dist = kld.score_against(cut["windows"], runner.kld_compare, ref, batch_size=2)
    finally:
        runner.close()
    assert dist["tokens"] == sum(cut["tokens"])
    for key in ("kld_mean", "kld_median", "kld_p99", "kld_p999", "kld_max", "delta_p_mean", "delta_p_rms"):
        assert dist[key] == 0.0, key
    assert dist["top1_agreement"] == 1.0
    assert set(dist["window_kld"]) == {0.0}


def test_topk_is_a_tight_lower_bound_of_the_full_vocabulary_kl(cut: dict[str, Any], tmp_path: Path) -> None:
    import numpy as np
    import torch

    from llmopt.evaluate import kld

    runner = _runner(cut["model"])
    try:
        ref = _reference(runner, cut, tmp_path / "ref")
        base = [runner._log_probs([w.ids])[0][0, max(w.score_from, 1) - 1 :] for w in cut["windows"]]
        _quantize_in_place(runner)
        ppl, dist = kld.score_against(cut["windows"], runner.kld_compare, ref)
        art = [runner._log_probs([w.ids])[0][0, max(w.score_from, 1) - 1 :] for w in cut["windows"]]
        # the same per-token NLLs as plain perplexity scoring
        plain = runner.nll([w.ids for w in cut["windows"]], [w.score_from for w in cut["windows"]])
    finally:
        runner.close()
    full = torch.cat([(p.exp() * (p - q)).sum(-1) for p, q in zip(base, art, strict=True)]).double().numpy()
    agree = torch.cat([p.argmax(-1) == q.argmax(-1) for p, q in zip(base, art, strict=True)]).numpy()
    assert dist["kld_mean"] > 0.01  # a real difference, or the comparison below says nothing
    assert dist["kld_mean"] <= full.mean() + 1e-9
    assert dist["kld_mean"] == pytest.approx(full.mean(), rel=0.02)
    assert dist["kld_p99"] == pytest.approx(float(np.percentile(full, 99)), rel=0.05)
    assert dist["top1_agreement"] == pytest.approx(agree.mean(), abs=1.0 / len(agree))
    assert ppl.window_nll == pytest.approx([sum(r) / len(r) for r in plain], rel=1e-12)


def test_numbers_do_not_depend_on_batch_size(cut: dict[str, Any], tmp_path: Path) -> None:
    from llmopt.evaluate import kld

    runner = _runner(cut["model"])
    try:
        ref1 = _reference(runner, cut, tmp_path / "ref1", batch_size=1)
        ref3 = _reference(runner, cut, tmp_path / "ref3", batch_size=3)
        _quantize_in_place(runner)
        _, one = kld.score_against(cut["windows"], runner.kld_compare, ref1, batch_size=1)
        _, three = kld.score_against(cut["windows"], runner.kld_compare, ref3, batch_size=3)
    finally:
        runner.close()
    for key in ("kld_mean", "kld_median", "kld_p99", "kld_max", "top1_agreement", "delta_p_mean", "delta_p_rms"):
        assert three[key] == pytest.approx(one[key], rel=1e-4, abs=1e-7), key


def test_numpy_and_torch_arithmetic_agree(cut: dict[str, Any], tmp_path: Path) -> None:
    """llama.cpp's worker computes the same per-token values in numpy from raw logits."""
    import numpy as np
    import torch

    from llmopt.evaluate import kld

    runner = _runner(cut["model"])
    try:
        ref = _reference(runner, cut, tmp_path / "ref", k=64)
        _quantize_in_place(runner, bits=3)
        w = cut["windows"][1]
        start = max(w.score_from, 1) - 1
        with torch.inference_mode():
            logits = runner.model(input_ids=torch.tensor([w.ids])).logits[0, start:-1].float()
        targets = torch.tensor(w.ids[1:])[start:]
        rows = ref.window(1)[:3]
        kl_t, agree_t, nll_t = kld.compare_rows_torch(torch.log_softmax(logits, -1), targets, rows)
        kl_n, agree_n, nll_n = kld.compare_rows_numpy(logits.numpy(), targets.numpy(), rows, chunk=7)
    finally:
        runner.close()
    np.testing.assert_allclose(kl_n, kl_t, rtol=1e-4, atol=1e-6)
    np.testing.assert_allclose(nll_n, nll_t, rtol=1e-5, atol=1e-5)
    assert (agree_n == agree_t).mean() > 0.99


def test_different_vocabularies_are_refused() -> None:
    from llmopt.errors import EXIT_INPUT
    from llmopt.evaluate.kld import VocabularyMismatchError, check_vocab

    check_vocab(49152, 49152)
    with pytest.raises(VocabularyMismatchError) as err:
        check_vocab(49152, 49216)
    assert err.value.exit_code == EXIT_INPUT
    assert "49,152" in err.value.message and "--no-kld" in (err.value.hint or "")


def test_gpu_out_of_memory_names_the_setting_to_lower(cut: dict[str, Any], monkeypatch: pytest.MonkeyPatch) -> None:
    import torch

    from llmopt.errors import EXIT_UNAVAILABLE, DeviceMemoryError

    runner = _runner(cut["model"])

    def out_of_memory(windows: Any) -> Any:
        raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 24.00 GiB")

    monkeypatch.setattr(runner, "_log_probs", out_of_memory)
    try:
        with pytest.raises(DeviceMemoryError) as err:
            runner.kld_compare([cut["windows"][0].ids] * 4, [1] * 4, [None] * 4)
    finally:
        runner.close()
    assert err.value.exit_code == EXIT_UNAVAILABLE
    assert "4 window(s) of 128 tokens" in err.value.message
    assert "--batch-size" in (err.value.hint or "")


def test_recipe_keys_and_run_flags_for_the_kld_gates(tmp_path: Path) -> None:
    """gates.max_kld / gates.min_top1_pct in a recipe, per variant, and from `run --max-kld/--min-top1/--no-kld`."""
    from llmopt.recipe import apply_overrides, parse_recipe

    recipe = parse_recipe(
        {
            "model": {"source": "/models/smol"},
            "evaluation": {"dataset": "eval.txt"},
            "gates": {"max_kld": 0.05, "min_top1_pct": 90},
            "variants": [
                {"name": "int8", "method": "bnb-int8"},
                {"name": "nf4", "method": "bnb-nf4", "gate": {"max_kld": 0.2}},
            ],
        }
    )
    assert recipe.evaluation.kld is True
    int8, nf4 = recipe.variants
    assert recipe.gate_for(int8).max_kld == 0.05 and recipe.gate_for(nf4).max_kld == 0.2
    assert recipe.gate_for(nf4).min_top1_pct == 90 and recipe.gate_for(nf4).needs_distribution()
    over = apply_overrides(recipe, {"gates.max_kld": 0.01, "gates.min_top1_pct": None, "evaluation.kld": False})
    assert over.gate_for(int8).max_kld == 0.01 and over.gate_for(int8).min_top1_pct == 90
    assert over.evaluation.kld is False


def test_a_kld_gate_without_the_kld_is_refused_before_anything_loads(tmp_path: Path) -> None:
    from llmopt import api
    from llmopt.errors import InputError
    from llmopt.evaluate.gate import GateSpec

    with pytest.raises(InputError, match="--no-kld"):
        api.evaluate(tmp_path / "missing", "base", "text.txt", gate=GateSpec(min_top1_pct=90), kld=False)


def test_run_table_shows_kld_columns_only_when_measured() -> None:
    """The run table (terminal and report.md) gains mean KLD and top-1 columns when a variant carries them; a
    report without them keeps its old columns. Real numbers: the CPU main job of docs/results/run-cpu-kld."""
    from llmopt.report import TABLE_HEADER, load_report, render_markdown, table_header, table_rows
    from llmopt.results import RunReport

    root = Path(__file__).resolve().parents[1] / "docs" / "results"
    _, with_kld = load_report(root / "run-cpu-kld" / "report.json")
    _, without = load_report(root / "run-cpu" / "report.json")
    with_kld = with_kld if isinstance(with_kld, RunReport) else RunReport.model_validate(with_kld)
    without = without if isinstance(without, RunReport) else RunReport.model_validate(without)
    assert table_header(without) == TABLE_HEADER
    head = table_header(with_kld)
    assert head[4:6] == ["mean KLD", "top-1 agree"]
    rows = {r[0]: dict(zip(head, r, strict=True)) for r in table_rows(with_kld)}
    int8 = next(v for v in with_kld.variants if v.name == "bnb-int8")
    d = int8.evaluation.artifact.distribution  # type: ignore[union-attr]
    assert rows["bnb-int8"]["mean KLD"] == f"{d.kld_mean:.4f} ± {d.kld_stderr:.4f}"
    assert rows["bnb-int8"]["top-1 agree"] == f"{100 * d.top1_agreement:.2f}%"
    assert rows["FP16 baseline"]["mean KLD"] == "0 (reference)"
    assert "| mean KLD | top-1 agree |" in render_markdown(with_kld)


def _written(report: Any, out: Path) -> Any:
    from llmopt.report import write_report

    return write_report(report, out)


def test_kld_plot_next_to_perplexity_vs_size_and_linked_from_report_md(tmp_path: Path) -> None:
    """Issue 14, item 5: a run whose variants carry KL divergence gets a KLD distribution plot (one row per variant,
    from the stored percentiles), written after perplexity_vs_size.png and linked from report.md like it; a run
    without KLD gets none and a note saying why. Real numbers: docs/results/run-cpu-kld and run-cpu."""
    pytest.importorskip("matplotlib")
    from llmopt.report import KLD_PLOT, load_report

    root = Path(__file__).resolve().parents[1] / "docs" / "results"
    _, with_kld = load_report(root / "run-cpu-kld" / "report.json")
    written = _written(with_kld, tmp_path / "kld")
    assert written.files["plots"][:2] == ["plots/perplexity_vs_size.png", f"plots/{KLD_PLOT}"]
    assert (tmp_path / "kld" / "plots" / KLD_PLOT).stat().st_size > 1000
    assert f"![kld distribution](plots/{KLD_PLOT})" in (tmp_path / "kld" / "report.md").read_text()
    assert not any("KLD plot" in n for n in written.notes)

    _, without = load_report(root / "run-cpu" / "report.json")
    written = _written(without, tmp_path / "plain")
    assert (
        f"plots/{KLD_PLOT}" not in written.files["plots"] and "plots/perplexity_vs_size.png" in written.files["plots"]
    )
    assert not (tmp_path / "plain" / "plots" / KLD_PLOT).exists()
    note = "no KLD plot: no variant has KL-divergence measurements"
    assert note in written.notes and f"- {note}" in (tmp_path / "plain" / "report.md").read_text()


def test_kld_plot_of_a_variant_equal_to_fp16_and_one_without_kld(tmp_path: Path) -> None:
    """A variant whose KL divergence is 0 at every token (a log axis has no 0: said in words) next to a real one,
    and a variant evaluated with --no-kld (no row): the plot is still drawn; so it is for the 0 variant alone."""
    pytest.importorskip("matplotlib")
    from llmopt.report import KLD_PLOT, build_run_report
    from tests.evaldata import distribution, scored

    def evaluation(delta: float, kld: float | None) -> dict[str, Any]:
        ev = scored(delta)
        ev["artifact"].update(size_bytes=100)
        if kld is not None:
            dist = distribution(kld, ev["settings"])
            if kld == 0:
                dist.update({k: 0.0 for k in dist if k.startswith("kld_")}, window_kld=[0.0] * len(dist["window_kld"]))
            ev["artifact"]["distribution"] = dist
        return ev

    rows = [
        {"name": n, "method": "bnb-int8", "status": s, "evaluation": evaluation(d, k)}
        for n, s, d, k in (("same", "passed", 0.0, 0.0), ("nf4", "gate_failed", 9.0, 0.3), ("off", "passed", 1.0, None))
    ]
    report = build_run_report(recipe={"name": "r"}, variants=rows, output=tmp_path)
    written = _written(report, tmp_path)
    assert f"plots/{KLD_PLOT}" in written.files["plots"]
    assert (tmp_path / "plots" / KLD_PLOT).stat().st_size > 1000
    # nothing above 0 at all: a linear axis
    alone = build_run_report(recipe={"name": "r"}, variants=rows[:1], output=tmp_path / "alone")
    assert f"plots/{KLD_PLOT}" in _written(alone, tmp_path / "alone").files["plots"]


def test_kld_plot_of_hand_edited_numbers_never_costs_the_report(tmp_path: Path) -> None:
    """Percentiles are trusted as recorded, so a hand-edited report may hold inf, a negative stderr or a subnormal:
    the plot skips what it cannot draw (or is left out with a note), and report.json is always written."""
    pytest.importorskip("matplotlib")
    from llmopt.report import KLD_PLOT, build_run_report
    from tests.evaldata import distribution, scored

    def evaluation(**edits: float) -> dict[str, Any]:
        ev = scored(5.0)
        ev["artifact"].update(size_bytes=100)
        dist = distribution(0.2, ev["settings"])
        dist.update(edits)
        ev["artifact"]["distribution"] = dist
        return ev

    rows = [
        {"name": "inf-max", "method": "bnb-nf4", "status": "passed", "evaluation": evaluation(kld_max=float("inf"))},
        {"name": "neg-stderr", "method": "bnb-nf4", "status": "passed", "evaluation": evaluation(kld_stderr=-1e-4)},
        {"name": "x" * 80, "method": "bnb-nf4", "status": "passed", "evaluation": evaluation(kld_median=5e-324)},
    ]
    report = build_run_report(recipe={"name": "r"}, variants=rows, output=tmp_path)
    written = _written(report, tmp_path)
    assert f"plots/{KLD_PLOT}" in written.files["plots"]
    assert (tmp_path / "report.json").is_file() and (tmp_path / "report.md").is_file()
