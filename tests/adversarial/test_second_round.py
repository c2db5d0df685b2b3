"""What a second hostile tester broke after the first round of fixes (each case failed on that code).

Real processes from a working folder, relative paths, SmolLM2 cut to one decoder layer (bnb-int8 in seconds).
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tests.helpers import first_layers, run_cli

ROOT = Path(__file__).resolve().parents[2]

RECIPE = """\
name: second-round
model:
  source: {model}
evaluation:
  dataset: eval.txt
  context_length: 128
  max_tokens: 512
  device: cpu
gates:
  max_ppl_increase_pct: 50
variants:
  - name: bnb-int8
    method: bnb-int8
  - name: b
    method: bnb-int8
    options: {{llm_int8_threshold: 5.0}}
"""


@pytest.fixture(scope="module")
def work(assets: dict[str, Path], tmp_path_factory: pytest.TempPathFactory) -> Path:
    """model/ (SmolLM2, 1 layer), eval.txt, recipe.yaml and an artifact art/ (bnb-int8), all relative."""
    work = tmp_path_factory.mktemp("second-round")
    first_layers(assets["model"], work / "model", 1)
    (work / "eval.txt").write_text(assets["eval_text"].read_text()[:3000])
    (work / "recipe.yaml").write_text(RECIPE.format(model="model"))
    r = run_cli(["quantize", "model", "-m", "bnb-int8", "-o", "art"], cwd=work)
    assert r.returncode == 0, r.stderr[-3000:]
    return work


def _tree(folder: Path) -> dict[str, bytes]:
    return {p.relative_to(folder).as_posix(): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


@pytest.mark.parametrize("manifest", ["{}", "not json at all", '{"schema_version": 1, "files": {"src": {}}}'])
def test_overwrite_never_replaces_a_folder_whose_manifest_is_not_valid(work: Path, manifest: str) -> None:
    """`--overwrite` replaced a folder whose llmopt.json did not parse (deleting src/main.py and NOTES.txt, exit 0)."""
    proj = work / "proj"
    (proj / "src").mkdir(parents=True, exist_ok=True)
    (proj / "src" / "main.py").write_text("print(1)\n")
    (proj / "NOTES.txt").write_text("notes\n")
    (proj / "llmopt.json").write_text(manifest)
    before = _tree(proj)
    r = run_cli(["quantize", "model", "-m", "bnb-int8", "-o", "proj", "--overwrite"], cwd=work)
    assert r.returncode == 2, r.stderr[-2000:]
    assert "not a valid llmopt manifest" in r.stderr
    assert _tree(proj) == before


def test_run_keeps_a_users_file_beside_an_invalid_manifest(work: Path) -> None:
    """`llmopt run` (no --overwrite) deleted my-notes.txt from runs/c/artifacts/bnb-int8 holding `{}` as manifest."""
    folder = work / "runs" / "c" / "artifacts" / "bnb-int8"
    folder.mkdir(parents=True)
    (folder / "llmopt.json").write_text("{}")
    (folder / "my-notes.txt").write_text("precious\n")
    r = run_cli(["run", "recipe.yaml", "--only", "bnb-int8", "-o", "runs/c"], cwd=work)
    assert r.returncode == 2, r.stderr[-2000:]
    assert (folder / "my-notes.txt").read_text() == "precious\n"


def test_eval_json_inside_the_baseline_folder_is_refused(work: Path) -> None:
    """`eval --json modelB/config.json` replaced the baseline's config.json with the report (exit 0)."""
    import shutil

    shutil.copytree(work / "model", work / "modelB")
    before = (work / "modelB" / "config.json").read_bytes()
    for target in ("modelB/config.json", "modelB/report.json"):
        r = run_cli(
            ["eval", "art", "--baseline", "modelB", "--dataset", "eval.txt", "--max-tokens", "128", "--json", target],
            cwd=work,
        )
        assert r.returncode == 2, r.stderr[-2000:]
        assert "modelB" in r.stderr
    assert (work / "modelB" / "config.json").read_bytes() == before
    assert not (work / "modelB" / "report.json").exists()


@pytest.mark.parametrize("output", ["model/runs", "model"])
def test_run_output_inside_the_model_is_refused_before_writing(work: Path, output: str) -> None:
    """`run -o model/runs` wrote report.json/report.md/.llmopt-run into the model folder, then failed per variant."""
    before = _tree(work / "model")
    r = run_cli(["run", "recipe.yaml", "-o", output, "--overwrite"], cwd=work)
    assert r.returncode == 2, r.stderr[-2000:]
    assert "inside the input" in r.stderr or "is the input" in r.stderr
    assert _tree(work / "model") == before


def test_run_does_not_take_a_users_report_md_and_plots_for_a_run(work: Path) -> None:
    """A folder holding only report.md and plots/ (the user's) was written into without --overwrite."""
    docs = work / "userdocs"
    (docs / "plots").mkdir(parents=True)
    (docs / "report.md").write_text("# My thesis report\n")
    (docs / "plots" / "perplexity_vs_size.png").write_text("mine\n")
    before = _tree(docs)
    r = run_cli(["run", "recipe.yaml", "--only", "bnb-int8", "-o", "userdocs"], cwd=work)
    assert r.returncode == 2, r.stderr[-2000:]
    assert _tree(docs) == before


def test_report_merge_follows_the_run_folder_rules(work: Path) -> None:
    """`report merge -o DIR` replaced a user's report.md, and wrote into the model folder."""
    r = run_cli(["run", "recipe.yaml", "--only", "bnb-int8", "-o", "runs/a"], cwd=work)
    assert r.returncode == 0, r.stderr[-3000:]
    mine = work / "mergeout"
    mine.mkdir()
    (mine / "report.md").write_text("my notes\n")
    for target in ("mergeout", "model"):
        before = _tree(work / target)
        r = run_cli(["report", "merge", "runs/a/report.json", "-o", target], cwd=work)
        assert r.returncode == 2, r.stderr[-2000:]
        assert _tree(work / target) == before
    r = run_cli(["report", "merge", "runs/a/report.json", "-o", "merged"], cwd=work)
    assert r.returncode == 0, r.stderr[-2000:]
    assert json.loads((work / "merged" / "report.json").read_text())["state"] == "complete"


def test_output_through_a_symlink_lands_in_its_target(work: Path) -> None:
    """`-o qdlink` (a link to qd/) turned the link into a folder, left qd/ empty and a hidden .qdlink.llmopt-old-*."""
    (work / "qd").mkdir()
    (work / "qdlink").symlink_to("qd")
    r = run_cli(["quantize", "model", "-m", "bnb-int8", "-o", "qdlink"], cwd=work)
    assert r.returncode == 0, r.stderr[-2000:]
    assert (work / "qdlink").is_symlink()
    assert (work / "qd" / "llmopt.json").is_file()
    assert not list(work.glob(".qdlink.*")) and not list(work.glob(".qd.llmopt-*"))


def test_stride_beyond_the_context_stops_a_run_before_any_variant(work: Path) -> None:
    """`--set evaluation.stride=100000` quantized each variant first and failed only in its evaluation."""
    r = run_cli(["run", "recipe.yaml", "-o", "runs/stride", "--set", "evaluation.stride=100000"], cwd=work)
    assert r.returncode == 2, r.stderr[-2000:]
    assert "--stride" in r.stderr or "stride" in r.stderr
    assert not (work / "runs" / "stride" / "artifacts").exists()


@pytest.mark.skipif(sys.platform != "linux", reason="signals as on Linux")
def test_a_repeated_sigterm_still_ends_the_run_with_130(work: Path) -> None:
    """CI runners and `docker stop` send SIGTERM again: the second one ended the run by the signal (exit 143)."""
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(ROOT), env.get("PYTHONPATH", "")) if p)
    proc = subprocess.Popen(
        [sys.executable, "-m", "llmopt", "run", "recipe.yaml", "-o", "runs/term"],
        cwd=work,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    deadline = time.monotonic() + 300
    while time.monotonic() < deadline and not (work / "runs" / "term" / "report.json").exists():
        time.sleep(0.05)
    assert proc.poll() is None, proc.communicate()[1][-2000:]
    proc.send_signal(signal.SIGTERM)
    time.sleep(0.3)
    if proc.poll() is None:
        proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=300)
    assert proc.returncode == 130, err[-2000:]
    report = json.loads((work / "runs" / "term" / "report.json").read_text())
    assert report["state"] == "interrupted"


def test_publish_refuses_a_manifest_listing_files_the_folder_lacks(work: Path) -> None:
    """A files entry for a file that does not exist was published: the upload's hashes matched the evaluation, and
    nothing compared the manifest's own table with the folder."""
    import shutil

    from llmopt.artifact import FileEntry, Manifest

    r = run_cli(
        ["eval", "art", "--baseline", "model", "--dataset", "eval.txt", "--max-tokens", "512", "--context", "128",
         "--max-ppl-increase", "50"],
        cwd=work,
    )  # fmt: skip
    assert r.returncode == 0, r.stderr[-3000:]
    shutil.copytree(work / "art", work / "art-edited")
    path = work / "art-edited" / "llmopt.json"
    manifest = Manifest.model_validate_json(path.read_text())
    manifest.files["extra.bin"] = FileEntry(sha256="0" * 64, size=1)
    path.write_text(manifest.model_dump_json(indent=2))
    r = run_cli(["publish", "art-edited", "me/x", "--dry-run"], cwd=work)
    assert r.returncode == 5, r.stderr[-2000:]
    assert "extra.bin" in r.stderr
