"""Downstream tasks through lm-eval (--tasks): a task name lm-eval does not know, a broken local task file, tasks on
a GGUF artifact, a recovery gate with no tasks, lm-eval missing. Each is refused before any model is loaded, with
its exit code, and nothing is recorded in the artifact's manifest."""

from __future__ import annotations

import json
import shutil
import sys
from pathlib import Path

import pytest

from llmopt.errors import EXIT_INPUT, EXIT_UNAVAILABLE, LlmoptError
from tests.helpers import first_layers, run_cli

pytest.importorskip("lm_eval", reason="needs the tasks extra: pip install -e '.[tasks]'")

ROOT = Path(__file__).resolve().parents[2]
CLOZE_DIR = ROOT / "tests" / "data" / "britannica_cloze"


@pytest.fixture(scope="module")
def art(assets: dict[str, Path], tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """A real (2-layer SmolLM2) bitsandbytes int8 artifact, never evaluated."""
    pytest.importorskip("bitsandbytes")
    from llmopt import api

    root = tmp_path_factory.mktemp("adv-tasks")
    model = first_layers(assets["model"], root / "smol-2l", 2)
    artifact = api.quantize(str(model), "bnb-int8", root / "int8", device="cpu")
    return {"path": artifact.path, "model": model, "text": assets["eval_text"]}


def _refused(art: dict[str, Path], tasks: list[str], **gate: float) -> LlmoptError:
    """api.evaluate with ``tasks``: the llmopt error it raises; the manifest holds no evaluation afterwards."""
    from llmopt import api
    from llmopt.artifact import Artifact
    from llmopt.specs import EvalSpec, GateSpec

    spec = EvalSpec(dataset=str(art["text"]), max_tokens=256, context_length=128, device="cpu", kld=False,
                    tasks=tasks or None, task_limit=4)  # fmt: skip
    with pytest.raises(LlmoptError) as exc:
        api.evaluate(art["path"], str(art["model"]), spec, gate=GateSpec(**gate))
    assert Artifact.open(art["path"]).manifest.evaluation is None
    return exc.value


def test_unknown_task_name_lists_close_ones(art: dict[str, Path]) -> None:
    """A typo in an lm-eval task name: exit 2 naming the close names lm-eval does know."""
    err = _refused(art, ["hellaswg"])
    assert err.exit_code == EXIT_INPUT
    assert "no task 'hellaswg'" in err.message and "hellaswag" in err.message


def _broken_task(tmp_path: Path, yaml_text: str, data: str | None = None) -> Path:
    folder = tmp_path / "task"
    folder.mkdir()
    (folder / "t.yaml").write_text(yaml_text)
    if data is not None:
        (folder / "t.jsonl").write_text(data)
    return folder / "t.yaml"


GOOD_YAML = (CLOZE_DIR / "britannica_cloze.yaml").read_text().replace("britannica_cloze.jsonl", "t.jsonl")


@pytest.mark.parametrize(
    ("case", "yaml_text", "data", "said"),
    [
        ("YAML syntax", "task: [broken\n", None, "not a valid lm-eval task file"),
        ("no task name", "dataset_path: json\noutput_type: multiple_choice\n", None, "has no 'task:' name"),
        ("data file missing", GOOD_YAML, None, "its data file t.jsonl is not there"),
        ("data not JSON lines", GOOD_YAML, '{"context": "a", "choices": ["b"\nnot json\n',
         "line 1 of its data file"),
        ("unknown key", GOOD_YAML + "no_such_option: 1\n", (CLOZE_DIR / "britannica_cloze.jsonl").read_text(),
         "could not build"),
        ("no examples", GOOD_YAML, "", "t.jsonl is empty"),
    ],
)  # fmt: skip
def test_malformed_local_task_file(
    art: dict[str, Path], tmp_path: Path, case: str, yaml_text: str, data: str | None, said: str
) -> None:
    """A local task file that cannot be a task: exit 2 naming the file and what is wrong, before any model loads."""
    task = _broken_task(tmp_path, yaml_text, data)
    err = _refused(art, [str(task)])
    assert err.exit_code == EXIT_INPUT, case
    assert said in err.message and "Traceback" not in str(err), (case, err.message)


def test_missing_task_file(art: dict[str, Path], tmp_path: Path) -> None:
    err = _refused(art, [str(tmp_path / "nope.yaml")])
    assert err.exit_code == EXIT_INPUT and "no such task file" in err.message


def test_min_recovery_without_tasks(art: dict[str, Path]) -> None:
    """A recovery gate with nothing to read: bad input (2), not a gate that fails or passes on nothing."""
    err = _refused(art, [], min_recovery=0.9)
    assert err.exit_code == EXIT_INPUT and "--tasks" in str(err)


def test_lm_eval_not_installed(art: dict[str, Path], monkeypatch: pytest.MonkeyPatch) -> None:
    """Without lm-eval: exit 4 with the install line."""
    monkeypatch.setitem(sys.modules, "lm_eval", None)  # import lm_eval now raises ImportError
    err = _refused(art, [str(CLOZE_DIR / "britannica_cloze.yaml")])
    assert err.exit_code == EXIT_UNAVAILABLE and "llmopt[tasks]" in str(err)


def test_bad_task_settings_from_the_command_line(art: dict[str, Path]) -> None:
    """--task-limit 0, an empty task name, a non-positive recovery threshold: exit 2, naming the flag."""
    from llmopt.errors import InputError
    from llmopt.specs import eval_spec, gate_spec

    for settings, flag in (({"task_limit": 0}, "--task-limit"), ({"tasks": "a,,b"}, "--tasks")):
        with pytest.raises(InputError, match=flag):
            eval_spec(dataset="x.txt", **settings)
    with pytest.raises(InputError, match="--min-recovery"):
        gate_spec(min_recovery=-1)


def _gguf_artifact(root: Path, model: Path, gguf: Path) -> Path:
    """A GGUF artifact as `llmopt quantize --method gguf` lays it out (the real Q4_1 file, the tokenizer, a manifest
    naming the llama.cpp runner), without needing llama.cpp to make it."""
    from llmopt import __version__
    from llmopt.artifact import Artifact, EnvironmentInfo, Manifest, SourceInfo, hash_tree

    folder = root / "q4"
    folder.mkdir()
    shutil.copy(gguf, folder / "model-Q4_1.gguf")
    for name in ("tokenizer.json", "tokenizer_config.json"):
        shutil.copy(model / name, folder / name)
    manifest = Manifest(
        llmopt_version=__version__,
        backend="gguf",
        format="gguf",
        runner="llamacpp",
        options={"quant_type": "Q4_1"},
        source=SourceInfo(model=str(model), resolved_path=str(model)),
        environment=EnvironmentInfo(python="3", platform="test", device="cpu"),
        files=hash_tree(folder),
    )
    Artifact(folder, manifest).save()
    return folder


@pytest.mark.e2e
def test_tasks_on_a_gguf_artifact(assets: dict[str, Path], tmp_path: Path) -> None:
    """`eval --tasks` on GGUF: lm-eval's interface takes a transformers model, llama.cpp's is another process, so
    exit 2 saying "not for gguf" (never a number), before any model is loaded; the manifest is left alone."""
    gguf = _gguf_artifact(tmp_path, assets["model"], assets["gguf"])
    before = (gguf / "llmopt.json").read_text()
    proc = run_cli(
        ["eval", str(gguf), "--baseline", str(assets["model"]), "--dataset", str(assets["eval_text"]),
         "--device", "cpu", "--tasks", str(CLOZE_DIR / "britannica_cloze.yaml")]
    )  # fmt: skip
    assert proc.returncode == EXIT_INPUT, proc.stderr
    assert "not for gguf" in proc.stderr and "without --tasks" in proc.stderr and "Traceback" not in proc.stderr
    assert (gguf / "llmopt.json").read_text() == before


def test_gguf_in_a_run_is_recorded_as_not_for_gguf(assets: dict[str, Path], tmp_path: Path) -> None:
    """In `llmopt run` a GGUF variant does not stop the others: its evaluation records why it has no task scores."""
    from llmopt.api import _task_plan
    from llmopt.artifact import Artifact
    from llmopt.progress import SilentReporter
    from llmopt.specs import EvalSpec

    gguf = _gguf_artifact(tmp_path, assets["model"], assets["gguf"])
    spec = EvalSpec(dataset="x.txt", tasks=["britannica_cloze.yaml"], task_limit=3)
    plan, record = _task_plan(spec, Artifact.open(gguf), "record", SilentReporter())
    assert plan is None and record is not None and record.scores == []
    assert record.not_run is not None and record.not_run.startswith("not for gguf")
    assert record.requested == ["britannica_cloze.yaml"] and record.limit == 3


def test_unknown_task_in_a_recipe_stops_the_run_before_quantizing(assets: dict[str, Path], tmp_path: Path) -> None:
    """A recipe naming a task lm-eval does not know: exit 2 in the preflight, nothing quantized."""
    recipe = tmp_path / "r.yaml"
    recipe.write_text(
        json.dumps(
            {
                "model": {"source": str(assets["model"])},
                "evaluation": {"dataset": str(assets["eval_text"]), "device": "cpu", "tasks": ["arc_eazy"]},
                "variants": [{"name": "int8", "method": "bnb-int8"}],
            }
        )
    )
    proc = run_cli(["run", str(recipe), "-o", str(tmp_path / "out")])
    assert proc.returncode == EXIT_INPUT, proc.stderr
    assert "no task 'arc_eazy'" in proc.stderr and "arc_easy" in proc.stderr
    assert not (tmp_path / "out" / "artifacts").exists() or not any((tmp_path / "out" / "artifacts").iterdir())
