"""The eighth hostile round (issue "A stranger's first hour"): the run's own names in its output folder, and one
lock per folder however it is spelled."""

from __future__ import annotations

import fcntl
import os
import re
from pathlib import Path

import pytest

from llmopt.errors import EXIT_INPUT, OutputExistsError, OutputPathError
from llmopt.outputs import check_run_folder, lock_path, output_lock
from llmopt.report import write_report
from llmopt.results import RunReport, VariantOutcome
from tests.helpers import run_cli


def _run_folder(tmp_path: Path) -> Path:
    out = tmp_path / "out"
    out.mkdir()
    (out / ".llmopt-run").write_text("")
    return out


@pytest.mark.parametrize(
    ("name", "kind"),
    [("plots", "file"), ("artifacts", "file"), ("serving", "file"), ("report.json", "folder"), ("report.md", "folder")],
)
@pytest.mark.parametrize("overwrite", [False, True])
def test_a_run_name_of_the_wrong_kind_is_refused_before_any_work(
    tmp_path: Path, name: str, kind: str, overwrite: bool
) -> None:
    out = _run_folder(tmp_path)
    if kind == "file":
        (out / name).write_text("x")
    else:
        (out / name).mkdir()
        (out / name / "x").write_text("x")
    with pytest.raises(OutputExistsError) as caught:
        check_run_folder(out, overwrite)
    assert f"{name} is a {kind}" in caught.value.message
    assert (out / name).exists()  # nothing was removed


def test_the_cli_says_so_with_exit_2_and_no_traceback(tmp_path: Path) -> None:
    out = _run_folder(tmp_path)
    (out / "plots").write_text("x")
    recipe = tmp_path / "r.yaml"
    recipe.write_text(
        "name: r\nmodel: {source: no-such-model-folder}\nevaluation: {dataset: no-such.txt}\n"
        "variants: [{name: a, method: bnb-int8}]\n"
    )
    r = run_cli(["run", str(recipe), "-o", str(out)], cwd=tmp_path, timeout=300)
    assert r.returncode == EXIT_INPUT, r.stderr
    assert "plots is a file" in r.stderr and "Traceback" not in r.stderr
    assert sorted(p.name for p in out.iterdir()) == [".llmopt-run", "plots"]


def test_plots_that_cannot_be_written_do_not_lose_the_report(tmp_path: Path) -> None:
    """A plots/ that turned into a file mid-run (the check runs before): the report is still written whole."""
    out = tmp_path / "out"
    out.mkdir()
    (out / "plots").write_text("x")
    pytest.importorskip("matplotlib")
    measured = VariantOutcome(
        name="a", method="bnb-int8", status="passed", perplexity=30.0, stderr=1.0, size_bytes=10**8
    )
    report = RunReport(recipe={"name": "r"}, variants=[measured])
    written = write_report(report, out)
    assert (out / "report.json").is_file() and (out / "report.md").is_file()
    assert written.files["plots"] == []
    assert any(note.startswith("plots not written:") for note in written.notes), written.notes


def test_the_plots_note_names_the_file_in_the_way(tmp_path: Path) -> None:
    """A file where a plot goes (a folder named like the plot, say): the note names that file, not just plots/."""
    pytest.importorskip("matplotlib")
    from llmopt.report import PLOTS_DIR

    out = tmp_path / "out"
    measured = VariantOutcome(
        name="a", method="bnb-int8", status="passed", perplexity=30.0, stderr=1.0, size_bytes=10**8
    )
    report = RunReport(recipe={"name": "r"}, variants=[measured])
    first = write_report(report.model_copy(deep=True), out)
    assert first.files["plots"], first.notes
    blocked = out / first.files["plots"][0]
    blocked.unlink()
    blocked.mkdir()  # a folder where the plot's file goes
    (blocked / "x").write_text("x")
    written = write_report(report.model_copy(deep=True), out)
    notes = [n for n in written.notes if n.startswith("plots not written:")]
    assert notes and f"({blocked})" in notes[0], written.notes  # the file in the way, not a temp file's name
    assert ".tmp" not in notes[0]
    assert (out / "report.json").is_file()
    assert (out / PLOTS_DIR).is_dir()


def test_a_link_to_the_folder_shares_its_lock(tmp_path: Path) -> None:
    real = tmp_path / "out"
    real.mkdir()
    (tmp_path / "t").mkdir()
    link = tmp_path / "t" / "alias"
    link.symlink_to(real)
    assert lock_path(link) == lock_path(real) == lock_path(tmp_path / "t" / ".." / "out")
    with output_lock(real):
        fd = os.open(lock_path(real), os.O_RDWR)
        try:
            with pytest.raises(OSError):  # held: the link's spelling finds the same lock file, and it is taken
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        finally:
            os.close(fd)
        with pytest.raises(OutputPathError) as caught, output_lock(link):
            pass
        assert f"PID {os.getpid()}" in caught.value.message


@pytest.mark.parametrize(
    ("tokens", "samples", "seq_len", "says", "not_says"),
    [
        (0, 1, 128, "empty or nearly (0 tokens): give a text of at least 128 tokens", "lower"),
        (300, 4, 128, "Lower --samples (recipe: calibration.samples) to 2", "--seq-len"),
        (100, 1, 128, "Lower --seq-len (recipe: calibration.seq_len) to 100 or less", "--samples"),
        (100, 4, 128, "Lower --seq-len (recipe: calibration.seq_len) to 25 or less", "--samples"),
        # 69 tokens for 128 samples: the shortest slices (16 tokens) give 4, so --seq-len alone cannot do it
        (69, 128, 512, "Lower --seq-len (recipe: calibration.seq_len) to 16 and --samples (recipe: "
         "calibration.samples) to 4", "or less"),
    ],
)
def test_a_short_calibration_text_gets_a_hint_that_would_work(
    tokens: int, samples: int, seq_len: int, says: str, not_says: str
) -> None:
    """An empty text was told 'Lower --samples to 1' with --samples 1 already, and `llmopt run` has no such flag."""
    from llmopt.data import calibration_size_hint

    hint = calibration_size_hint(tokens, samples, seq_len)
    assert says in hint and not_says not in hint
    assert f"at least {samples * seq_len:,} tokens" in hint
    # what the hint asks for would work: that many slices of that length fit the text
    m = re.search(r"--seq-len \(recipe: calibration.seq_len\) to (\d+)", hint)
    n = re.search(r"--samples \(recipe: calibration.samples\) to (\d+)", hint)
    if m or n:
        new_len = int(m.group(1)) if m else seq_len
        new_samples = int(n.group(1)) if n else samples
        assert new_len >= 16 and new_samples >= 1 and tokens // new_len >= new_samples


def test_the_group_size_hint_names_the_recipe_key() -> None:
    from llmopt.backends._shapes import check_group_size
    from llmopt.errors import OptionsError

    config = {"hidden_size": 576, "intermediate_size": 1536, "num_attention_heads": 9, "num_key_value_heads": 3}
    with pytest.raises(OptionsError) as caught:
        check_group_size(config, 128)
    assert "options.group_size" in caught.value.hint and "--group-size" in caught.value.hint


def test_every_name_clash_is_shown_with_the_field_errors(tmp_path: Path) -> None:
    """`recipe validate` showed an option error alone, then after that was fixed one name clash, then the next."""
    from llmopt.errors import RecipeError
    from llmopt.recipe import load_recipe

    recipe = tmp_path / "dup.yaml"
    recipe.write_text(
        "name: dup\nmodel: {source: m}\nevaluation: {dataset: e.txt}\nvariants:\n"
        "  - {name: bnb-int8, method: bnb-int8}\n"  # line 5
        "  - {name: BNB-int8, method: bnb-int8}\n"  # line 6: differs only by case
        "  - {name: bnb-int8, method: bnb-int8}\n"  # line 7: the same name again
        "  - {name: g, method: gptq, options: {bitz: 3}}\n"  # line 8: a field error
    )
    with pytest.raises(RecipeError) as caught:
        load_recipe(recipe)
    text = caught.value.message
    assert "3 problems" in text
    assert "dup.yaml:8:" in text and "'bitz' is not an option" in text
    assert "dup.yaml:6: variant names 'bnb-int8' and 'BNB-int8' differ only by case" in text
    assert "dup.yaml:7: variant name 'bnb-int8' is used twice" in text
    # listed top to bottom, as the file reads (the field error on line 8 was found first)
    assert text.index("dup.yaml:6:") < text.index("dup.yaml:7:") < text.index("dup.yaml:8:")

    recipe.write_text(recipe.read_text().replace("bitz", "bits"))  # fields right: both clashes still, at once
    with pytest.raises(RecipeError) as caught:
        load_recipe(recipe)
    assert "2 problems" in caught.value.message and "dup.yaml:6:" in caught.value.message
    assert "dup.yaml:7:" in caught.value.message


def test_a_kld_reference_left_half_written_by_a_killed_process_is_removed(tmp_path: Path) -> None:
    """A SIGKILL while FP16's KLD reference was being written left `.NAME.partial-*` in the cache for good."""
    import subprocess
    import sys

    pytest.importorskip("numpy")
    from llmopt.evaluate.kld import ReferenceWriter

    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    dead_pid = int(dead.stdout)  # exited: its PID names no process now (reuse within the test is vanishingly rare)
    final = tmp_path / "baselines" / "abc.kld-top256"
    final.parent.mkdir()
    stale = final.parent / f".{final.name}.partial-{dead_pid}-x1y2"
    stale.mkdir()
    (stale / "top_ids.npy").write_bytes(b"\0" * 64)
    live = final.parent / f".{final.name}.partial-{os.getppid()}-z3"  # pytest's parent: alive
    live.mkdir()
    old_style = final.parent / f".{final.name}.partial-k2j3h4"  # no PID in the name: not ours to judge
    old_style.mkdir()

    writer = ReferenceWriter(final, "key", [4, 4], vocab=16, k=4)
    assert not stale.exists() and live.is_dir() and old_style.is_dir()
    assert writer.staging.name.startswith(f".{final.name}.partial-{os.getpid()}-")


HOLDER = """
import sys, time
from pathlib import Path
from llmopt.outputs import output_lock
with output_lock(Path(sys.argv[1])):
    print("held", flush=True)
    time.sleep(60)
"""


def test_a_folder_inside_one_another_process_writes_is_refused(tmp_path: Path) -> None:
    """`quantize -o RUN/artifacts/VARIANT --overwrite` went ahead beside the `run -o RUN` that was scoring it."""
    import subprocess
    import sys

    run_folder = tmp_path / "run"
    (run_folder / "artifacts" / "v").mkdir(parents=True)
    (run_folder / "artifacts" / "new").mkdir()  # the lock's folder exists (the commands make it first)
    root = Path(__file__).resolve().parents[2]
    env = {**os.environ, "PYTHONPATH": str(root)}
    holder = subprocess.Popen(
        [sys.executable, "-c", HOLDER, str(run_folder)], stdout=subprocess.PIPE, text=True, env=env
    )
    try:
        assert holder.stdout is not None and holder.stdout.readline().strip() == "held"
        for inner in (run_folder / "artifacts" / "v", run_folder / "artifacts" / "new" / "deeper"):
            with pytest.raises(OutputPathError) as caught, output_lock(inner):
                pass
            assert f"PID {holder.pid}" in caught.value.message and str(run_folder) in caught.value.message
            assert not lock_path(inner).exists()  # nothing of the refused one is left
        with output_lock(tmp_path / "elsewhere"):  # a folder beside it is free
            pass
    finally:
        holder.kill()
        holder.wait()
    with output_lock(run_folder / "artifacts" / "v"):  # the holder is gone (killed): free again
        pass


def test_this_process_may_write_inside_the_folder_it_holds(tmp_path: Path) -> None:
    """A run holds its folder and locks each artifact it writes: that is not 'another process'."""
    (tmp_path / "run" / "artifacts").mkdir(parents=True)
    with output_lock(tmp_path / "run"), output_lock(tmp_path / "run" / "artifacts" / "v"):
        pass


@pytest.mark.parametrize("name", ["artifacts", "plots", "serving", "report.json"])
def test_a_link_to_nothing_with_a_run_name_is_refused_before_any_work(tmp_path: Path, name: str) -> None:
    out = _run_folder(tmp_path)
    (out / name).symlink_to(tmp_path / "nowhere")
    with pytest.raises(OutputExistsError) as caught:
        check_run_folder(out, overwrite=True)
    assert f"{name} is a link to nothing" in caught.value.message
    assert (out / name).is_symlink()


def test_yaml_merge_keys_work_and_unknown_tags_are_refused(tmp_path: Path) -> None:
    """`<<: *defaults` inside a variant crashed `recipe validate` with a ConstructorError traceback (exit 1); a
    Python tag did the same. Merge keys now merge (explicit keys win); a tag is bad input naming its line."""
    from llmopt.errors import RecipeError
    from llmopt.recipe import load_recipe

    recipe = tmp_path / "merge.yaml"
    recipe.write_text(
        "name: m\nmodel: {source: m}\nevaluation: {dataset: e.txt}\nvariants:\n"
        "  - &d {name: a, method: gguf, options: {quant_type: q8_0}}\n"
        "  - <<: *d\n    name: b\n    options: {quant_type: q4_k_m}\n"
        "  - <<: [*d]\n    name: c\n"
    )
    loaded = load_recipe(recipe)
    assert [(v.name, v.method, v.options["quant_type"]) for v in loaded.variants] == [
        ("a", "gguf", "q8_0"), ("b", "gguf", "q4_k_m"), ("c", "gguf", "q8_0")
    ]
    recipe.write_text("name: m\nmodel: {source: !!python/name:os.system m}\nevaluation: {dataset: e.txt}\n")
    with pytest.raises(RecipeError, match=r"merge.yaml:2:\d+: not a value a recipe can hold"):
        load_recipe(recipe)
    recipe.write_text("name: m\nmodel: {source: m}\nevaluation: {dataset: e.txt}\nvariants:\n  - <<: 3\n    name: a\n")
    with pytest.raises(RecipeError, match=r"merge.yaml:5: a YAML merge key"):
        load_recipe(recipe)


def test_odd_yaml_is_bad_input_not_a_traceback(tmp_path: Path) -> None:
    """A second hostile round: a list as a key (TypeError), a --set value that is not YAML (ComposerError), and
    nested aliases that made validation take gigabytes (each alias was rebuilt from scratch)."""
    import time

    from llmopt.errors import RecipeError
    from llmopt.recipe import load_recipe, parse_set_flags

    recipe = tmp_path / "r.yaml"
    recipe.write_text("name: m\nmodel: {source: m}\nevaluation: {dataset: e.txt}\nvariants:\n  - {[x, y]: 1}\n")
    with pytest.raises(RecipeError, match=r"r.yaml:5: a key of variants\[0\] is a list or a mapping"):
        load_recipe(recipe)
    for bad in ("x=[1", "x=!!python/name:os.system"):
        with pytest.raises(RecipeError, match="is not valid YAML"):
            parse_set_flags([bad])
    with pytest.raises(RecipeError, match=r"uses a YAML anchor or alias"):  # (an alias to nothing)
        parse_set_flags(["evaluation.max_tokens=*foo"])
    levels = ["a0: &a0 [1, 2, 3, 4, 5, 6, 7, 8, 9, 10]"]
    levels += [f"a{i}: &a{i} [{', '.join([f'*a{i - 1}'] * 10)}]" for i in range(1, 8)]
    head = "name: m\nmodel: {source: m}\nevaluation: {dataset: e.txt}\nextra:\n  "
    recipe.write_text(head + "\n  ".join(levels) + "\n")
    start = time.perf_counter()
    with pytest.raises(RecipeError, match="aliases expand to"):
        load_recipe(recipe)
    assert time.perf_counter() - start < 20
