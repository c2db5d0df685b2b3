"""Recipes: strict schema, precise errors (file:line, valid keys), env expansion, overrides, every file in recipes/."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from llmopt.cli import main
from llmopt.errors import RecipeError
from llmopt.recipe import apply_overrides, load_recipe, parse_set_flags

ROOT = Path(__file__).resolve().parents[1]
RECIPES = sorted((ROOT / "recipes").glob("*.yaml"))

GOOD = """\
name: tiny
model:
  source: ${TEST_ASSETS:-/models}/smol
calibration:
  dataset: calib.txt
  samples: 8
  seq_len: 64
evaluation:
  dataset: eval.txt
  context_length: 128
  max_tokens: 512
  device: cpu
gates:
  max_ppl_increase_pct: 5
  max_ppl: 100
variants:
  - name: int8
    method: bnb-int8
  - name: gptq4
    method: gptq
    options: {bits: 4, group_size: 64}
    gate:
      max_ppl_increase_pct: 40
publish:
  repo_id: "{org}/{model_name}-{variant}"
  organization: test-org
"""


def write(tmp_path: Path, text: str, name: str = "r.yaml") -> Path:
    p = tmp_path / name
    p.write_text(text)
    return p


def cli(args: list[str]) -> int:
    try:
        main(args)
    except SystemExit as exc:
        return int(exc.code or 0)
    return 0


def errors_of(tmp_path: Path, text: str) -> str:
    with pytest.raises(RecipeError) as info:
        load_recipe(write(tmp_path, text))
    return str(info.value)


@pytest.mark.parametrize("path", RECIPES, ids=[p.name for p in RECIPES])
def test_every_shipped_recipe_validates(path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("LLMOPT_ASSETS", raising=False)
    recipe = load_recipe(path)
    assert recipe.variants and recipe.name
    for v in recipe.variants:
        v.backend_options()  # the backend's own Options accept them
    monkeypatch.setenv("LLMOPT_ASSETS", "/opt/assets")
    again = load_recipe(path)
    if "${LLMOPT_ASSETS" in path.read_text():
        assert again.model.source.startswith("/opt/assets/")


def test_shipped_recipes_exist() -> None:
    names = {p.name for p in RECIPES}
    assert "smollm2-135m-cpu.yaml" in names
    assert {"llama-3.1-8b-gpu.yaml", "qwen2.5-7b-gpu.yaml", "mistral-7b-gpu.yaml"} <= names


def test_good_recipe(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("TEST_ASSETS", raising=False)
    r = load_recipe(write(tmp_path, GOOD))
    assert r.model.source == "/models/smol"
    assert r.evaluation.resolved_stride() == 128
    int8, gptq4 = r.variants
    # a variant's gate replaces only the thresholds it names
    assert r.gate_for(int8).max_ppl_increase_pct == 5 and r.gate_for(int8).max_ppl == 100
    assert r.gate_for(gptq4).max_ppl_increase_pct == 40 and r.gate_for(gptq4).max_ppl == 100
    assert gptq4.backend_options()["damp_percent"] == 0.05  # backend defaults filled in
    resolved = r.resolved()
    assert resolved["variants"][1]["gate"]["max_ppl_increase_pct"] == 40
    monkeypatch.setenv("TEST_ASSETS", "/elsewhere")
    assert load_recipe(write(tmp_path, GOOD)).model.source == "/elsewhere/smol"


def test_name_defaults_to_file_stem(tmp_path: Path) -> None:
    r = load_recipe(write(tmp_path, GOOD.replace("name: tiny\n", ""), "my recipe.yaml"))
    assert r.name == "my-recipe"


def test_unknown_top_level_key_lists_valid_keys(tmp_path: Path) -> None:
    msg = errors_of(tmp_path, GOOD + "evalution: {}\n")
    assert "r.yaml:27: unknown key 'evalution' in the recipe's top level" in msg
    for key in ("calibration", "evaluation", "gates", "model", "publish", "variants"):
        assert key in msg


def test_unknown_nested_key_points_at_its_line(tmp_path: Path) -> None:
    msg = errors_of(tmp_path, GOOD.replace("  context_length: 128", "  context_lenght: 128"))
    assert "r.yaml:10: unknown key 'context_lenght' in evaluation (did you mean 'context_length'?)" in msg
    assert (
        "valid keys: add_bos, batch_size, context_length, dataset, device, kernel, kld, max_tokens, serving, stride, "
        "task_limit, tasks, throughput" in msg
    )


def test_unknown_key_in_variant_and_variant_gate(tmp_path: Path) -> None:
    text = GOOD.replace("    method: bnb-int8\n", "    method: bnb-int8\n    bits: 4\n")
    text = text.replace("      max_ppl_increase_pct: 40", "      max_ppl_increse_pct: 40")
    msg = errors_of(tmp_path, text)
    assert "unknown key 'bits' in variants[0]; valid keys: gate, method, name, options" in msg
    assert "unknown key 'max_ppl_increse_pct' in variants[1].gate (did you mean 'max_ppl_increase_pct'?)" in msg


def test_bad_backend_option(tmp_path: Path) -> None:
    msg = errors_of(tmp_path, GOOD.replace("{bits: 4, group_size: 64}", "{bitz: 4, group_size: 64}"))
    assert "r.yaml:21: variant 'gptq4' options:" in msg
    assert "'bitz' is not an option of gptq (did you mean 'bits'?)" in msg
    assert "valid options of gptq:" in msg and "group_size" in msg


def test_bad_backend_option_value(tmp_path: Path) -> None:
    msg = errors_of(tmp_path, GOOD.replace("{bits: 4, group_size: 64}", "{bits: 5}"))
    assert "variant 'gptq4' options" in msg and "bits" in msg


def test_unknown_method(tmp_path: Path) -> None:
    msg = errors_of(tmp_path, GOOD.replace("method: bnb-int8", "method: bnb-int9"))
    assert "r.yaml:18: variant 'int8' method: unknown method 'bnb-int9'" in msg
    assert "did you mean 'bnb-int8'" in msg


def test_calibration_needed(tmp_path: Path) -> None:
    msg = errors_of(tmp_path, GOOD.replace("  dataset: calib.txt\n", ""))
    assert "variant 'gptq4' (gptq) needs calibration text: set calibration.dataset" in msg


def test_duplicate_variant_and_duplicate_key(tmp_path: Path) -> None:
    assert "variant name 'int8' is used twice" in errors_of(tmp_path, GOOD.replace("name: gptq4", "name: int8"))
    msg = errors_of(tmp_path, GOOD.replace("  max_tokens: 512\n", "  max_tokens: 512\n  max_tokens: 64\n"))
    assert "r.yaml:12: key 'max_tokens' appears twice in evaluation" in msg


def test_missing_required(tmp_path: Path) -> None:
    msg = errors_of(tmp_path, GOOD.replace("  dataset: eval.txt\n", ""))
    assert "evaluation.dataset is required" in msg


def test_yaml_syntax_error_has_line_and_column(tmp_path: Path) -> None:
    msg = errors_of(tmp_path, GOOD.replace("  samples: 8", "  samples: [8"))
    assert "not valid YAML" in msg and "r.yaml:" in msg


def test_not_a_mapping_and_empty(tmp_path: Path) -> None:
    assert "a recipe is a YAML mapping" in errors_of(tmp_path, "- a\n- b\n")
    assert "is empty" in errors_of(tmp_path, "")


def test_unset_env_without_default(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("NO_SUCH_VAR_X", raising=False)
    msg = errors_of(tmp_path, GOOD.replace("${TEST_ASSETS:-/models}", "${NO_SUCH_VAR_X}"))
    assert "r.yaml:3: model.source: ${NO_SUCH_VAR_X} is not set" in msg


def test_publish_template_checks(tmp_path: Path) -> None:
    msg = errors_of(tmp_path, GOOD.replace("{org}/{model_name}-{variant}", "{org}/{modelname}-{variant}"))
    assert "unknown field {modelname}" in msg and "{model_name}" in msg
    msg = errors_of(tmp_path, GOOD.replace("{org}/{model_name}-{variant}", "{org}/{model_name}"))
    assert "needs {variant} in repo_id" in msg


def test_overrides(tmp_path: Path) -> None:
    r = load_recipe(write(tmp_path, GOOD))
    same = apply_overrides(r, {"evaluation.max_tokens": None, "evaluation.device": None})
    assert same.evaluation.max_tokens == 512  # None never overrides the file
    r2 = apply_overrides(r, {"evaluation.max_tokens": 256})
    sets = ["variants.gptq4.options.bits=8", "gates.max_ppl=null", "publish.private=true"]
    r2 = apply_overrides(r2, parse_set_flags(sets), keep_none=True)
    assert r2.evaluation.max_tokens == 256
    assert r2.variants[1].options["bits"] == 8
    assert r2.gate_for(r2.variants[1]).max_ppl is None
    assert r2.gate_for(r2.variants[1]).max_ppl_increase_pct == 40  # untouched variant override survives
    assert r2.publish is not None and r2.publish.private
    with pytest.raises(RecipeError, match="variant 'gptq4' options"):
        apply_overrides(r, parse_set_flags(["variants.gptq4.options.bitz=8"]))
    with pytest.raises(RecipeError, match="no item 'nope'"):
        apply_overrides(r, parse_set_flags(["variants.nope.options.bits=8"]))
    with pytest.raises(RecipeError, match="not of the form"):
        parse_set_flags(["evaluation.max_tokens"])


def test_cli_validate_ok(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert cli(["recipe", "validate", str(write(tmp_path, GOOD))]) == 0
    out = capsys.readouterr().out
    assert "recipe tiny, 2 variant(s)" in out and "gptq4" in out


def test_cli_validate_json(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert cli(["recipe", "validate", str(write(tmp_path, GOOD)), "--json"]) == 0
    data = json.loads(capsys.readouterr().out)
    assert data["variants"][0]["gate"]["max_ppl_increase_pct"] == 5


def test_cli_validate_unknown_key_exit_2(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert cli(["recipe", "validate", str(write(tmp_path, GOOD + "extra: 1\n"))]) == 2
    err = capsys.readouterr().err
    assert "unknown key 'extra'" in err and "valid keys:" in err and "-> " in err


def test_cli_validate_bad_option_exit_2(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    path = write(tmp_path, GOOD.replace("{bits: 4, group_size: 64}", "{bits: 4, groupsize: 64}"))
    assert cli(["recipe", "validate", str(path)]) == 2
    assert "'groupsize' is not an option of gptq (did you mean 'group_size'?)" in capsys.readouterr().err


def test_cli_missing_file_exit_2(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert cli(["recipe", "validate", str(tmp_path / "nope.yaml")]) == 2
    assert "nope.yaml does not exist" in capsys.readouterr().err
    assert cli(["run", str(tmp_path / "nope.yaml")]) == 2


def test_cli_schema(capsys: pytest.CaptureFixture[str]) -> None:
    assert cli(["recipe", "schema"]) == 0
    schema = json.loads(capsys.readouterr().out)
    assert schema["$id"] == "llmopt.recipe/1"
    assert {"model", "evaluation", "variants"} <= set(schema["required"])
    assert schema["additionalProperties"] is False


def test_speed_gate_needs_throughput(tmp_path: Path) -> None:
    text = GOOD.replace("  max_ppl: 100\n", "  max_ppl: 100\n  min_decode_speedup: 1.2\n")
    assert "needs speed measurements: add evaluation.throughput" in errors_of(tmp_path, text)
    ok = load_recipe(
        write(tmp_path, text.replace("  device: cpu\n", "  device: cpu\n  throughput: {batch_sizes: [1]}\n"))
    )
    assert ok.evaluation.throughput is not None and ok.evaluation.throughput.batch_sizes == [1]
    bad = text.replace("  device: cpu\n", "  device: cpu\n  throughput: {batch_size: [1]}\n")
    assert "unknown key 'batch_size' in evaluation.throughput (did you mean 'batch_sizes'?)" in errors_of(tmp_path, bad)
    off = text.replace("  device: cpu\n", "  device: cpu\n  throughput: {marlin_atomics: false}\n")
    assert load_recipe(write(tmp_path, off)).evaluation.throughput.marlin_atomics is False  # type: ignore[union-attr]
    bad = text.replace("  device: cpu\n", "  device: cpu\n  throughput: {marlin_atomics: sometimes}\n")
    assert "evaluation.throughput.marlin_atomics" in errors_of(tmp_path, bad)
    assert cli(["recipe", "validate", str(write(tmp_path, bad))]) == 2


GGUF = """\
model: {source: /models/smol}
calibration: {dataset: calib.txt}
evaluation: {dataset: eval.txt}
variants:
  - {name: q8, method: gguf, options: {quant_type: q8_0}}
  - {name: q4, method: gguf, options: {quant_type: Q4_K_M, imatrix: auto}}
publish:
  mode: gguf-one-repo
"""


def test_gguf_one_repo(tmp_path: Path) -> None:
    """One repo for every quant type: the default repo id has no {variant}; other formats and a second variant of
    the same type are refused when the recipe is loaded, before any work."""
    from llmopt.pipeline import repo_target

    r = load_recipe(write(tmp_path, GGUF))
    assert r.publish is not None and r.publish.repo_id == "{org}/{model_name}-GGUF"
    assert {repo_target(r, v, "org") for v in r.variants} == {("org/smol-GGUF", None)}
    per_variant = "mode: gguf-one-repo\n  repo_id: '{org}/x-{variant}'"
    msg = errors_of(tmp_path, GGUF.replace("mode: gguf-one-repo", per_variant))
    assert "drop {variant} from repo_id" in msg
    msg = errors_of(tmp_path, GGUF.replace("variants:\n", "variants:\n  - {name: int8, method: bnb-int8}\n"))
    assert "GGUF files only, and variant 'int8' is bnb-int8 (bnb-8bit)" in msg and "repo-per-variant" in msg
    msg = errors_of(tmp_path, GGUF.replace("quant_type: q8_0", "quant_type: q4_k"))  # llama.cpp's alias of q4_k_m
    assert "variants 'q8' and 'q4' are both Q4_K_M" in msg
    # the same variants publish per repo when the mode says so
    assert load_recipe(write(tmp_path, GGUF.replace("gguf-one-repo", "repo-per-variant"))).publish is not None


def test_keys_are_names_as_written(tmp_path: Path) -> None:
    # `1:` and `true:` are one key to Python (1 == True); to the reader they are two unknown keys, each named
    msg = errors_of(tmp_path, GOOD.replace("  max_ppl: 100\n", "  max_ppl: 100\n  1: a\n  true: b\n"))
    assert "appears twice" not in msg
    assert "unknown key '1' in gates" in msg and "unknown key 'true' in gates" in msg


def test_two_merge_keys_in_one_mapping_are_refused(tmp_path: Path) -> None:
    text = GOOD.replace("gates:\n", "x-a: &a {max_ppl: 50}\nx-b: &b {max_ppl: 60}\ngates:\n  <<: *a\n  <<: *b\n", 1)
    msg = errors_of(tmp_path, text)
    assert "key '<<' appears twice in gates" in msg and "<<: [*first, *second]" in msg


def test_set_fixes_a_value_the_file_has_wrong(tmp_path: Path) -> None:
    bad = write(tmp_path, GOOD.replace("  seq_len: 64", "  seq_len: 12"))
    with pytest.raises(RecipeError, match=r"r.yaml:7: calibration.seq_len"):
        load_recipe(bad)
    fixed = load_recipe(bad, parse_set_flags(["calibration.seq_len=64"]))
    assert fixed.calibration is not None and fixed.calibration.seq_len == 64
    # a wrong value given on the command line is said to be there, not at the file's line it replaced
    with pytest.raises(RecipeError) as info:
        load_recipe(write(tmp_path, GOOD), parse_set_flags(["calibration.seq_len=12"]))
    assert str(info.value).startswith("command line: calibration.seq_len") and "r.yaml:7" not in str(info.value)


def test_set_on_one_variant_leaves_an_alias_sharing_its_options(tmp_path: Path) -> None:
    text = GOOD.replace("    options: {bits: 4, group_size: 64}", "    options: &o {bits: 4, group_size: 64}")
    text = text.replace("publish:\n", "  - name: g2\n    method: gptq\n    options: *o\npublish:\n")
    r = load_recipe(write(tmp_path, text), parse_set_flags(["variants.gptq4.options.bits=8"]))
    bits = {v.name: v.options["bits"] for v in r.variants if v.method == "gptq"}
    assert bits == {"g2": 4, "gptq4": 8}


def test_run_and_plan_take_set_before_the_file_is_validated(tmp_path: Path) -> None:
    from llmopt.pipeline import plan_jobs, resolve_recipe

    bad = write(tmp_path, GOOD.replace("  seq_len: 64", "  seq_len: 12"))
    recipe, source = resolve_recipe(bad, {"evaluation.max_tokens": 256}, ["calibration.seq_len=32"])
    assert source == str(bad) and recipe.calibration is not None and recipe.calibration.seq_len == 32
    assert recipe.evaluation.max_tokens == 256 and recipe.name == "tiny"
    jobs = plan_jobs(bad, output_root=tmp_path / "out", sets=["calibration.seq_len=32"])
    assert [j["variant"] for j in jobs] == ["int8", "gptq4"]


def test_problems_are_listed_top_to_bottom_with_the_command_line_first(tmp_path: Path) -> None:
    text = GOOD.replace("  max_ppl: 100\n", "  max_ppl: 100\n  bogus: 1\n").replace("  seq_len: 64", "  seq_len: 12")
    with pytest.raises(RecipeError) as info:
        load_recipe(write(tmp_path, text), parse_set_flags(["evaluation.context_length=-1"]))
    lines = str(info.value).splitlines()
    assert "3 problems" in lines[0]
    assert lines[1].strip().startswith("command line: evaluation.context_length")
    assert lines[2].strip().endswith("r.yaml:7: calibration.seq_len: Input should be greater than or equal to 16")
    assert "r.yaml:16: unknown key 'bogus' in gates" in lines[3]


def test_set_values_hold_no_aliases(tmp_path: Path) -> None:
    # a cycle was a RecursionError traceback; nested aliases grew without the file's 100,000-value limit
    with pytest.raises(RecipeError, match=r"uses a YAML anchor or alias"):
        parse_set_flags(["evaluation.max_tokens=&a [*a]"])
    bomb = "[&a0 [1,1,1,1,1,1,1,1,1,1], &a1 [*a0,*a0,*a0,*a0,*a0,*a0,*a0,*a0,*a0,*a0], [*a1,*a1,*a1,*a1,*a1]]"
    with pytest.raises(RecipeError, match="alias"):
        parse_set_flags([f"evaluation.tasks={bomb}"])


def test_set_keys_and_values_as_the_user_means_them(tmp_path: Path) -> None:
    for bad in (".=3", "a..b=3", "evaluation.=3"):
        with pytest.raises(RecipeError, match="has an empty part"):
            parse_set_flags([bad])
    # the last flag wins, also over a whole mapping set between
    flags = parse_set_flags(["a.bits=8", "a={bits: 3}", "a.bits=2"])
    assert list(flags.items()) == [("a", {"bits": 3}), ("a.bits", 2)]
    # '#' in a plain value is part of it (YAML would cut a comment there); quoted and numbers as YAML says
    assert parse_set_flags(["m=/tmp/x/my model #2", "d=#tag", "n=5", "q='a #b'"]) == {
        "m": "/tmp/x/my model #2",
        "d": "#tag",
        "n": 5,
        "q": "a #b",
    }


def test_set_reaches_a_variant_whose_name_has_dots(tmp_path: Path) -> None:
    text = GOOD.replace("name: gptq4", "name: gptq4.v1")
    r = load_recipe(write(tmp_path, text), parse_set_flags(["variants.gptq4.v1.options.bits=8"]))
    assert r.variants[1].name == "gptq4.v1" and r.variants[1].options["bits"] == 8
    with pytest.raises(RecipeError) as info:
        load_recipe(write(tmp_path, text), parse_set_flags(["variants.nope.options.bits=8"]))
    assert "no item 'nope'" in str(info.value) and "int8, gptq4.v1; or an index 0-1" in (info.value.hint or "")


def test_what_set_adds_is_the_command_lines_problem(tmp_path: Path) -> None:
    with pytest.raises(RecipeError) as info:
        load_recipe(write(tmp_path, GOOD), parse_set_flags(["nonexist.key=3"]))
    assert str(info.value).startswith("command line: unknown key 'nonexist'")
    assert "Fix the recipe or the flag" in (info.value.hint or "")
    with pytest.raises(RecipeError) as info:
        load_recipe(write(tmp_path, GOOD.replace("  max_ppl: 100\n", "  max_ppl: 100\n  bogus: 1\n")))
    assert (info.value.hint or "").startswith("Fix the recipe;")


def test_text_yaml_reads_as_another_type_says_to_quote_it(tmp_path: Path) -> None:
    msg = errors_of(tmp_path, GOOD.replace("  - name: int8\n", "  - name: no\n"))
    assert "variants[0].name: expected text, got false" in msg and "quote it, e.g. `name: 'no'`" in msg
    assert "variant 'False'" not in msg
    with pytest.raises(RecipeError) as info:
        load_recipe(write(tmp_path, GOOD), parse_set_flags(["model.source=2024-01-01"]))
    assert "command line: model.source: expected text, got 2024-01-01" in str(info.value)


def test_a_problem_the_file_alone_does_not_have_is_the_flags(tmp_path: Path) -> None:
    # pydantic reports a bad option at the variant's `options`, a line of the file: the file alone is fine there
    with pytest.raises(RecipeError) as info:
        load_recipe(write(tmp_path, GOOD), parse_set_flags(["variants.gptq4.options.bits=abc"]))
    assert str(info.value).startswith("command line: variant 'gptq4' options") and "r.yaml" not in str(info.value)
    # a file's own problem stays at its line beside one of the flag's
    bad = GOOD.replace("  max_ppl: 100\n", "  max_ppl: 100\n  bogus: 1\n")
    with pytest.raises(RecipeError) as info:
        load_recipe(write(tmp_path, bad), parse_set_flags(["variants.gptq4.options.bitz=4"]))
    text = str(info.value)
    assert "command line: variant 'gptq4' options" in text and "r.yaml:16: unknown key 'bogus' in gates" in text


def test_null_removes_a_key_the_recipe_does_not_know(tmp_path: Path) -> None:
    typo = GOOD.replace("  device: cpu\n", "  device: cpu\n  add_boss: false\n")
    with pytest.raises(RecipeError, match="unknown key 'add_boss'"):
        load_recipe(write(tmp_path, typo))
    r = load_recipe(write(tmp_path, typo), parse_set_flags(["evaluation.add_boss=null", "gates.max_ppl=null"]))
    assert r.gates.max_ppl is None  # a known key is set to null, as before
    with pytest.raises(RecipeError, match=r"no item '²'"):  # a digit that int() cannot read is no index
        load_recipe(write(tmp_path, GOOD), parse_set_flags(["variants.².name=x"]))
    with pytest.raises(RecipeError) as info:
        load_recipe(write(tmp_path, GOOD), parse_set_flags(["evaluation.tasks=[]", "evaluation.tasks.0=a"]))
    assert "(it is empty)" in str(info.value) and "Set the whole list first" in (info.value.hint or "")
