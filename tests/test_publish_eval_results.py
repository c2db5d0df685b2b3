"""``llmopt publish --benchmark TASK=DATASET_ID:TASK_ID``: a task's score as a Hub benchmark result
(``.eval_results/TASK.yaml``, https://huggingface.co/docs/hub/eval-results) in the same commit as the weights and
card; refused, with nothing sent, whenever the stored evaluation does not hold that score for this artifact.

The real huggingface_hub client talks HTTP to the local stand-in of the Hub (tests/hubserver.py)."""

from __future__ import annotations

import json
import math
import statistics
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest
import yaml

from llmopt.artifact import Artifact
from llmopt.evaluate.gate import GateSpec, apply_gate
from llmopt.evaluate.tasks import compare
from llmopt.results import TaskScore, TasksReport
from tests.hubserver import HubServer
from tests.test_publish import hub, make_artifact, run_cli

pytest.importorskip("huggingface_hub")

__all__ = ["hub"]  # the stand-in Hub fixture, shared with test_publish.py

REPO = "test-org/smol-int8"
ARC = "arc_easy=allenai/ai2_arc:ARC-Easy"
HARNESS = "lm-eval 0.4.9"
LOCAL_SHA = "5e" * 32


def _score(task: str, metric: str, examples: list[float], dataset: str, config: str | None) -> TaskScore:
    """A task score whose value and stderr follow from its per-example values (as lm-eval's do)."""
    n = len(examples)
    return TaskScore(
        task=task,
        metric=metric,
        value=statistics.fmean(examples),
        stderr=statistics.stdev(examples) / math.sqrt(n),
        n=n,
        higher_is_better=True,
        dataset=dataset,
        dataset_config=config,
        doc_ids=list(range(n)),
        examples=examples,
    )


def _side(hits: dict[str, int], n: int, *, local: bool, limit: int | None) -> TasksReport:
    """One model's task scores: arc_easy (acc and acc_norm, the primary) and hellaswag (acc_norm), ``hits`` right
    answers of ``n`` per task."""
    scores = []
    for task, dataset, config in (("arc_easy", "allenai/ai2_arc", "ARC-Easy"), ("hellaswag", "Rowan/hellaswag", None)):
        if local:
            dataset, config = "json", None
        right = hits[task]
        norm = [1.0] * right + [0.0] * (n - right)
        acc = [1.0] * max(right - 1, 0) + [0.0] * (n - max(right - 1, 0))
        if task == "arc_easy":
            scores.append(_score(task, "acc", acc, dataset, config))
        scores.append(_score(task, "acc_norm", norm, dataset, config))
    return TasksReport(
        requested=["tasks.yaml"] if local else ["arc_easy", "hellaswag"],
        limit=limit,
        harness=HARNESS,
        files_sha256=LOCAL_SHA if local else None,
        scores=scores,
    )


def make_task_artifact(
    root: Path, *, local: bool = False, limit: int | None = None, not_run: str | None = None, n: int = 40
) -> Path:
    """A gated artifact (tests/test_publish.make_artifact) whose stored evaluation also ran two lm-eval tasks on
    both models, its recoveries and gate derived from those scores as api.evaluate derives them."""
    path = make_artifact(root, fmt="gptq", backend="gptq", options={"bits": 4, "group_size": 128})
    art = Artifact.open(path)
    ev = art.manifest.evaluation
    assert ev is not None and art.manifest.gate is not None
    base = _side({"arc_easy": 32, "hellaswag": 24}, n, local=local, limit=limit)
    mine = _side({"arc_easy": 31, "hellaswag": 22}, n, local=local, limit=limit)
    ev.baseline.tasks = base
    if not_run:
        ev.artifact.tasks = TasksReport(requested=base.requested, harness=HARNESS, not_run=not_run)
    else:
        ev.artifact.tasks = mine
        ev.task_recovery = compare(base, mine)
    spec = art.manifest.gate.spec or GateSpec()
    art.manifest.gate = apply_gate(spec, ev).model_copy(update={"spec": spec})
    art.manifest.evaluation = ev
    art.save()
    return path


def uploaded(hub: HubServer) -> dict[str, bytes]:
    commits = hub.commits(REPO)
    assert len(commits) == 2  # the repo's initial commit, then ours
    return commits[-1].files


def test_result_goes_up_in_the_same_commit(tmp_path: Path, hub: HubServer, capsys: pytest.CaptureFixture[str]) -> None:
    art = make_task_artifact(tmp_path)
    code = run_cli(
        ["publish", str(art), REPO, "--benchmark", ARC, "--benchmark", "hellaswag=Rowan/hellaswag:default"]
    )
    assert code == 0, capsys.readouterr().err
    files = uploaded(hub)
    assert {".eval_results/arc_easy.yaml", ".eval_results/hellaswag.yaml", "model.safetensors", "README.md"} <= set(
        files
    )

    raw = files[".eval_results/arc_easy.yaml"].decode()
    notes_line = next(li for li in raw.splitlines() if li.strip().startswith("notes:"))
    assert "FP16 baseline" in notes_line  # one line in the file too, not folded
    entries = yaml.safe_load(raw)
    assert isinstance(entries, list) and len(entries) == 1
    entry = entries[0]
    assert entry["dataset"] == {"id": "allenai/ai2_arc", "task_id": "ARC-Easy"}  # no revision: none was recorded
    assert entry["value"] == 77.5  # this model's acc_norm (31/40), the metric the recovery reads, in %
    assert "verifyToken" not in entry and "date" not in entry
    assert entry["source"]["url"] == f"{hub.url}/{REPO}/blob/main/llmopt.json"
    notes = entry["notes"]
    assert "\n" not in notes
    assert f"{HARNESS} arc_easy acc_norm, n=40" in notes
    assert "data allenai/ai2_arc (ARC-Easy)" in notes
    assert "4-bit gptq g128 quantized by llmopt" in notes
    assert "FP16 baseline 80.00 (recovery 0.969)" in notes  # 32/40; 31/32

    hella = yaml.safe_load(files[".eval_results/hellaswag.yaml"])[0]
    assert hella["dataset"] == {"id": "Rowan/hellaswag", "task_id": "default"} and hella["value"] == 55.0

    card = files["README.md"].decode()
    line = next(li for li in card.splitlines() if "`.eval_results/`" in li)
    assert "arc_easy acc_norm as [allenai/ai2_arc]" in line and "`ARC-Easy`" in line and "hellaswag" in line
    table_end = card.index("| hellaswag | acc_norm |")
    assert table_end < card.index(line)  # under the task table


def test_without_benchmark_nothing_goes_to_eval_results(tmp_path: Path, hub: HubServer) -> None:
    art = make_task_artifact(tmp_path)
    assert run_cli(["publish", str(art), REPO]) == 0
    files = uploaded(hub)
    assert not [p for p in files if p.startswith(".eval_results")]
    assert ".eval_results" not in files["README.md"].decode()


def test_dry_run_lists_the_result_files(tmp_path: Path, hub: HubServer, capsys: pytest.CaptureFixture[str]) -> None:
    art = make_task_artifact(tmp_path)
    assert run_cli(["publish", str(art), REPO, "--dry-run", "--benchmark", ARC]) == 0
    out = capsys.readouterr().out
    assert ".eval_results/arc_easy.yaml" in out and "allenai/ai2_arc task ARC-Easy = 77.5" in out
    assert hub.requests == []

    assert run_cli(["publish", str(art), REPO, "--dry-run", "--json", "--benchmark", ARC]) == 0
    result = json.loads(capsys.readouterr().out)
    assert ".eval_results/arc_easy.yaml" in [f["path"] for f in result["files"]]
    assert result["eval_results"][0]["entry"]["value"] == 77.5


def test_branch_points_the_source_at_the_branch(tmp_path: Path, hub: HubServer) -> None:
    art = make_task_artifact(tmp_path)
    assert run_cli(["publish", str(art), "test-org/smol", "--revision", "gptq/4bit", "--benchmark", ARC]) == 0
    files = hub.commits("test-org/smol", "gptq/4bit")[-1].files
    entry = yaml.safe_load(files[".eval_results/arc_easy.yaml"])[0]
    assert entry["source"]["url"].endswith("/test-org/smol/blob/gptq%2F4bit/llmopt.json")


def _refused(capsys: pytest.CaptureFixture[str], hub: HubServer, code: int, *needles: str) -> None:
    err = capsys.readouterr().err
    assert code == 2, err
    assert "Traceback" not in err
    for needle in needles:
        assert needle in err, err
    assert hub.requests == []  # checked before any network call: not even the repo is created


@pytest.mark.parametrize(
    ("mappings", "needles"),
    [
        (["piqa=ybisk/piqa:default"], ["did not run that task; it ran: arc_easy, hellaswag", "--tasks piqa"]),
        (["arc_easy"], ["has no '='", "TASK=DATASET_ID:TASK_ID"]),
        (["arc_easy=allenai/ai2_arc"], ["names no task id"]),
        (["arc_easy=allenai/ai2_arc:"], ["names no task id"]),
        (["arc_easy=allenai/ai2--arc:ARC-Easy"], ["not a valid Hub repo id"]),
        (["arc_easy=:ARC-Easy"], ["not a valid Hub repo id"]),
        (["=allenai/ai2_arc:ARC-Easy"], ["is not an lm-eval task name"]),
        (["../x=allenai/ai2_arc:ARC-Easy"], ["is not an lm-eval task name"]),
        ([ARC, "arc_easy=allenai/ai2_arc:ARC-Challenge"], ["task 'arc_easy' is mapped twice"]),
        (["arc_easy=https://huggingface.co/datasets/allenai/ai2_arc:ARC-Easy"], ["an address, not a Hub dataset id"]),
        (["arc_easy=hf://allenai/ai2_arc:ARC-Easy"], ["an address, not a Hub dataset id"]),
    ],
)
def test_refusals_send_nothing(
    tmp_path: Path, hub: HubServer, capsys: pytest.CaptureFixture[str], mappings: list[str], needles: list[str]
) -> None:
    art = make_task_artifact(tmp_path)
    args = [a for m in mappings for a in ("--benchmark", m)]
    _refused(capsys, hub, run_cli(["publish", str(art), REPO, *args]), *needles)


def test_no_score_for_this_artifact_is_refused(
    tmp_path: Path, hub: HubServer, capsys: pytest.CaptureFixture[str]
) -> None:
    art = make_task_artifact(tmp_path, not_run="not for gguf: lm-eval runs on a transformers model")
    _refused(capsys, hub, run_cli(["publish", str(art), REPO, "--benchmark", ARC]), "not for gguf", "no task score")
    assert run_cli(["publish", str(art), REPO, "--dry-run"]) == 0  # without the mapping it publishes as before


def test_evaluation_without_tasks_is_refused(
    tmp_path: Path, hub: HubServer, capsys: pytest.CaptureFixture[str]
) -> None:
    art = make_artifact(tmp_path)
    _refused(capsys, hub, run_cli(["publish", str(art), REPO, "--benchmark", ARC]), "ran no lm-eval tasks")


def test_a_subset_of_the_examples_is_refused(
    tmp_path: Path, hub: HubServer, capsys: pytest.CaptureFixture[str]
) -> None:
    art = make_task_artifact(tmp_path, limit=40)
    _refused(capsys, hub, run_cli(["publish", str(art), REPO, "--benchmark", ARC]), "first 40 examples only")


def test_a_limit_above_the_task_size_is_the_whole_task(tmp_path: Path, hub: HubServer) -> None:
    art = make_task_artifact(tmp_path, limit=100)
    assert run_cli(["publish", str(art), REPO, "--benchmark", ARC]) == 0
    assert ".eval_results/arc_easy.yaml" in uploaded(hub)


def test_local_task_needs_the_users_word(tmp_path: Path, hub: HubServer, capsys: pytest.CaptureFixture[str]) -> None:
    art = make_task_artifact(tmp_path, local=True)
    _refused(
        capsys,
        hub,
        run_cli(["publish", str(art), REPO, "--benchmark", ARC]),
        "it is a local task",
        LOCAL_SHA,
        "--benchmark-local-data",
    )
    assert run_cli(["publish", str(art), REPO, "--benchmark", ARC, "--benchmark-local-data"]) == 0
    entry = yaml.safe_load(uploaded(hub)[".eval_results/arc_easy.yaml"])[0]
    assert entry["value"] == 77.5
    assert f"data a local copy (task files sha256 {LOCAL_SHA})" in entry["notes"]


def test_gguf_one_repo_layout_refuses_benchmarks(
    tmp_path: Path, hub: HubServer, capsys: pytest.CaptureFixture[str]
) -> None:
    art = make_task_artifact(tmp_path)
    code = run_cli(["publish", str(art), "test-org/smol-GGUF", "--layout", "gguf-one-repo", "--benchmark", ARC])
    _refused(capsys, hub, code, "one score per benchmark task per repo")


# --- the recipe's publish.benchmarks ----------------------------------------------------------------


def _recipe(root: Path, publish: dict[str, Any], evaluation: dict[str, Any] | None = None) -> Path:
    model = root / "model"
    model.mkdir(exist_ok=True)
    text = root / "eval.txt"
    text.write_text("some text\n")
    data = {
        "model": {"source": str(model)},
        "evaluation": {
            k: v
            for k, v in {"dataset": str(text), "tasks": ["arc_easy", "hellaswag"], **(evaluation or {})}.items()
            if v is not None  # None: the key left out
        },
        "gates": {"max_ppl_increase_pct": 5},
        "variants": [{"name": "gptq-4bit", "method": "gptq", "options": {"bits": 4, "group_size": 128}}],
        "calibration": {"dataset": str(text)},
        "publish": {"repo_id": "test-org/smol-{variant}", **publish},
    }
    path = root / "recipe.yaml"
    path.write_text(yaml.safe_dump(data))
    return path


def test_recipe_benchmarks_reach_the_hub(tmp_path: Path, hub: HubServer) -> None:
    from llmopt.pipeline import _publish
    from llmopt.progress import SilentReporter
    from llmopt.recipe import load_recipe

    recipe = load_recipe(_recipe(tmp_path, {"benchmarks": {"arc_easy": "allenai/ai2_arc:ARC-Easy"}}))
    assert recipe.publish is not None and recipe.publish.benchmarks == {"arc_easy": "allenai/ai2_arc:ARC-Easy"}
    art = Artifact.open(make_task_artifact(tmp_path / "run"))
    ctx = SimpleNamespace(recipe=recipe, org="test-org", reporter=SilentReporter())
    result = _publish(ctx, recipe.variants[0], art)  # type: ignore[arg-type]
    assert result["repo_id"] == "test-org/smol-gptq-4bit"
    files = hub.commits("test-org/smol-gptq-4bit")[-1].files
    entry = yaml.safe_load(files[".eval_results/arc_easy.yaml"])[0]
    assert entry["dataset"] == {"id": "allenai/ai2_arc", "task_id": "ARC-Easy"} and entry["value"] == 77.5
    assert ".eval_results/hellaswag.yaml" not in files


@pytest.mark.parametrize(
    ("publish", "evaluation", "needle"),
    [
        ({"benchmarks": {"arc_easy": "allenai/ai2_arc"}}, None, "names no task id"),
        ({"benchmarks": {"arc_easy": "bad--id:x"}}, None, "not a valid Hub repo id"),
        ({"benchmarks": {"arc_easy": ":x"}}, None, "not a valid Hub repo id"),
        ({"benchmarks": {"arc_easy": "allenai/ai2_arc:ARC-Easy"}}, {"tasks": None}, "evaluation.tasks runs none"),
        ({"benchmarks": {"arc_easy": "allenai/ai2_arc:ARC-Easy"}}, {"task_limit": 50}, "drop task_limit"),
        ({"benchmark": {"arc_easy": "allenai/ai2_arc:ARC-Easy"}}, None, "benchmark"),  # a typo of the key
    ],
)
def test_recipe_benchmarks_are_checked_when_loaded(
    tmp_path: Path, publish: dict[str, Any], evaluation: dict[str, Any] | None, needle: str
) -> None:
    from llmopt.errors import RecipeError
    from llmopt.recipe import load_recipe

    with pytest.raises(RecipeError) as info:
        load_recipe(_recipe(tmp_path, publish, evaluation))
    assert needle in info.value.message + (info.value.hint or "")


def test_recipe_gguf_one_repo_refuses_benchmarks() -> None:
    from pydantic import ValidationError

    from llmopt.recipe import PublishSpec

    with pytest.raises(ValidationError, match="one score per benchmark task per repo"):
        PublishSpec.model_validate(
            {"mode": "gguf-one-repo", "benchmarks": {"arc_easy": "allenai/ai2_arc:ARC-Easy"}}
        )
    assert PublishSpec.model_validate({"mode": "gguf-one-repo"}).benchmarks == {}


def test_a_task_id_with_markup_is_printed_as_given(
    tmp_path: Path, hub: HubServer, capsys: pytest.CaptureFixture[str]
) -> None:
    """The terminal shows what goes up: brackets in a task id are text, not markup (was a crash after uploading)."""
    art = make_task_artifact(tmp_path)
    assert run_cli(["publish", str(art), REPO, "--dry-run", "--benchmark", "arc_easy=allenai/ai2_arc:[bold]X[/]"]) == 0
    assert "task [bold]X[/] =" in capsys.readouterr().out


def test_recipe_benchmark_names_are_kept_as_parsed(tmp_path: Path) -> None:
    """Spaces around a recipe's task name or target are dropped when it loads, as on the command line, so the run
    compares the same names evaluation.tasks runs."""
    from llmopt.recipe import load_recipe

    recipe = load_recipe(_recipe(tmp_path, {"benchmarks": {" arc_easy ": " allenai/ai2_arc : ARC-Easy "}}))
    assert recipe.publish is not None and recipe.publish.benchmarks == {"arc_easy": "allenai/ai2_arc:ARC-Easy"}
