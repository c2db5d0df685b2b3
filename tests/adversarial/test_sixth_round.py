"""What a hostile tester found in the sixth round: a measurement process that outlived its parent killed with SIGKILL
(it went on measuring and left its folder in the temp folder), an input behind ``link/../`` that the run overwrote,
an artifact manifest whose file table pointed outside the folder (the run reused the artifact "up to date"), and an
OSError during an evaluation reported as "generator didn't stop after throw()"."""

from __future__ import annotations

import hashlib
import importlib.util
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from llmopt.errors import EXIT_ARTIFACT, EXIT_INPUT, ArtifactError, OutputPathError
from tests.helpers import fake_model, first_layers

ROOT = Path(__file__).resolve().parents[2]

# --- 1. a parent killed with SIGKILL -------------------------------------------------------------------------------

_PARENT = """\
import os, sys, time
from llmopt.evaluate.bench_process import start_measurement_process
from llmopt.evaluate.throughput import _child_env
child = start_measurement_process("cpu", _child_env(), False)
print(child.proc.pid, child.folder.name, flush=True)
time.sleep(600)
"""


def _gone(pid: int) -> bool:
    """No such process, or a zombie nobody reaped yet (its parent, pid 1 in a container, may not reap)."""
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except (OSError, IndexError):
        return True
    return state in ("Z", "X")


@pytest.mark.skipif(not Path("/proc").is_dir() or not hasattr(signal, "SIGKILL"), reason="POSIX, through /proc")
def test_a_measurement_process_ends_with_its_killed_parent_and_removes_its_folder(tmp_path: Path) -> None:
    """`kill -9` of `llmopt run` while a measurement process waited (or measured): the process went on (importing,
    or measuring for as long as the measurement took, on the GPU beside the rerun's), and its llmopt-bench-* folder
    stayed in the temp folder for good. Now it watches its parent: it ends within about a second, and removes its
    folder."""
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(p for p in (str(ROOT), os.environ.get("PYTHONPATH")) if p)}
    parent = subprocess.Popen([sys.executable, "-c", _PARENT], stdout=subprocess.PIPE, env=env, text=True)
    try:
        assert parent.stdout is not None
        pid_text, folder = parent.stdout.readline().split()
        child = int(pid_text)
        assert Path(folder).is_dir() and not _gone(child)
        time.sleep(1.0)  # it is importing the model stack
    finally:
        parent.kill()
        parent.wait()
    deadline = time.monotonic() + 20
    while (not _gone(child) or Path(folder).exists()) and time.monotonic() < deadline:
        time.sleep(0.1)
    try:
        assert _gone(child), "the measurement process outlived its parent"
        assert not Path(folder).exists(), f"{folder} was left behind"
    finally:
        if not _gone(child):
            os.kill(child, signal.SIGKILL)


def test_a_process_started_ahead_and_not_needed_removes_its_own_folder() -> None:
    """At end of input (not needed, or llmopt ended at once on a third Ctrl-C/SIGTERM before stopping it) the
    waiting process exits and removes its folder itself: llmopt's own clean-up may never come."""
    from llmopt.evaluate.bench_process import start_measurement_process
    from llmopt.evaluate.throughput import _child_env

    child = start_measurement_process("cpu", _child_env(), False)
    try:
        assert child.proc.stdin is not None
        child.proc.stdin.close()
        assert child.proc.wait(timeout=120) == 0
        assert not Path(child.folder.name).exists()
    finally:
        child.stop()


def test_bench_child_reads_its_watch_options() -> None:
    from llmopt.evaluate.bench_child import _options

    assert _options(["--wait", "cuda:0", "--parent", "12", "--folder", "/t/x"]) == (
        ["--wait", "cuda:0"],
        {"--parent": "12", "--folder": "/t/x"},
    )
    assert _options(["req.json", "res.json"]) == (["req.json", "res.json"], {})


# --- 2. `..` after a symlink ----------------------------------------------------------------------------------------


def test_dotdot_after_a_symlink_is_where_the_file_system_goes(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from llmopt.outputs import absolute

    (tmp_path / "deep" / "sub").mkdir(parents=True)
    (tmp_path / "link").symlink_to(tmp_path / "deep" / "sub")
    assert absolute(tmp_path / "link" / ".." / "r" / "x.txt") == tmp_path.resolve() / "deep" / "r" / "x.txt"
    assert absolute(tmp_path / "link" / "x.txt") == tmp_path / "link" / "x.txt"  # a link at the end stays a link
    monkeypatch.chdir(tmp_path)
    assert absolute("link/../r") == tmp_path.resolve() / "deep" / "r"
    assert absolute("./a/./b") == tmp_path / "a" / "b"


def test_input_behind_link_dotdot_under_a_name_the_run_writes_is_refused(tmp_path: Path) -> None:
    """`dataset: /x/link/../r/report.md` (link -> deep/sub, so the file is deep/r/report.md) with `-o deep/r
    --overwrite`: the check removed `link/..` as text, looked for /x/r/report.md, found nothing there, and the run
    replaced the evaluation text with its report.md. Refused now (exit 2), from either spelling of the output."""
    from llmopt.pipeline import run_recipe

    model = fake_model(tmp_path / "model")
    (tmp_path / "deep" / "sub").mkdir(parents=True)
    (tmp_path / "deep" / "r").mkdir()
    (tmp_path / "link").symlink_to(tmp_path / "deep" / "sub")
    text = tmp_path / "deep" / "r" / "report.md"
    text.write_text("The quick brown fox. " * 50)
    spelled = f"{tmp_path}/link/../r/report.md"
    recipe = tmp_path / "r.yaml"
    recipe.write_text(
        f"model: {{source: {model}}}\nevaluation: {{dataset: {spelled}, device: cpu}}\n"
        "variants:\n  - {name: a, method: bnb-int8}\n"
    )
    for out in (tmp_path / "deep" / "r", Path(f"{tmp_path}/link/../r")):
        with pytest.raises(OutputPathError) as info:
            run_recipe(recipe, output=out, overwrite=True)
        assert info.value.exit_code == EXIT_INPUT
        assert "report.md" in info.value.message and "(evaluation.dataset)" in info.value.message, info.value.message
    assert text.read_text().startswith("The quick brown fox.")
    assert not (tmp_path / "deep" / "r" / ".llmopt-run").exists()


def test_input_behind_a_linked_artifacts_folder_is_refused(tmp_path: Path) -> None:
    """out/artifacts a link to another folder, the evaluation text in its a/ beside a damaged llmopt.json, and
    `--overwrite`: the check compared the text's real path with the run folder's, found it outside, and the run
    deleted a/ (the text with it) to quantize a again. Refused now (exit 2), naming the link's target."""
    from llmopt.pipeline import run_recipe

    model = fake_model(tmp_path / "model")
    elsewhere = tmp_path / "elsewhere" / "a"
    elsewhere.mkdir(parents=True)
    (elsewhere / "llmopt.json").write_text("{broken")
    text = elsewhere / "eval.txt"
    text.write_text("The quick brown fox. " * 50)
    out = tmp_path / "out"
    out.mkdir()
    (out / "artifacts").symlink_to(tmp_path / "elsewhere")
    recipe = tmp_path / "r.yaml"
    recipe.write_text(
        f"model: {{source: {model}}}\nevaluation: {{dataset: {text}, device: cpu}}\n"
        "variants:\n  - {name: a, method: bnb-int8}\n  - {name: b, method: bnb-int8}\n"
    )
    with pytest.raises(OutputPathError) as info:
        run_recipe(recipe, output=out, overwrite=True)
    assert info.value.exit_code == EXIT_INPUT
    assert "artifacts/a" in info.value.message and "through a link" in info.value.message, info.value.message
    assert text.read_text().startswith("The quick brown fox.")
    text.rename(tmp_path / "elsewhere" / "eval.txt")  # beside the artifact folders, in none of them: not refused
    recipe.write_text(recipe.read_text().replace(str(text), str(tmp_path / "elsewhere" / "eval.txt")))
    report = run_recipe(recipe, output=out, overwrite=True, only=["b"])  # the fake model then fails b on its own
    assert [v.name for v in report.variants] == ["b"]


# --- 3. a manifest whose file table points outside the artifact -----------------------------------------------------


@pytest.fixture(scope="module")
def int8(assets: dict[str, Path], tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    pytest.importorskip("bitsandbytes")
    from llmopt import api

    root = tmp_path_factory.mktemp("sixth")
    model = first_layers(assets["model"], root / "m2", 2)
    art = api.quantize(str(model), "bnb-int8", root / "int8", device="cpu")
    return {"model": model, "artifact": art.path}


@pytest.mark.parametrize("outside", ["../m2/model.safetensors", "ABSOLUTE"])
def test_manifest_listing_files_outside_its_folder_is_damaged(
    int8: dict[str, Path], tmp_path: Path, outside: str
) -> None:
    """artifacts/a/llmopt.json edited so that its weights entry names the source model's file (`../m2/...` or an
    absolute path, with that file's hash) and the artifact's own weights removed: `verify` hashed the outside file
    and passed, and `llmopt run` reused the artifact ("up to date"), then failed to load it. Now such a manifest is
    damaged: exit 5 naming the entry, and the run's preflight (and --overwrite) treat it as every damaged one."""
    import shutil

    from llmopt.artifact import Artifact
    from llmopt.outputs import unreplaceable_artifact

    art = tmp_path / "a"
    shutil.copytree(int8["artifact"], art)
    (tmp_path / "m2").symlink_to(int8["model"])
    source = int8["model"] / "model.safetensors"
    name = str(source) if outside == "ABSOLUTE" else outside
    manifest = json.loads((art / "llmopt.json").read_text())
    manifest["files"].pop("model.safetensors")
    manifest["files"][name] = {"sha256": hashlib.sha256(source.read_bytes()).hexdigest(), "size": source.stat().st_size}
    (art / "llmopt.json").write_text(json.dumps(manifest))
    (art / "model.safetensors").unlink()
    with pytest.raises(ArtifactError) as info:
        Artifact.open(art)
    assert info.value.exit_code == EXIT_ARTIFACT
    assert name in info.value.message and "not a file of the artifact folder" in info.value.message, info.value.message
    assert unreplaceable_artifact(art) is not None and "not a valid llmopt manifest" in str(unreplaceable_artifact(art))


# --- 4. an OSError inside the KL reference's folder -------------------------------------------------------------------


@pytest.mark.skipif(importlib.util.find_spec("numpy") is None, reason="needs numpy")
def test_an_oserror_during_the_evaluation_is_not_turned_into_a_generator_error() -> None:
    """A model folder without its weights (transformers raises OSError), or a full disk, while the KL reference's
    folder was open: `reference_folder` caught the OSError as its own and yielded again, so `llmopt run` reported
    "RuntimeError: generator didn't stop after throw()" as a bug (exit 1). The real error comes through now."""
    from llmopt.evaluate.kld import reference_folder

    with pytest.raises(OSError, match=r"no file named model\.safetensors"), reference_folder("k6", use_cache=True):
        raise OSError("Error no file named model.safetensors found in directory x.")


# --- 5. the artifact's speed measurement said "model" --------------------------------------------------------------


def test_the_artifacts_speed_measurement_is_named_as_its_scoring(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Its progress lines and errors said "model" ("throughput of model (own process)", "the speed measurement of
    model was killed by SIGKILL" in a run's report) where the scoring says "artifact (bnb-int8)"."""
    from types import SimpleNamespace

    from llmopt import api
    from llmopt.evaluate import throughput
    from llmopt.progress import SilentReporter
    from llmopt.specs import EvalSpec, ThroughputSpec

    labels: list[str] = []

    def measured(path: Path, device: str, settings: object, **kwargs: object) -> dict[str, object]:
        labels.append(str(kwargs.get("label")))
        if len(labels) > 1:
            raise RuntimeError("stop here")
        return {}

    monkeypatch.setattr(throughput, "bench_model", measured)
    art = SimpleNamespace(path=tmp_path, manifest=SimpleNamespace(runner="hf", backend="bnb-int8"))
    spec = EvalSpec(dataset="x.txt", device="cpu", throughput=ThroughputSpec(batch_sizes=[1], prompt_lens=[8]))
    with pytest.raises(RuntimeError, match="stop here"):
        api._measure_speed(spec, art, tmp_path, "cpu", "cpu", SilentReporter(), False, None)  # type: ignore[arg-type]
    assert labels == ["FP16 baseline", "artifact (bnb-int8)"]


# --- 6. whole numbers: other scripts' digits, and the hint for a list item ------------------------------------------


def _recipe_error(tmp_path: Path, extra: str) -> str:
    from llmopt.errors import RecipeError
    from llmopt.recipe import load_recipe

    path = tmp_path / "r.yaml"
    path.write_text(
        "model: {source: m}\nevaluation:\n  dataset: t.txt\n" + extra + "variants:\n  - {name: a, method: bnb-int8}\n"
    )
    with pytest.raises(RecipeError) as info:
        load_recipe(path)
    return info.value.message


@pytest.mark.parametrize("digits", ["\u0661\u0666", "\uff11\uff16"])
def test_a_quoted_number_in_another_scripts_digits_is_not_a_whole_number(tmp_path: Path, digits: str) -> None:
    """`context_length: '١٦'` (Arabic-Indic digits) or full-width '１６' ran as 16: Python's int() reads any
    script's digits. A recipe's quoted whole number is ASCII digits, as `${VAR}` expansion makes them."""
    message = _recipe_error(tmp_path, f"  context_length: '{digits}'\n")
    assert "context_length: expected a whole number" in message, message


def test_a_wrong_item_of_a_list_of_counts_is_shown_as_a_list(tmp_path: Path) -> None:
    """`batch_sizes: [1, true]` said "write e.g. `batch_sizes: 16`", which is itself refused (a list is expected)."""
    message = _recipe_error(tmp_path, "  throughput: {batch_sizes: [1, true]}\n")
    assert "batch_sizes[1]" in message and "`batch_sizes: [1, 8]`" in message, message
    assert "`batch_sizes: 16`" not in message


# --- 7. a failed speed measurement lost the variant's finished scores ------------------------------------------------


def test_a_failed_speed_measurement_keeps_the_finished_scores(
    int8: dict[str, Path], assets: dict[str, Path], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The speed measurement's process killed (or crashed) after the variant's perplexity and KL divergence were
    scored: the variant was an error (exit 4) with nothing else in report.json, while an interrupt at the same point
    kept the scores. Now a failure keeps them too: still an error, not gated, nothing in its manifest (a rerun
    evaluates it again), the scores shown and marked "speed not measured: failed"."""
    from llmopt.evaluate import throughput
    from llmopt.evaluate.throughput import MeasurementError
    from llmopt.pipeline import run_recipe

    text = tmp_path / "eval.txt"
    text.write_text(assets["eval_text"].read_text()[:4000])
    recipe = tmp_path / "r.yaml"
    recipe.write_text(
        f"model: {{source: {int8['model']}}}\n"
        f"evaluation:\n  dataset: {text}\n  context_length: 16\n  max_tokens: 32\n  device: cpu\n"
        "  throughput: {batch_sizes: [1], prompt_lens: [8], gen_len: 2, warmup: 0, repetitions: 1}\n"
        "gates: {max_ppl_increase_pct: 50}\n"
        "variants:\n  - {name: a, method: bnb-int8}\n"
    )

    def crashed(*args: object, **kwargs: object) -> dict[str, object]:
        raise MeasurementError("the speed measurement of FP16 baseline was killed by SIGKILL (signal 9).", None, 4)

    monkeypatch.setattr(throughput, "bench_model", crashed)
    out = tmp_path / "out"
    report = run_recipe(recipe, output=out)
    assert report.exit_code == 4
    data = json.loads((out / "report.json").read_text())
    (a,) = data["variants"]
    assert a["status"] == "error" and a["error"]["exit_code"] == 4 and "SIGKILL" in a["error"]["message"]
    assert a["incomplete"] == "speed not measured: failed" and a.get("gate") is None
    assert a["perplexity"] > 0 and a["evaluation"]["artifact"]["distribution"]["kld_mean"] >= 0
    assert a["evaluation"].get("throughput") is None
    assert any("a: its speed measurement failed" in n for n in data["notes"]), data["notes"]
    assert json.loads((out / "artifacts" / "a" / "llmopt.json").read_text()).get("evaluation") is None
