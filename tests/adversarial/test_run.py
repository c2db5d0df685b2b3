"""``llmopt run`` against interrupts, kills, careless output folders and failing measurements.

Real processes from another working folder, on SmolLM2 cut to two decoder layers (real weights, seconds
per variant), bitsandbytes int8 on CPU.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest

from tests.helpers import first_layers, run_cli

ROOT = Path(__file__).resolve().parents[2]

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
  - name: c
    method: bnb-int8
    options: {{llm_int8_threshold: 4.0}}
"""


@pytest.fixture(scope="module")
def small(assets: dict[str, Path], tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A working folder holding model/ (SmolLM2, 2 layers), eval.txt and recipe.yaml, all relative."""
    work = tmp_path_factory.mktemp("run-work")
    first_layers(assets["model"], work / "model", 2)
    (work / "eval.txt").write_text(assets["eval_text"].read_text()[:4000])
    (work / "recipe.yaml").write_text(RECIPE.format(model="model", text="eval.txt"))
    return work


def _popen(args: list[str], cwd: Path) -> subprocess.Popen[str]:
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(ROOT), env.get("PYTHONPATH", "")) if p)
    return subprocess.Popen(
        [sys.executable, "-m", "llmopt", *args],
        cwd=cwd,
        env=env,
        stdin=subprocess.DEVNULL,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )


def _report(out: Path) -> dict[str, Any] | None:
    try:
        return json.loads((out / "report.json").read_text())  # type: ignore[no-any-return]
    except (OSError, ValueError):
        return None


def _wait_finished(proc: subprocess.Popen[str], out: Path, n: int, timeout: float = 600) -> dict[str, Any]:
    """Wait until the run's report lists ``n`` finished variants (polling the file it rewrites)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        report = _report(out)
        if report and sum(1 for v in report["variants"] if v["status"] != "not_run") >= n:
            return report
        if proc.poll() is not None:
            raise AssertionError(f"run ended early ({proc.returncode}): {proc.communicate()[1][-3000:]}")
        time.sleep(0.2)
    proc.kill()
    raise AssertionError("timed out waiting for the report")


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT])
def test_signal_stops_the_whole_run_and_keeps_the_report(small: Path, sig: signal.Signals) -> None:
    """Killed by a timeout (SIGTERM) or Ctrl-C (SIGINT) during variant 2 of 3: exit 130 at once (not the next
    variant), report.json/.md list variant a as done and b, c as not run; no half-written artifact; a rerun
    reuses a and finishes b and c."""
    out = f"out-{sig.name}"
    proc = _popen(["run", "recipe.yaml", "-o", out], small)
    running = _wait_finished(proc, small / out, 1)
    assert running["state"] == "running" and running["exit_code"] is None
    assert [v["status"] for v in running["variants"]] == ["passed", "not_run", "not_run"]
    time.sleep(1.0)  # into variant b's work
    proc.send_signal(sig)
    try:
        _, err = proc.communicate(timeout=120)
    except subprocess.TimeoutExpired:
        proc.kill()
        raise AssertionError("the run did not stop after the signal") from None
    assert proc.returncode == 130, err[-3000:]
    assert "interrupted" in err and "Traceback" not in err
    report = _report(small / out)
    assert report is not None and report["state"] == "interrupted" and report["exit_code"] == 130
    assert [v["status"] for v in report["variants"]] == ["passed", "not_run", "not_run"]
    assert report["counts"]["not_run"] == 2
    md = (small / out / "report.md").read_text()
    assert "Run interrupted" in md and "| b | bnb-int8 |" in md and "not run" in md
    folders = sorted(p.name for p in (small / out / "artifacts").iterdir())
    # b may have been quantized before the signal (then it is whole, and reused below); never half-written,
    # and c never started
    assert folders in (["a"], ["a", "b"]), folders
    assert all((small / out / "artifacts" / f / "llmopt.json").is_file() for f in folders)

    again = run_cli(["run", "recipe.yaml", "-o", out, "--json"], cwd=small)
    assert again.returncode == 0, again.stderr[-3000:]
    final = json.loads(again.stdout)
    assert final["state"] == "complete" and [v["status"] for v in final["variants"]] == ["passed"] * 3
    assert final["variants"][0]["quantize"]["reused"] and final["variants"][0]["evaluation_reused"]


def test_output_home_or_root_is_refused(small: Path, tmp_path: Path) -> None:
    """`output: '~'` in a recipe replaced the user's own report.md/report.json in the home folder, and `output: /`
    validated: both are refused (exit 2) before any work, and the files stay as they were."""
    home = tmp_path / "home"
    home.mkdir()
    (home / "report.md").write_text("my notes")
    recipe = small / "home.yaml"
    recipe.write_text((small / "recipe.yaml").read_text() + "output: '~'\n")
    r = run_cli(["run", "home.yaml"], cwd=small, env={"HOME": str(home)})
    assert r.returncode == 2, r.stderr
    assert "your home folder" in r.stderr and "-> " in r.stderr
    assert (home / "report.md").read_text() == "my notes" and sorted(os.listdir(home)) == ["report.md"]
    r = run_cli(["run", "recipe.yaml", "-o", "/", "--overwrite"], cwd=small)
    assert r.returncode == 2 and "filesystem root" in r.stderr


def test_foreign_folder_needs_overwrite_and_keeps_foreign_files(small: Path) -> None:
    """A non-empty folder llmopt did not make is refused without --overwrite (like quantize); with it the run
    writes only its own files there and deletes nothing; afterwards the folder is the run's (marker), so a
    rerun needs no --overwrite."""
    out = small / "mine"
    out.mkdir()
    (out / "notes.txt").write_text("keep me")
    (out / "report.json").write_text('{"mine": true}')
    r = run_cli(["run", "recipe.yaml", "-o", "mine", "--only", "a"], cwd=small)
    assert r.returncode == 2, r.stderr
    assert "not empty and was not made by llmopt run (it holds notes.txt)" in r.stderr and "--overwrite" in r.stderr
    assert (out / "report.json").read_text() == '{"mine": true}'
    r = run_cli(["run", "recipe.yaml", "-o", "mine", "--only", "a", "--overwrite"], cwd=small)
    assert r.returncode == 0, r.stderr[-3000:]
    assert (out / "notes.txt").read_text() == "keep me" and (out / ".llmopt-run").is_file()
    assert json.loads((out / "report.json").read_text())["schema"] == "llmopt.run/1"
    r = run_cli(["run", "recipe.yaml", "-o", "mine", "--only", "a"], cwd=small)
    assert r.returncode == 0, r.stderr[-3000:]


def test_folder_of_an_older_run_is_accepted(small: Path) -> None:
    """A run folder from before the marker existed (only artifacts/, report.*, plots/) is still resumable."""
    out = small / "older"
    (out / "artifacts").mkdir(parents=True)
    (out / "report.json").write_text('{"schema": "llmopt.run/1", "variants": []}')
    r = run_cli(["run", "recipe.yaml", "-o", "older", "--only", "a"], cwd=small)
    assert r.returncode == 0, r.stderr[-3000:]
