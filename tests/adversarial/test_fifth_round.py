"""What a hostile tester found in the fifth round: a run folder that holds the run's own inputs (under names the run
writes), variant names that differ only by case, a comma string where a list is expected and quoted numbers, an
edited artifact manifest found only when its variant's turn came, relative paths that did not say where they were
read from, and an interrupt during the speed measurement that lost the variant's finished scores."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest

from llmopt.errors import EXIT_ARTIFACT, EXIT_INPUT, ArtifactError, DataError, ModelError, OutputPathError, RecipeError
from tests.helpers import cli_in_process, fake_model, first_layers

RECIPE = """\
model:
  source: {model}
evaluation:
  dataset: {text}
  context_length: 16
  max_tokens: 32
  device: cpu
gates:
  max_ppl_increase_pct: 50
variants:
  - name: a
    method: bnb-int8
  - name: b
    method: bnb-int8
    options: {{llm_int8_threshold: 5.0}}
"""

SPEED = "  throughput: {batch_sizes: [1], prompt_lens: [8], gen_len: 2, warmup: 0, repetitions: 1}\n"


@pytest.fixture(scope="module")
def small(assets: dict[str, Path], tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """SmolLM2 cut to two decoder layers and 4,000 characters of the eval text."""
    pytest.importorskip("bitsandbytes")
    root = tmp_path_factory.mktemp("fifth")
    model = first_layers(assets["model"], root / "m2", 2)
    text = root / "eval.txt"
    text.write_text(assets["eval_text"].read_text()[:4000])
    return {"model": model, "text": text}


def _recipe(path: Path, model: str | Path, text: str | Path, extra: str = "") -> Path:
    body = RECIPE.format(model=model, text=text)
    if extra:
        body = body.replace("  device: cpu\n", "  device: cpu\n" + extra)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(body)
    return path


# --- 1. inputs among the names the run writes -----------------------------------------------------------------


def test_input_under_a_name_the_run_writes_is_refused_before_any_work(tmp_path: Path) -> None:
    """`-o runs --overwrite` where the evaluation text is runs/report.md (or a file in runs/plots/, or in the
    artifact folder of one of the variants): the run would overwrite or delete it. Refused before any work (exit 2),
    naming the input; the file and the folder are as they were."""
    from llmopt.pipeline import run_recipe

    model = fake_model(tmp_path / "model")
    for rel in ("report.md", "plots/eval.txt", "artifacts/b/eval.txt", "serving/eval.txt"):
        out = tmp_path / f"runs-{rel.split('/')[0]}"
        text = out / rel
        text.parent.mkdir(parents=True)
        text.write_text("The quick brown fox. " * 50)
        recipe = _recipe(tmp_path / "r.yaml", model, text)
        with pytest.raises(OutputPathError) as info:
            run_recipe(recipe, output=out, overwrite=True)
        assert info.value.exit_code == EXIT_INPUT
        assert str(text) in info.value.message and "(evaluation.dataset)" in info.value.message, info.value.message
        assert "overwrite or delete it" in info.value.message and "Move" in str(info.value.hint)
        assert text.read_text().startswith("The quick brown fox.")
        assert not (out / ".llmopt-run").exists() and not (out / "report.json").exists()


def test_inputs_elsewhere_in_the_run_folder_are_not_refused(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """`-o . --overwrite` in a folder that holds the model and the text under names of their own: the run writes
    only its names, so nothing is lost and the run goes on (here to its per-variant quantize of a weightless model)."""
    from llmopt import pipeline

    monkeypatch.chdir(tmp_path)
    fake_model(tmp_path / "model")
    (tmp_path / "eval.txt").write_text("The quick brown fox. " * 50)
    _recipe(tmp_path / "r.yaml", "model", "eval.txt")
    seen: list[str] = []
    monkeypatch.setattr(pipeline, "_check_backends", lambda selected: seen.append("past the output checks"))
    monkeypatch.setattr(pipeline, "_run_variant", lambda ctx, v, publish: pipeline.not_run_outcome(v))
    pipeline.run_recipe("r.yaml", output=".", overwrite=True)
    assert seen == ["past the output checks"]
    assert (tmp_path / "eval.txt").read_text().startswith("The quick") and (tmp_path / "model").is_dir()


def test_run_json_file_onto_a_one_line_jsonl_input_is_refused(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """`llmopt run r.yaml --json-file eval.jsonl` where eval.jsonl (the evaluation text) holds one line: it parses
    as JSON, so the "not a JSON file" guard let the run replace it with its report after all the work. Now refused
    first (exit 2), naming the input."""
    model = fake_model(tmp_path / "model")
    text = tmp_path / "eval.jsonl"
    text.write_text('{"text": "The quick brown fox jumps over the lazy dog."}\n')
    recipe = _recipe(tmp_path / "r.yaml", model, text)
    code, err = cli_in_process(["run", str(recipe), "-o", str(tmp_path / "out"), "--json-file", str(text)], capsys)
    assert code == EXIT_INPUT, err
    assert "would overwrite the input" in err and "eval.jsonl" in err
    assert text.read_text().startswith('{"text"') and not (tmp_path / "out").exists()


def test_eval_json_file_onto_its_local_task_file_is_refused(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """`llmopt eval ... --tasks t.yaml --json-file t.yaml`, a task file written as JSON (valid YAML): refused before
    any work (exit 2) instead of being replaced by the report."""
    task = tmp_path / "t.yaml"
    task.write_text('{"task": "mine", "dataset_path": "json"}\n')
    code, err = cli_in_process(
        ["eval", str(tmp_path / "art"), "--baseline", str(tmp_path / "m"), "--dataset", str(tmp_path / "x.txt"),
         "--tasks", str(task), "--json-file", str(task)],
        capsys,
    )  # fmt: skip
    assert code == EXIT_INPUT, err
    assert "would overwrite the input" in err and task.read_text().startswith('{"task"')


# --- 2. variant names that differ only by case; duplicates at their own line ------------------------------------


def _load(tmp_path: Path, text: str) -> RecipeError:
    from llmopt.recipe import load_recipe

    (tmp_path / "r.yaml").write_text(text)
    with pytest.raises(RecipeError) as info:
        load_recipe(tmp_path / "r.yaml")
    return info.value


def test_variant_names_differing_by_case_are_refused_at_the_second(tmp_path: Path) -> None:
    """`int8` and `Int8` are one folder on a case-insensitive file system (and one Hub repo): refused like a
    duplicate, at the line of the second name."""
    text = RECIPE.format(model="m", text="t.txt").replace("name: b", "name: A")
    err = _load(tmp_path, text)
    line = text.splitlines().index("  - name: A") + 1
    assert err.message.startswith(f"{tmp_path / 'r.yaml'}:{line}: "), err.message
    assert "'a' and 'A' differ only by case" in err.message


def test_duplicate_variant_name_is_reported_at_its_second_line(tmp_path: Path) -> None:
    """A name used twice was reported at line 1 (the recipe's first line); now at the second occurrence."""
    text = RECIPE.format(model="m", text="t.txt").replace("name: b", "name: a")
    err = _load(tmp_path, text)
    line = text.splitlines().index("  - name: a", text.splitlines().index("  - name: a") + 1) + 1
    assert err.message.startswith(f"{tmp_path / 'r.yaml'}:{line}: "), err.message
    assert "variant name 'a' is used twice" in err.message


def test_a_variant_level_check_names_the_variant_line(tmp_path: Path) -> None:
    """Other checks made on the whole recipe that concern one variant point at that variant too (not line 1)."""
    text = RECIPE.format(model="m", text="t.txt") + "    gate: {min_decode_speedup: 1.2}\n"
    err = _load(tmp_path, text)
    line = text.splitlines().index("  - name: b") + 1
    assert err.message.startswith(f"{tmp_path / 'r.yaml'}:{line}: ") and "min_decode_speedup" in err.message


# --- 3. a string where a list is expected; quoted numbers -------------------------------------------------------


def test_comma_string_for_a_list_says_to_write_a_yaml_list(tmp_path: Path) -> None:
    """`batch_sizes: '1,8'` said only 'Input should be a valid list'; now it shows the list to write."""
    err = _load(tmp_path, RECIPE.format(model="m", text="t.txt").replace(
        "  device: cpu\n", "  device: cpu\n  throughput: {batch_sizes: '1,8'}\n"))  # fmt: skip
    assert "batch_sizes: expected a YAML list, got '1,8': write e.g. `batch_sizes: [1, 8]`" in err.message


def test_whole_number_fields_share_one_rule(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Every count of a recipe takes an integer or a quoted one ('16', as `${VAR}` expansion writes a number), and
    refuses true/false and words, saying the type expected: task_limit refused '5' while gen_len took '16'."""
    from llmopt.recipe import load_recipe

    monkeypatch.setenv("CAL_SAMPLES", "32")
    good = (
        RECIPE.format(model="m", text="t.txt").replace(
            "  device: cpu\n",
            "  device: cpu\n  tasks: [arc_easy]\n  task_limit: '5'\n"
            "  throughput: {gen_len: '16', prompt_lens: ['8']}\n",
        )
        + "calibration:\n  samples: ${CAL_SAMPLES}\n"
    )
    (tmp_path / "good.yaml").write_text(good)
    recipe = load_recipe(tmp_path / "good.yaml")
    assert recipe.evaluation.task_limit == 5 and recipe.calibration.samples == 32
    assert recipe.evaluation.throughput is not None
    assert recipe.evaluation.throughput.gen_len == 16 and recipe.evaluation.throughput.prompt_lens == [8]
    for key, value in (("gen_len", "true"), ("gen_len", "'sixteen'"), ("warmup", "false"), ("gen_len", "16.5")):
        err = _load(tmp_path, RECIPE.format(model="m", text="t.txt").replace(
            "  device: cpu\n", f"  device: cpu\n  throughput: {{{key}: {value}}}\n"))  # fmt: skip
        assert f"{key}: expected a whole number, got" in err.message and f"`{key}: 16`" in err.message, err.message
    err = _load(tmp_path, RECIPE.format(model="m", text="t.txt").replace(
        "  device: cpu\n", "  device: cpu\n  tasks: [arc_easy]\n  task_limit: true\n"))  # fmt: skip
    assert "task_limit: expected a whole number, got true" in err.message


# --- 4. an edited artifact manifest in the run folder ------------------------------------------------------------


def test_damaged_manifest_is_found_before_the_first_variant(small: dict[str, Path], tmp_path: Path) -> None:
    """A finished run's artifacts/b/llmopt.json edited into invalid JSON: the rerun quantized and evaluated a first,
    then failed b ("does not replace it, --overwrite or not"). Now the preflight names the variant and the file
    (exit 5) before any variant runs; --overwrite replaces b's folder (a is reused)."""
    from llmopt.pipeline import run_recipe

    recipe = _recipe(tmp_path / "r.yaml", small["model"], small["text"])
    out = tmp_path / "out"
    first = run_recipe(recipe, output=out)
    assert first.exit_code == 0
    manifest = out / "artifacts" / "b" / "llmopt.json"
    manifest.write_text(manifest.read_text()[:-40])
    a_manifest = (out / "artifacts" / "a" / "llmopt.json").read_text()
    report = (out / "report.json").read_text()
    with pytest.raises(ArtifactError) as info:
        run_recipe(recipe, output=out)
    assert info.value.exit_code == EXIT_ARTIFACT
    msg = info.value.message
    assert "variant 'b'" in msg and str(out / "artifacts" / "b") in msg and "llmopt.json" in msg, msg
    assert "--overwrite" in str(info.value.hint) and "rm -r" in str(info.value.hint)
    assert (out / "report.json").read_text() == report  # nothing ran, nothing was rewritten
    assert (out / "artifacts" / "a" / "llmopt.json").read_text() == a_manifest

    again = run_recipe(recipe, output=out, overwrite=True)
    assert again.exit_code == 0, [v.error for v in again.variants]
    a, b = again.variants
    assert a.quantize is not None and a.quantize.reused
    assert b.quantize is not None and not b.quantize.reused
    json.loads(manifest.read_text())


# --- 5. relative paths say where they were read from ---------------------------------------------------------------


def test_relative_path_names_the_folder_it_was_read_from(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A recipe in sub/ with `dataset: eval.txt` (next to it), run from another folder: the error said only that
    the text is neither a file nor a dataset. Now it says relative paths are read from the current folder, shows
    the absolute path tried, and that the recipe's folder holds the file."""
    from llmopt.pipeline import run_recipe

    model = fake_model(tmp_path / "model")
    sub = tmp_path / "sub"
    (sub / "eval.txt").parent.mkdir()
    (sub / "eval.txt").write_text("text " * 100)
    _recipe(sub / "r.yaml", model, "eval.txt")
    work = tmp_path / "work"
    work.mkdir()
    monkeypatch.chdir(work)
    with pytest.raises(DataError) as info:
        run_recipe("../sub/r.yaml", output="out")
    msg = info.value.message
    assert "relative paths in a recipe are read from the current folder" in msg and f"({work})" in msg, msg
    assert f"tried {work / 'eval.txt'}" in msg and f"it is in the recipe's folder, {sub / 'eval.txt'}" in msg

    _recipe(sub / "r2.yaml", "./model", str(sub / "eval.txt"))
    with pytest.raises(ModelError) as model_info:
        run_recipe("../sub/r2.yaml", output="out")
    assert f"tried {work / 'model'}" in model_info.value.message and "model.source ./model" in model_info.value.message
    assert not (work / "out").exists()


# --- 6. an interrupt during the speed measurement ----------------------------------------------------------------


def test_interrupt_during_speed_keeps_the_finished_scores(
    small: dict[str, Path], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Ctrl-C while variant a's speed is measured: report.json had a as not run, its perplexity and KL divergence
    lost. Now a is still not run (no gate, nothing in its manifest) but shows its scores, marked "speed not
    measured: interrupted"; the rerun measures everything again, speed included, and never reuses the partial."""
    from llmopt.errors import InterruptedRunError
    from llmopt.evaluate import throughput
    from llmopt.pipeline import run_recipe

    recipe = _recipe(tmp_path / "r.yaml", small["model"], small["text"], SPEED)
    out = tmp_path / "out"
    real_bench = throughput.bench_model

    def interrupted(*args: Any, **kwargs: Any) -> dict[str, Any]:
        raise KeyboardInterrupt

    monkeypatch.setattr(throughput, "bench_model", interrupted)
    with pytest.raises(InterruptedRunError):
        run_recipe(recipe, output=out)
    report = json.loads((out / "report.json").read_text())
    assert report["state"] == "interrupted" and report["exit_code"] == 130
    a, b = report["variants"]
    assert a["status"] == "not_run" and a["incomplete"] == "speed not measured: interrupted"
    assert a["perplexity"] > 0 and a["evaluation"]["artifact"]["distribution"]["kld_mean"] >= 0
    assert a["evaluation"].get("throughput") is None and a.get("gate") is None
    assert b["status"] == "not_run" and b.get("evaluation") is None
    assert report["counts"]["not_run"] == 2
    assert any("a: interrupted while measuring speed" in n for n in report["notes"])
    manifest = json.loads((out / "artifacts" / "a" / "llmopt.json").read_text())
    assert manifest.get("evaluation") is None  # never reusable as a whole evaluation
    assert "a: interrupted while measuring speed" in (out / "report.md").read_text()

    calls: list[str] = []

    def counted(*args: Any, **kwargs: Any) -> dict[str, Any]:
        calls.append(str(kwargs.get("label")))
        return real_bench(*args, **kwargs)

    monkeypatch.setattr(throughput, "bench_model", counted)
    again = run_recipe(recipe, output=out, only=["a"])
    (row,) = again.variants
    assert row.status == "passed" and not row.evaluation_reused and row.incomplete is None
    assert row.evaluation is not None and row.evaluation.throughput is not None and calls


def test_backend_counts_take_the_same_rule(tmp_path: Path) -> None:
    """A backend's whole-number options follow the recipe's rule: `group_size: true` quantized with groups of 1
    (pydantic read true as 1); now refused, while a quoted '64' is 64."""
    from llmopt.recipe import load_recipe

    gptq = (
        RECIPE.format(model="m", text="t.txt")
        + "  - name: g\n    method: gptq\n    options: {group_size: GROUP}\ncalibration:\n  dataset: c.txt\n"
    )
    err = _load(tmp_path, gptq.replace("GROUP", "true"))
    assert "group_size: Input should be a whole number" in err.message, err.message
    (tmp_path / "ok.yaml").write_text(gptq.replace("GROUP", "'64'"))
    assert load_recipe(tmp_path / "ok.yaml").variants[2].backend_options()["group_size"] == 64
