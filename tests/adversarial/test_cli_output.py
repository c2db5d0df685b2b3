"""One convention for machine-readable output (issue 13, item 6): ``--json`` prints the result as JSON to stdout
and nothing else goes there; ``--json-file PATH`` writes the same JSON to a file. eval and bench took
``--json FILE`` (``-`` = stdout) before: those spellings still work, with a note on stderr.

Real processes from a working folder of their own (relative paths), on SmolLM2 cut to two decoder layers,
bitsandbytes int8 on CPU.
"""

from __future__ import annotations

import json
import subprocess
from pathlib import Path
from typing import Any

import pytest

from llmopt.errors import EXIT_INPUT, EXIT_OK
from tests.helpers import fake_model, first_layers, run_cli

RECIPE = """\
model:
  source: model
evaluation:
  dataset: eval.txt
  context_length: 16
  max_tokens: 32
  device: cpu
gates:
  max_ppl_increase_pct: 1000
variants:
  - name: a
    method: bnb-int8
"""

# every evaluation records a gate that passes: publish (last) reads the latest one
EVAL = ["--baseline", "model", "--dataset", "eval.txt", "--context", "16", "--max-tokens", "32", "--device", "cpu",
        "--max-ppl-increase", "1000"]  # fmt: skip
BENCH = ["--device", "cpu", "--batch-sizes", "1", "--prompt-lens", "8", "--gen-len", "2", "--warmup", "0",
         "--repetitions", "1"]  # fmt: skip
DEPRECATED = "is deprecated and goes away"


def only_json(r: subprocess.CompletedProcess[str]) -> Any:
    """stdout is one JSON document and nothing else (json.loads refuses anything around it)."""
    assert r.returncode == EXIT_OK, r.stderr[-3000:]
    return json.loads(r.stdout)


@pytest.fixture(scope="module")
def work(assets: dict[str, Path], tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A folder holding model/ (2 layers), eval.txt, recipe.yaml and int8/, a bnb-int8 artifact made with
    ``quantize --json``, evaluated so that its gate passes."""
    work = tmp_path_factory.mktemp("json-work")
    first_layers(assets["model"], work / "model", 2)
    (work / "eval.txt").write_text(assets["eval_text"].read_text()[:4000])
    (work / "recipe.yaml").write_text(RECIPE)
    r = run_cli(["quantize", "model", "-m", "bnb-int8", "--device", "cpu", "-o", "int8", "--json"], cwd=work)
    manifest = only_json(r)
    assert manifest["backend"] == "bnb-int8" and (work / "int8" / "llmopt.json").is_file()
    r = run_cli(["eval", "int8", *EVAL, "--json"], cwd=work)
    assert only_json(r)["gate"]["passed"]
    return work


def test_quantize_json_file_inside_the_new_artifact_is_refused(work: Path) -> None:
    """A JSON file written into the artifact after quantizing is a file its manifest does not list."""
    r = run_cli(["quantize", "model", "-m", "bnb-int8", "--device", "cpu", "-o", "int8b", "--json-file",
                 "int8b/manifest.json"], cwd=work)  # fmt: skip
    assert r.returncode == EXIT_INPUT, r.stderr
    assert "inside int8b" in r.stderr and "--json-file int8b.json" in r.stderr
    assert not (work / "int8b").exists()


def test_quantize_json_file_keeps_the_human_output(work: Path) -> None:
    r = run_cli(["quantize", "model", "-m", "bnb-int8", "--device", "cpu", "-o", "int8c", "--json-file",
                 "reports/int8c.json"], cwd=work)  # fmt: skip
    assert r.returncode == EXIT_OK, r.stderr
    assert "artifact written to" in r.stdout
    assert json.loads((work / "reports" / "int8c.json").read_text())["backend"] == "bnb-int8"


def test_eval_json_is_stdout_and_json_file_is_a_file(work: Path) -> None:
    r = run_cli(["eval", "int8", *EVAL, "--json"], cwd=work)
    report = only_json(r)
    assert report["schema"] == "llmopt.eval/2" and DEPRECATED not in r.stderr
    r = run_cli(["eval", "int8", *EVAL, "--json-file", "eval-report.json"], cwd=work)
    assert r.returncode == EXIT_OK, r.stderr
    assert "perplexity on" in r.stdout  # the table stays on stdout
    saved = json.loads((work / "eval-report.json").read_text())
    assert saved["artifact"]["perplexity"] == report["artifact"]["perplexity"]


def test_eval_old_spellings_still_work_with_a_note(work: Path) -> None:
    """`eval --json FILE` writes the file (as before the convention), `--json -` prints to stdout."""
    r = run_cli(["eval", "int8", *EVAL, "--json", "old-report.json"], cwd=work)
    assert r.returncode == EXIT_OK, r.stderr
    assert json.loads((work / "old-report.json").read_text())["schema"] == "llmopt.eval/2"
    assert "perplexity on" in r.stdout
    notes = [line for line in r.stderr.splitlines() if DEPRECATED in line]
    assert len(notes) == 1 and "--json-file old-report.json" in notes[0]
    r = run_cli(["eval", "int8", *EVAL, "--json", "-"], cwd=work)
    assert only_json(r)["schema"] == "llmopt.eval/2"
    assert "write `--json`" in r.stderr


def test_eval_json_switch_before_the_artifact(work: Path) -> None:
    """`eval --json ARTIFACT ...`: the word after the switch is the artifact, not a report file."""
    r = run_cli(["eval", "--json", "int8", *EVAL], cwd=work)
    assert only_json(r)["schema"] == "llmopt.eval/2"
    assert DEPRECATED not in r.stderr
    assert not (work / "int8" / "int8").exists()


def test_bench_json_new_and_old(work: Path) -> None:
    r = run_cli(["bench", "int8", *BENCH, "--json"], cwd=work)
    assert "runs" in only_json(r)
    r = run_cli(["bench", "int8", *BENCH, "--json", "speed.json"], cwd=work)
    assert r.returncode == EXIT_OK, r.stderr
    assert "runs" in json.loads((work / "speed.json").read_text()) and DEPRECATED in r.stderr


def test_run_and_report_merge_json(work: Path) -> None:
    r = run_cli(["run", "recipe.yaml", "-o", "runs/x", "--json"], cwd=work)
    report = only_json(r)
    assert [v["name"] for v in report["variants"]] == ["a"]
    r = run_cli(["report", "merge", "runs/x", "-o", "merged", "--json"], cwd=work)
    assert [v["name"] for v in only_json(r)["variants"]] == ["a"]
    r = run_cli(["report", "merge", "runs/x", "-o", "merged2", "--json-file", "merged2.json"], cwd=work)
    assert r.returncode == EXIT_OK, r.stderr
    assert "merged 1 report" in r.stdout and json.loads((work / "merged2.json").read_text())["variants"]


def test_speculate_json(work: Path) -> None:
    r = run_cli(["speculate", "model", "--draft", "int8", "--device", "cpu", "--max-new-tokens", "4", "--json"],
                cwd=work)  # fmt: skip
    # exit 3 would only mean the greedy outputs differed; stdout is JSON either way
    assert r.returncode in (EXIT_OK, 3), r.stderr[-3000:]
    assert "speedup" in json.loads(r.stdout)


def test_publish_dry_run_json(work: Path) -> None:
    pytest.importorskip("huggingface_hub")
    r = run_cli(["publish", "int8", "org/smol-int8", "--dry-run", "--json"], cwd=work, env={"HF_HUB_OFFLINE": "1"})
    result = only_json(r)
    assert result["card"].startswith("---\n") and result["files"]


def test_commands_without_a_model(work: Path) -> None:
    """backends, estimate, recipe validate/schema and plan: --json on stdout, --json-file to a file."""
    assert {"gptq", "bnb-int8"} <= {b["name"] for b in only_json(run_cli(["backends", "--json"], cwd=work))}
    r = run_cli(["backends", "--json-file", "backends.json"], cwd=work)
    assert "llmopt backends" in r.stdout and json.loads((work / "backends.json").read_text())
    assert only_json(run_cli(["backends", "--options", "gptq", "--json"], cwd=work))["method"] == "gptq"
    r = run_cli(["backends", "--options", "gptq", "--json-file", "gptq-options.json"], cwd=work)
    assert "options of gptq" in r.stdout and json.loads((work / "gptq-options.json").read_text())["options"]
    assert only_json(run_cli(["estimate", "model", "--json"], cwd=work))["parameters"]
    r = run_cli(["estimate", "model", "--json-file", "estimate.json"], cwd=work)
    assert r.returncode == EXIT_OK and "Smallest fit" in r.stdout
    assert json.loads((work / "estimate.json").read_text())["parameters"]
    assert only_json(run_cli(["recipe", "validate", "recipe.yaml", "--json"], cwd=work))["variants"]
    assert only_json(run_cli(["recipe", "schema", "--json"], cwd=work))["type"] == "object"
    r = run_cli(["recipe", "schema", "--json-file", "schema.json"], cwd=work)
    assert r.returncode == EXIT_OK and r.stdout == ""
    assert json.loads((work / "schema.json").read_text())["type"] == "object"
    jobs = only_json(run_cli(["plan", "recipe.yaml", "--json"], cwd=work))
    assert [j["variant"] for j in jobs] == ["a"]


@pytest.mark.parametrize(
    "args",
    [
        ["estimate", "model", "--json", "out.json"],
        ["estimate", "model", "--json=out.json"],
        ["backends", "--json", "out.json"],
        ["recipe", "validate", "recipe.yaml", "--json", "out.json"],
    ],
)
def test_a_file_after_the_json_switch_is_explained(tmp_path: Path, args: list[str]) -> None:
    """`llmopt estimate M --json out.json` failed with "unexpected extra argument"; now the message names
    --json-file, and nothing is written."""
    work = tmp_path
    fake_model(work / "model")
    (work / "recipe.yaml").write_text(RECIPE)
    r = run_cli(args, cwd=work)
    assert r.returncode == EXIT_INPUT, r.stderr
    assert r.stderr.startswith("error: --json takes no value")
    assert "--json-file out.json" in r.stderr and r.stdout == ""
    assert not (work / "out.json").exists()
