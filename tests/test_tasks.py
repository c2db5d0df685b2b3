"""Downstream accuracy through lm-eval (llmopt/evaluate/tasks.py) on the real SmolLM2 cut to 2 layers, with the
shipped local task (tests/data/britannica_cloze/, real text) and --task-limit 8."""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

import pytest

from tests.helpers import first_layers, run_cli

pytest.importorskip("lm_eval", reason="needs the tasks extra: pip install -e '.[tasks]'")

ROOT = Path(__file__).resolve().parents[1]
CLOZE = ROOT / "tests" / "data" / "britannica_cloze" / "britannica_cloze.yaml"
LIMIT = 8


def test_recovery_and_its_paired_error() -> None:
    from llmopt.evaluate.tasks import recovery

    assert recovery([1, 0, 1, 1], [1, 0, 1, 1]) == (1.0, 0.0)
    # by hand: R = (2/4) / (3/4) = 2/3; residuals a - R b = 1/3, 0, -2/3, 1/3 -> sum of squares 2/3;
    # se = sqrt((2/3) / (4 * 3)) / (3/4)
    r, se = recovery([1, 0, 0, 1], [1, 0, 1, 1])
    assert r == pytest.approx(2 / 3)
    assert se == pytest.approx(math.sqrt((2 / 3) / 12) / 0.75)
    assert recovery([1, 1], [0, 0]) == (None, None)  # FP16 scored 0: no ratio
    assert recovery([1], [1]) == (1.0, None)  # one example: no error
    assert recovery([1, 0], [1]) == (None, None)  # not the same examples


def test_shipped_task_is_what_the_script_builds(assets: dict[str, Path]) -> None:
    """tests/data/britannica_cloze/ follows from the real text and the seed; every label points at the answer."""
    import importlib.util

    spec = importlib.util.spec_from_file_location("build_cloze_task", ROOT / "scripts" / "build_cloze_task.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    docs = module.build(assets["eval_text"].read_text(encoding="utf-8"), 200, 0)
    shipped = [json.loads(line) for line in CLOZE.with_suffix(".jsonl").read_text().splitlines()]
    assert docs == shipped and 150 <= len(shipped) <= 200
    flat = " ".join(assets["eval_text"].read_text(encoding="utf-8").split())
    for doc in shipped:
        assert len(doc["choices"]) == len(set(doc["choices"])) == 4 and 0 <= doc["label"] < 4
        assert f"{doc['context']} {doc['choices'][doc['label']]}" in flat


def test_plan_of_the_local_task() -> None:
    from llmopt.evaluate.tasks import plan_tasks

    plan = plan_tasks([str(CLOZE)], LIMIT)
    again = plan_tasks([str(CLOZE)], LIMIT)
    assert plan.names == ["britannica_cloze"] and plan.harness.startswith("lm-eval 0.4.")
    assert plan.files_sha256 is not None and plan.identity() == again.identity()
    task = plan.load()["tasks"]["britannica_cloze"]
    assert len(task.eval_docs) == len(CLOZE.with_suffix(".jsonl").read_text().splitlines())


@pytest.fixture(scope="module")
def cut(assets: dict[str, Path], tmp_path_factory: pytest.TempPathFactory) -> Path:
    return first_layers(assets["model"], tmp_path_factory.mktemp("tasks") / "smol-2l", 2)


def test_a_model_against_itself_recovers_exactly_one(cut: Path) -> None:
    from llmopt.evaluate.tasks import compare, plan_tasks, primary_metric, run_tasks
    from llmopt.runners.hf import HFRunner

    plan = plan_tasks([str(CLOZE)], LIMIT)
    runner = HFRunner(cut, "cpu")
    try:
        report = run_tasks(runner.causal_lm(), cut, plan)
    finally:
        runner.close()
    assert {s.metric for s in report.scores} == {"acc", "acc_norm"}
    for s in report.scores:
        assert s.n == LIMIT and s.doc_ids == list(range(LIMIT)) and s.examples is not None
        assert set(s.examples) <= {0.0, 1.0} and s.value == pytest.approx(sum(s.examples) / LIMIT)
        assert s.stderr is not None and s.stderr >= 0
    top = primary_metric(report.scores, "britannica_cloze")
    assert top is not None and top.metric == "acc_norm"
    for c in compare(report, report):
        if c.baseline > 0:
            assert c.recovery == 1.0 and c.recovery_stderr == 0.0
        assert c.primary == (c.metric == "acc_norm")


@pytest.fixture(scope="module")
def evaluated(cut: Path, assets: dict[str, Path], tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    """The 2-layer cut in bitsandbytes int8, evaluated with the cloze task on both models."""
    pytest.importorskip("bitsandbytes")
    from llmopt import api
    from llmopt.specs import EvalSpec, GateSpec

    art = api.quantize(str(cut), "bnb-int8", tmp_path_factory.mktemp("tasks-art") / "int8", device="cpu")
    spec = EvalSpec(
        dataset=str(assets["eval_text"]),
        context_length=128,
        max_tokens=256,
        device="cpu",
        kld=False,
        tasks=[str(CLOZE)],
        task_limit=LIMIT,
    )
    report = api.evaluate(art.path, str(cut), spec, gate=GateSpec(min_recovery=0.01))
    return {"path": art.path, "report": report, "spec": spec, "model": cut}


def test_eval_runs_tasks_on_both_models_and_records_them(evaluated: dict[str, Any]) -> None:
    from llmopt.artifact import Artifact
    from llmopt.evaluate.tasks import compare

    report = evaluated["report"]
    base, art = report.baseline.tasks, report.artifact.tasks
    assert base is not None and art is not None and base.cached is False
    assert art.requested == [str(CLOZE)] and art.limit == LIMIT and art.not_run is None
    assert [s.doc_ids for s in base.scores] == [s.doc_ids for s in art.scores]
    assert report.task_recovery == compare(base, art) and len(report.task_recovery) == 2
    check = report.gate.checks[0]
    primary = next(c for c in report.task_recovery if c.primary)
    assert check.name == "min_recovery:britannica_cloze" and check.value == primary.recovery
    assert check.margin == pytest.approx(primary.recovery - 0.01) and check.passed
    # recorded in the manifest, and the stored evaluation's spec answers the one asked for (reuse)
    stored = Artifact.open(evaluated["path"]).manifest.evaluation
    assert stored is not None and stored.task_recovery == report.task_recovery
    assert stored.spec().same_measurement(evaluated["spec"], "cpu")
    assert not stored.spec().same_measurement(evaluated["spec"].model_copy(update={"task_limit": 9}), "cpu")


def test_baseline_task_scores_come_from_the_cache(evaluated: dict[str, Any]) -> None:
    from llmopt import api

    again = api.evaluate(evaluated["path"], str(evaluated["model"]), evaluated["spec"], write_manifest=False)
    assert again.baseline.cached and again.baseline.tasks is not None and again.baseline.tasks.cached
    assert again.baseline.tasks.scores == evaluated["report"].baseline.tasks.scores
    assert again.task_recovery == evaluated["report"].task_recovery


def test_min_recovery_gate_fails_below_the_threshold(evaluated: dict[str, Any]) -> None:
    from llmopt.evaluate.gate import apply_gate, evaluation_problems
    from llmopt.specs import GateSpec

    report = evaluated["report"]
    primary = next(c for c in report.task_recovery if c.primary)
    gate = apply_gate(GateSpec(min_recovery=primary.recovery + 0.5), report)
    (check,) = gate.checks
    assert not gate.passed and check.margin == pytest.approx(-0.5)
    assert "short by 0.500" in check.message and "britannica_cloze acc_norm recovery" in check.message
    assert evaluation_problems(report, gate) == []
    # no tasks measured: the check fails and says why, never passes on nothing
    bare = report.model_copy(update={"task_recovery": None})
    bare.artifact = bare.artifact.model_copy(update={"tasks": None})
    (missing,) = apply_gate(GateSpec(min_recovery=0.9), bare).checks
    assert not missing.passed and missing.value is None and "--tasks" in missing.message


def test_edited_task_numbers_do_not_add_up(evaluated: dict[str, Any]) -> None:
    from llmopt.evaluate.gate import evaluation_problems

    data = evaluated["report"].to_json()
    data["task_recovery"][0]["recovery"] = 5.0
    assert any("task_recovery" in w for w in evaluation_problems(data))
    assert evaluation_problems(evaluated["report"].to_json()) == []  # lm-eval's own numbers add up


@pytest.mark.parametrize(
    ("edit", "says"),
    [
        (lambda t, s: s.update(n=800), "n is 800"),  # the card would claim 800 examples
        (lambda t, s: (s.update(n=800), t.update(limit=None)), "n is 800"),
        (lambda t, s: s.update(stderr=0.001), "stderr is 0.001"),  # a flattering error bar
        (lambda t, s: s.update(value=0.99), "value is 0.99"),
    ],
)
def test_edited_task_scores_do_not_add_up(evaluated: dict[str, Any], edit: Any, says: str) -> None:
    """A hostile tester raised n, dropped the limit and shrank a stderr in llmopt.json: the card printed them."""
    from llmopt.evaluate.gate import evaluation_problems

    data = evaluated["report"].to_json()
    tasks = data["artifact"]["tasks"]
    score = next(s for s in tasks["scores"] if s["metric"] == "acc_norm")
    edit(tasks, score)
    assert any(says in w for w in evaluation_problems(data)), evaluation_problems(data)


@pytest.mark.e2e
def test_cli_eval_shows_the_tasks_and_gates_with_exit_3(
    evaluated: dict[str, Any], assets: dict[str, Path], tmp_path: Path
) -> None:
    out = tmp_path / "eval.json"
    proc = run_cli(
        ["eval", str(evaluated["path"]), "--baseline", str(evaluated["model"]), "--dataset", str(assets["eval_text"]),
         "--context", "128", "--max-tokens", "256", "--device", "cpu", "--no-kld", "--tasks", str(CLOZE),
         "--task-limit", str(LIMIT), "--min-recovery", "50", "--json-file", str(out)]
    )  # fmt: skip
    assert proc.returncode == 3, proc.stderr
    assert "downstream accuracy" in proc.stdout and "britannica_cloze" in proc.stdout and "acc_norm *" in proc.stdout
    assert "gate failed" in proc.stderr and "needs 50" in proc.stderr
    report = json.loads(out.read_text())
    assert report["artifact"]["tasks"]["scores"][0]["n"] == LIMIT
    assert report["gate"]["checks"][0]["name"] == "min_recovery:britannica_cloze"
    assert [c["primary"] for c in report["task_recovery"]] == [False, True]


def test_model_card_puts_task_scores_in_model_index(evaluated: dict[str, Any]) -> None:
    """The card's YAML carries each task metric (and the recovery the gate read) where the Hub reads evaluation
    results, and its body the accuracy table; a local task is named, never its folder."""
    hf = pytest.importorskip("huggingface_hub")
    from llmopt.artifact import Artifact
    from llmopt.model_card import render_card

    card = render_card(Artifact.open(evaluated["path"]), "org/smol-x")
    data = hf.ModelCard(card).data
    tasks = {(r.dataset_type, r.metric_type): r for r in data.eval_results if r.dataset_type == "britannica_cloze"}
    report = evaluated["report"]
    acc_norm = next(s for s in report.artifact.tasks.scores if s.metric == "acc_norm")
    primary = next(c for c in report.task_recovery if c.primary)
    assert set(tasks) == {("britannica_cloze", m) for m in ("acc", "acc_norm", "acc_norm_recovery")}
    assert tasks["britannica_cloze", "acc_norm"].metric_value == pytest.approx(acc_norm.value)
    assert tasks["britannica_cloze", "acc_norm"].metric_args["n"] == LIMIT
    assert tasks["britannica_cloze", "acc_norm_recovery"].metric_value == pytest.approx(primary.recovery, abs=1e-6)
    assert tasks["britannica_cloze", "acc"].dataset_revision == report.artifact.tasks.files_sha256
    assert "| britannica_cloze | acc_norm | 8 |" in card and str(ROOT) not in card


def test_run_report_table_has_a_column_per_task(evaluated: dict[str, Any], tmp_path: Path) -> None:
    from llmopt.report import build_run_report, render_markdown, table_header, table_rows
    from llmopt.results import VariantOutcome

    report = evaluated["report"]
    row = VariantOutcome(name="int8", method="bnb-int8", status="passed", evaluation=report, gate=report.gate)
    gguf_eval = report.model_copy(deep=True, update={"task_recovery": None})
    gguf_eval.artifact.tasks = gguf_eval.artifact.tasks.model_copy(update={"scores": [], "not_run": "not for gguf: x"})
    gguf = VariantOutcome(name="q4", method="gguf", status="passed", evaluation=gguf_eval)
    run = build_run_report(recipe={"name": "t"}, variants=[row, gguf], output=tmp_path)
    header = table_header(run)
    col = header.index("britannica_cloze acc_norm")
    rows = table_rows(run)
    primary = next(c for c in report.task_recovery if c.primary)
    base_score = next(s for s in report.baseline.tasks.scores if s.metric == "acc_norm")
    assert rows[0][col] == f"{base_score.value:.3f} ± {base_score.stderr:.3f}"
    assert rows[1][col].startswith(f"{primary.artifact:.3f} (recovery {primary.recovery:.3f}")
    assert rows[2][col] == "not for gguf"
    md = render_markdown(run)
    assert "britannica_cloze acc_norm" in md and "recovery = variant / FP16" in md
    # a GGUF variant first (its FP16 side ran no tasks): FP16's row still shows FP16's accuracy
    gguf_eval.baseline = gguf_eval.baseline.model_copy(update={"tasks": None})
    first_gguf = build_run_report(recipe={"name": "t"}, variants=[gguf, row], output=tmp_path)
    assert table_rows(first_gguf)[0][col] == f"{base_score.value:.3f} ± {base_score.stderr:.3f}"


@pytest.mark.e2e
def test_run_recipe_with_tasks_gates_and_reuses(cut: Path, assets: dict[str, Path], tmp_path: Path) -> None:
    """`llmopt run` with evaluation.tasks and gates.min_recovery: the variant's task scores, its gate check and the
    report column; a second run reuses the stored evaluation (task scores included) instead of scoring again."""
    pytest.importorskip("bitsandbytes")
    from llmopt.pipeline import run_recipe
    from llmopt.recipe import parse_recipe

    recipe = parse_recipe(
        {
            "name": "tasks",
            "model": {"source": str(cut)},
            "evaluation": {"dataset": str(assets["eval_text"]), "context_length": 128, "max_tokens": 256,
                           "device": "cpu", "kld": False, "tasks": str(CLOZE), "task_limit": LIMIT},
            "gates": {"min_recovery": 0.01},
            "variants": [{"name": "int8", "method": "bnb-int8"}],
        }
    )  # fmt: skip
    first = run_recipe(recipe, output=tmp_path / "out")
    (v,) = first.variants
    assert v.status == "passed", v.gate
    assert v.evaluation is not None and v.evaluation_reused is False
    assert [c.name for c in v.gate.checks] == ["min_recovery:britannica_cloze"]
    assert v.evaluation.artifact.tasks.scores[0].n == LIMIT
    assert "britannica_cloze acc_norm" in (tmp_path / "out" / "report.md").read_text()
    again = run_recipe(recipe, output=tmp_path / "out")
    assert again.variants[0].evaluation_reused is True
    assert again.variants[0].evaluation.task_recovery == v.evaluation.task_recovery
