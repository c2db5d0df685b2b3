"""The new house (issue 13) as a careless or hostile user meets it: ``--json`` / ``--json-file`` on every command,
``-O key=value`` with odd values, hand-edited manifests through eval, run reuse and publish, the model card of
each format. Real processes from a working folder of their own, relative paths.
"""

from __future__ import annotations

import json
import os
import shutil
import stat
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from llmopt.errors import EXIT_ARTIFACT, EXIT_INPUT, EXIT_OK
from tests.adversarial.test_cli_output import RECIPE  # the one-variant int8 recipe those tests run
from tests.helpers import fake_model, first_layers, run_cli


@pytest.mark.skipif(not hasattr(os, "mkfifo"), reason="needs named pipes")
def test_json_file_into_a_named_pipe_writes_into_it_and_keeps_the_pipe(tmp_path: Path) -> None:
    """``--json-file PIPE`` (or /dev/stderr, /dev/null): the atomic write (temp file + rename) put a plain file
    where the pipe was, so the reader got nothing; run as root with /dev/null or /dev/full, it replaced the
    device node itself."""
    os.mkfifo(tmp_path / "pipe")
    # a reader that is already there, without blocking: the writer's open then succeeds at once
    fd = os.open(tmp_path / "pipe", os.O_RDONLY | os.O_NONBLOCK)
    try:
        r = run_cli(["backends", "--json-file", "pipe"], cwd=tmp_path)
        assert r.returncode == EXIT_OK, r.stderr[-2000:]
        assert stat.S_ISFIFO(os.stat(tmp_path / "pipe").st_mode), "the pipe was replaced by a file"
        chunks = []
        while chunk := os.read(fd, 1 << 16):
            chunks.append(chunk)
    finally:
        os.close(fd)
    names = {b["name"] for b in json.loads(b"".join(chunks))}
    assert "bnb-int8" in names


@pytest.fixture(scope="module")
def work(assets: dict[str, Path], tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A working folder holding model/ (SmolLM2 cut to 2 decoder layers) and eval.txt."""
    work = tmp_path_factory.mktemp("house")
    first_layers(assets["model"], work / "model", 2)
    (work / "eval.txt").write_text(assets["eval_text"].read_text()[:4000])
    return work


@pytest.mark.parametrize("value", ["inf", "1e400"])
def test_O_infinite_float_is_refused_not_recorded_as_null(work: Path, value: str) -> None:
    """``-O llm_int8_threshold=inf`` (and ``1e400``, which a float reads as inf) was accepted; JSON has no inf,
    so the artifact's llmopt.json recorded ``"llm_int8_threshold": null``: the manifest no longer said what the
    artifact was made with."""
    out = f"inf-{value}"
    r = run_cli(["quantize", "model", "-m", "bnb-int8", "--device", "cpu", "-o", out, "-O",
                 f"llm_int8_threshold={value}"], cwd=work)  # fmt: skip
    assert r.returncode == EXIT_INPUT, r.stderr[-2000:]
    assert "finite" in r.stderr and "Traceback" not in r.stderr
    assert not (work / out).exists()


def test_O_list_written_with_quotes_names_the_modules_without_them(work: Path) -> None:
    """``-O 'skip_modules=["lm_head"]'`` (a list written the JSON/YAML way) kept the quotes: the module to skip
    was ``"lm_head"``, which matches nothing, so lm_head got quantized and the manifest said ``'"lm_head"'``."""
    r = run_cli(["quantize", "model", "-m", "bnb-int8", "--device", "cpu", "-o", "quoted", "-O",
                 "skip_modules=[\"lm_head\", 'model.layers.1.mlp.down_proj']", "--json"], cwd=work)  # fmt: skip
    assert r.returncode == EXIT_OK, r.stderr[-2000:]
    assert json.loads(r.stdout)["options"]["skip_modules"] == ["lm_head", "model.layers.1.mlp.down_proj"]


EVAL = ["--baseline", "model", "--dataset", "eval.txt", "--context", "16", "--max-tokens", "32", "--device", "cpu",
        "--max-ppl-increase", "1000"]  # fmt: skip


@pytest.fixture(scope="module")
def int8(work: Path) -> Path:
    """work/int8: a bnb-int8 artifact of model/, evaluated (gate passed)."""
    r = run_cli(["quantize", "model", "-m", "bnb-int8", "--device", "cpu", "-o", "int8", "-q"], cwd=work)
    assert r.returncode == EXIT_OK, r.stderr[-2000:]
    r = run_cli(["eval", "int8", *EVAL, "-q"], cwd=work)
    assert r.returncode == EXIT_OK, r.stderr[-2000:]
    return work / "int8"


def edited_copy(int8: Path, name: str, edit: Any) -> str:
    """A copy of the artifact beside it, its llmopt.json changed by ``edit(manifest_dict)``."""
    copy = int8.parent / name
    shutil.rmtree(copy, ignore_errors=True)
    shutil.copytree(int8, copy)
    data = json.loads((copy / "llmopt.json").read_text())
    edit(data)
    (copy / "llmopt.json").write_text(json.dumps(data, indent=2))
    return name


@pytest.mark.parametrize("version", [2, "2", 99])
@pytest.mark.parametrize("command", ["eval", "publish"])
def test_manifest_of_a_newer_schema_is_refused_naming_an_upgrade(int8: Path, version: Any, command: str) -> None:
    """A llmopt.json whose ``schema_version`` is newer than this llmopt's (2, or the string "2") was read as if it
    were schema 1: eval and publish went ahead on fields this version may misread."""
    name = edited_copy(int8, f"schema-{version}", lambda d: d.__setitem__("schema_version", version))
    args = [*EVAL] if command == "eval" else ["me/model", "--dry-run"]
    r = run_cli([command, name, *args, "--json"], cwd=int8.parent)
    assert r.returncode == EXIT_ARTIFACT, r.stderr[-2000:]
    assert r.stdout == "" and "schema" in r.stderr and "pip install -U llmopt" in r.stderr


def test_uploaded_manifest_cuts_paths_relative_to_the_users_folder(work: Path) -> None:
    """Run from a folder of its own with ``../../model``, ``../../eval.txt`` and ``-o ../../rel8``: the uploaded
    llmopt.json cut absolute paths to ``<local>/NAME`` but kept the relative ones as typed, so a public repo
    showed the publisher's folder layout (``../../alice/models/...``)."""
    from tests.hubserver import HubServer

    here = work / "sub" / "deeper"
    here.mkdir(parents=True, exist_ok=True)
    up = ["--baseline", "../../model", "--dataset", "../../eval.txt", *EVAL[4:]]
    r = run_cli(["quantize", "../../model", "-m", "bnb-int8", "--device", "cpu", "-o", "../../rel8", "-q"], cwd=here)
    assert r.returncode == EXIT_OK, r.stderr[-2000:]
    r = run_cli(["eval", "../../rel8", *up, "-q"], cwd=here)
    assert r.returncode == EXIT_OK, r.stderr[-2000:]
    token = "hf_test_house0123456789"
    with HubServer(token) as hub:
        env = {"HF_TOKEN": token, "HF_ENDPOINT": hub.url, "HF_HUB_DISABLE_XET": "1", "HF_HUB_OFFLINE": "0"}
        r = run_cli(["publish", "../../rel8", "org/rel8", "--json"], cwd=here, env=env)
        assert r.returncode == EXIT_OK, r.stderr[-2000:]
        uploaded = hub.commits("org/rel8")[-1].files
    manifest = uploaded["llmopt.json"].decode()
    assert "../" not in manifest, [line for line in manifest.splitlines() if "../" in line]
    data = json.loads(manifest)
    assert data["source"]["model"] == "<local>/model"
    assert data["evaluation"]["settings"]["dataset"] == "<local>/eval.txt"
    assert "../" not in uploaded["README.md"].decode().split("---")[1]  # the card's metadata


def test_json_file_through_a_symlink_updates_the_file_it_names(tmp_path: Path) -> None:
    """``--json-file latest.json`` where latest.json is a link to reports/backends.json: the atomic rename
    replaced the link with a plain file, so reports/backends.json kept its old content and the link was gone."""
    (tmp_path / "reports").mkdir()
    (tmp_path / "reports" / "backends.json").write_text("{}")
    (tmp_path / "latest.json").symlink_to("reports/backends.json")
    r = run_cli(["backends", "--json-file", "latest.json"], cwd=tmp_path)
    assert r.returncode == EXIT_OK, r.stderr[-2000:]
    assert (tmp_path / "latest.json").is_symlink()
    assert "bnb-int8" in {b["name"] for b in json.loads((tmp_path / "reports" / "backends.json").read_text())}


def test_card_model_index_has_the_kl_divergence_and_top1_that_were_gated(int8: Path) -> None:
    """The card's metadata (model-index) listed perplexity only, though every evaluation now measures KL
    divergence and top-1 agreement against FP16 and ``--max-kld``/``--min-top1`` gates publish on them."""
    import yaml

    r = run_cli(["publish", "int8", "me/int8", "--dry-run", "--json"], cwd=int8.parent)
    assert r.returncode == EXIT_OK, r.stderr[-2000:]
    card = json.loads(r.stdout)["card"]
    meta = yaml.safe_load(card.split("---")[1])
    assert meta["library_name"] == "transformers" and "bnb-int8" in meta["tags"]
    metrics = {m["type"]: m for m in meta["model-index"][0]["results"][0]["metrics"]}
    dist = json.loads((int8 / "llmopt.json").read_text())["evaluation"]["artifact"]["distribution"]
    assert metrics["kl_divergence"]["value"] == pytest.approx(dist["kld_mean"], abs=1e-6)
    assert metrics["top1_agreement"]["value"] == pytest.approx(dist["top1_agreement"], abs=1e-6)


@pytest.mark.parametrize("spelling", [["--json", "-"], ["--json=-"]])
def test_json_dash_outside_eval_and_bench_says_to_drop_the_dash(tmp_path: Path, spelling: list[str]) -> None:
    """``llmopt estimate M --json -`` (eval's old spelling, used on another command) ended in click's
    "Got unexpected extra argument(s) (-)", not the one-line error naming what to write instead."""
    fake_model(tmp_path / "m")
    r = run_cli(["estimate", "m", *spelling], cwd=tmp_path)
    assert r.returncode == EXIT_INPUT
    assert r.stdout == ""
    assert r.stderr.startswith("error: --json takes no value") and "--json alone" in r.stderr


def _with_stdout_closed(args: list[str], cwd: Path) -> subprocess.CompletedProcess[str]:
    """``llmopt ARGS >&-``: the process starts with file descriptor 1 closed (Python's sys.stdout is None)."""
    root = Path(__file__).resolve().parents[2]
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(p for p in (str(root), os.environ.get("PYTHONPATH", "")) if p))
    return subprocess.run([sys.executable, "-m", "llmopt", *args], cwd=cwd, env=env, stdin=subprocess.DEVNULL,
                          stderr=subprocess.PIPE, text=True, preexec_fn=lambda: os.close(1), timeout=600)  # fmt: skip


@pytest.mark.skipif(sys.platform == "win32", reason="closes a POSIX file descriptor")
def test_closed_stdout_is_an_error_with_json_and_no_crash_with_json_file(tmp_path: Path) -> None:
    """``llmopt backends --json-file r.json >&-`` crashed at import (a traceback, exit 1: the console asked the
    closed stdout whether it is a terminal); with ``--json`` the JSON was lost in a traceback at the end."""
    r = _with_stdout_closed(["backends", "--json-file", "r.json"], tmp_path)
    assert r.returncode == EXIT_OK and "Traceback" not in r.stderr, r.stderr[-2000:]
    assert json.loads((tmp_path / "r.json").read_text())
    r = _with_stdout_closed(["backends", "--json"], tmp_path)
    assert r.returncode == EXIT_INPUT and "Traceback" not in r.stderr, r.stderr[-2000:]
    assert "stdout" in r.stderr and "--json-file" in r.stderr


@pytest.mark.parametrize("command", [["quantize", "model", "-m", "bnb-int8", "--device", "cpu"],
                                     ["run", "recipe.yaml"]])  # fmt: skip
def test_json_file_that_is_the_output_folder_is_refused_before_any_work(work: Path, command: list[str]) -> None:
    """``quantize ... -o out --json-file out``: a file inside ``-o`` was refused up front, the folder itself was
    not; the whole quantization (or run) went ahead and only then failed on "Is a directory"."""
    (work / "recipe.yaml").write_text(RECIPE)
    r = run_cli([*command, "-o", "same", "--json-file", "same"], cwd=work)
    assert r.returncode == EXIT_INPUT, r.stderr[-2000:]
    assert "the folder this command writes" in r.stderr
    assert not (work / "same").exists()


def test_eval_replaces_a_damaged_stored_evaluation_instead_of_demanding_a_requantization(int8: Path) -> None:
    """A hand-edited evaluation block of the wrong type (``"perplexity": "abc"``) made the whole manifest
    invalid: eval, the command that rewrites that block, refused the artifact and said to re-create it with
    quantize (hours for a large GPTQ model), though its files were intact."""
    name = edited_copy(int8, "damaged-eval", lambda d: d["evaluation"]["artifact"].__setitem__("perplexity", "abc"))
    r = run_cli(["publish", name, "me/x", "--dry-run"], cwd=int8.parent)
    assert r.returncode == EXIT_ARTIFACT and "llmopt eval" in r.stderr  # publish still refuses, naming eval
    r = run_cli(["eval", name, *EVAL, "--json"], cwd=int8.parent)
    assert r.returncode == EXIT_OK, r.stderr[-2000:]
    assert json.loads(r.stdout)["gate"]["passed"] is True
    r = run_cli(["publish", name, "me/x", "--dry-run"], cwd=int8.parent)
    assert r.returncode == EXIT_OK, r.stderr[-2000:]


def test_eval_still_refuses_a_manifest_damaged_outside_its_results(int8: Path) -> None:
    """Only the evaluation and gate blocks are replaceable: a damaged file table or options stay an error."""
    name = edited_copy(int8, "damaged-options", lambda d: d.__setitem__("options", "x"))
    r = run_cli(["eval", name, *EVAL, "--json"], cwd=int8.parent)
    assert r.returncode == EXIT_ARTIFACT and r.stdout == ""
    assert "not a valid manifest" in r.stderr


def test_run_reuses_an_artifact_whose_stored_evaluation_was_damaged(work: Path) -> None:
    """A run's own artifact with a hand-damaged evaluation block: the next run refused the variant ("not a
    valid llmopt manifest ... does not replace it, --overwrite or not") although the artifact's files were
    intact; now it keeps the artifact and evaluates it again."""
    (work / "recipe.yaml").write_text(RECIPE)
    r = run_cli(["run", "recipe.yaml", "-o", "runs/damaged", "-q"], cwd=work)
    assert r.returncode == EXIT_OK, r.stderr[-2000:]
    manifest = work / "runs" / "damaged" / "artifacts" / "a" / "llmopt.json"
    data = json.loads(manifest.read_text())
    data["evaluation"]["artifact"]["perplexity"] = "abc"
    manifest.write_text(json.dumps(data))
    r = run_cli(["run", "recipe.yaml", "-o", "runs/damaged", "--json"], cwd=work)
    assert r.returncode == EXIT_OK, r.stderr[-2000:]
    variant = json.loads(r.stdout)["variants"][0]
    assert variant["status"] == "passed" and variant["quantize"]["reused"] is True
    assert isinstance(json.loads(manifest.read_text())["evaluation"]["artifact"]["perplexity"], float)
