"""``llmopt run`` against interrupts, kills, careless output folders and failing measurements.

Real processes from another working folder, on SmolLM2 cut to two decoder layers (real weights, seconds
per variant), bitsandbytes int8 on CPU.
"""

from __future__ import annotations

import importlib.util
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
    # the tests that kill "the" measurement process find it as the first one: none started ahead
    env["LLMOPT_BENCH_AHEAD"] = "0"
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
    proc = _popen(["run", "recipe.yaml", "-o", out, "--json"], small)
    running = _wait_finished(proc, small / out, 1)
    assert running["state"] == "running" and running["exit_code"] is None
    assert [v["status"] for v in running["variants"]] == ["passed", "not_run", "not_run"]
    md = (small / out / "report.md").read_text()
    assert "Run in progress" in md and "no exit code yet" in md and "exit code None" not in md
    time.sleep(0.3)  # into variant b's work
    proc.send_signal(sig)
    try:
        printed, err = proc.communicate(timeout=120)
    except subprocess.TimeoutExpired:
        proc.kill()
        raise AssertionError("the run did not stop after the signal") from None
    assert proc.returncode == 130, err[-3000:]
    assert "interrupted" in err and "Traceback" not in err
    report = _report(small / out)
    assert report is not None and report["state"] == "interrupted" and report["exit_code"] == 130
    # --json: the report as written, on stdout (it printed nothing before)
    assert json.loads(printed) == report
    statuses = [v["status"] for v in report["variants"]]
    # the signal lands in b (on a slow machine) or, rarely, just after it: c never runs
    assert statuses in (["passed", "not_run", "not_run"], ["passed", "passed", "not_run"]), statuses
    assert report["counts"]["not_run"] == statuses.count("not_run")
    md = (small / out / "report.md").read_text()
    assert "Run interrupted" in md and "| c | bnb-int8 |" in md and "not run" in md
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


SPEED = """\
  throughput: {batch_sizes: [1], prompt_lens: [8], gen_len: 2, warmup: 0, repetitions: 1}
"""


def _speed_recipe(small: Path) -> str:
    text = (small / "recipe.yaml").read_text().replace("  device: cpu\n", "  device: cpu\n" + SPEED)
    (small / "speed.yaml").write_text(text)
    return "speed.yaml"


def _bench_children(parent: int) -> list[int]:
    """Live speed-measurement processes started by ``parent``."""
    found = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            cmd = (entry / "cmdline").read_bytes().split(b"\0")
            ppid = int((entry / "stat").read_text().rsplit(")", 1)[1].split()[1])
        except (OSError, ValueError, IndexError):
            continue
        if ppid == parent and b"llmopt.evaluate.bench_child" in cmd:
            found.append(int(entry.name))
    return found


def _first_child(proc: subprocess.Popen[str], timeout: float = 600) -> int:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        kids = _bench_children(proc.pid)
        if kids:
            return kids[0]
        if proc.poll() is not None:
            raise AssertionError(f"run ended early ({proc.returncode}): {proc.communicate()[1][-3000:]}")
        time.sleep(0.05)
    proc.kill()
    raise AssertionError("no speed measurement process appeared")


@pytest.mark.skipif(not Path("/proc").is_dir(), reason="finds the measurement process through /proc")
def test_a_dying_speed_measurement_costs_one_variant_only(small: Path) -> None:
    """On the GPU a failed CUDA-graph capture in bnb-int8's speed measurement made the next variant fail to
    quantize in the same process, reported as 'bitsandbytes cannot run ... Use a CUDA GPU'. Each measurement now
    runs in its own process: here the first one (variant a's FP16 side) is killed outright (SIGKILL); a is an
    error that names that cause (exit 4), b and c are measured normally."""
    recipe = _speed_recipe(small)
    proc = _popen(["run", recipe, "-o", "out-crash", "--json"], small)
    child = _first_child(proc)
    os.kill(child, signal.SIGKILL)
    out, err = proc.communicate(timeout=900)
    assert proc.returncode == 4, err[-3000:]
    report = json.loads(out)
    a, b, c = report["variants"]
    assert a["status"] == "error" and a["error"]["stage"] == "evaluate" and a["error"]["exit_code"] == 4
    assert "speed measurement of FP16 baseline was killed by SIGKILL" in a["error"]["message"]
    assert "bitsandbytes" not in a["error"]["message"]
    for v in (b, c):
        assert v["status"] == "passed", v.get("error")
        speed = v["evaluation"]["throughput"]
        assert speed["artifact"]["decode"]["1"]["tokens_per_s"]["median"] > 0
        assert speed["baseline"]["decode"]["1"]["tokens_per_s"]["median"] > 0
    # the FP16 speed is measured once per run (b's measurement; a's was killed) and c is compared with it
    assert b["evaluation"]["throughput"]["baseline"] == c["evaluation"]["throughput"]["baseline"]


def test_a_run_measures_in_processes_started_ahead_when_asked(small: Path) -> None:
    """`llmopt run` with throughput and LLMOPT_BENCH_AHEAD=1 (the GPU default, here on a CPU): the FP16 baseline and
    the first variant are measured by the two processes started with the run, the next variants by one started
    after the measurement before them; the results are the same kind as without."""
    recipe = _speed_recipe(small)
    r = run_cli(["run", recipe, "-o", "out-ahead", "--only", "a", "--only", "b"], cwd=small,
                env={"LLMOPT_BENCH_AHEAD": "1"})  # fmt: skip
    assert r.returncode == 0, r.stderr[-3000:]
    startups = [line for line in r.stderr.splitlines() if "process start-up" in line]
    assert len(startups) == 3, r.stderr[-3000:]  # FP16 once, a, b
    assert all("started ahead" in line for line in startups), startups
    report = _report(small / "out-ahead")
    assert report is not None
    for v in report["variants"]:
        assert v["status"] == "passed", v.get("error")
        assert v["evaluation"]["throughput"]["artifact"]["decode"]["1"]["tokens_per_s"]["median"] > 0


@pytest.mark.skipif(not Path("/proc").is_dir(), reason="finds the measurement process through /proc")
def test_sigterm_reaches_the_speed_measurement(small: Path) -> None:
    """SIGTERM to `llmopt run` while a speed measurement runs in its own process stops that process too, and
    the run exits 130 with its report."""
    recipe = _speed_recipe(small)
    proc = _popen(["run", recipe, "-o", "out-term"], small)
    child = _first_child(proc)
    time.sleep(0.5)
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 130, err[-3000:]
    assert not Path(f"/proc/{child}").exists()  # stopped and reaped, not orphaned
    report = _report(small / "out-term")
    assert report is not None and report["state"] == "interrupted"


def test_bnb_failure_on_a_present_gpu_does_not_blame_the_machine(monkeypatch: pytest.MonkeyPatch) -> None:
    """'bitsandbytes cannot run on cuda:0 here ... Use a CUDA GPU' was printed on an H200 whose CUDA state an
    earlier failure had broken: with a GPU present the message names the underlying exception and the process
    state, never 'Use a CUDA GPU'."""
    import bitsandbytes.functional  # noqa: F401 - imported before CUDA is faked available
    import torch

    from llmopt.backends.bnb import _probe
    from llmopt.errors import BackendUnavailableError

    def broken(*args: Any, **kwargs: Any) -> Any:
        raise RuntimeError("Offset increment outside graph capture encountered unexpectedly.\nmore")

    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch, "randn", broken)
    with pytest.raises(BackendUnavailableError) as info:
        _probe("cuda:0", four_bit=True)
    assert "RuntimeError: Offset increment outside graph capture encountered unexpectedly." in info.value.message
    assert "cannot run" not in info.value.message and "Use a CUDA GPU" not in str(info.value.hint)
    assert "fresh process" in str(info.value.hint)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    with pytest.raises(BackendUnavailableError) as info:
        _probe("cuda:0", four_bit=True)
    assert "Use a CUDA GPU" in str(info.value.hint)


def test_run_wide_problems_stop_the_run_before_any_variant(small: Path) -> None:
    """Calibration text too short for samples x seq_len was reported per variant, after FP16 and the uncalibrated
    variants had run. Now it, and too little disk for the artifacts, stop the run before the first variant, with
    numbers and a next step."""
    (small / "short-calib.txt").write_text("A few words of calibration text only. " * 20)
    recipe = small / "calib.yaml"
    # the GPTQ variant comes after the bnb ones, as in the report
    recipe.write_text(
        (small / "recipe.yaml").read_text()
        + "  - name: gptq4\n    method: gptq\n    options: {bits: 4, group_size: 64}\n"
        + "calibration: {dataset: short-calib.txt, samples: 64, seq_len: 128}\n"
    )
    start = time.perf_counter()
    r = run_cli(["run", "calib.yaml", "-o", "out-calib"], cwd=small)
    assert r.returncode == 2, r.stderr[-3000:]
    assert "calibration text 'short-calib.txt' has" in r.stderr and "64 asked" in r.stderr and "-> Lower" in r.stderr
    assert not (small / "out-calib").exists()  # nothing ran, nothing was written
    assert time.perf_counter() - start < 120

    # a model whose artifacts cannot fit on any disk (its config says so; its weights are a stub)
    from tests.helpers import SMOLLM2_CONFIG, fake_model

    fake_model(small / "huge", {**SMOLLM2_CONFIG, "hidden_size": 65536, "num_attention_heads": 64,
                                       "num_key_value_heads": 8, "intermediate_size": 262144,
                                       "num_hidden_layers": 2000})  # fmt: skip
    (small / "huge.yaml").write_text((small / "recipe.yaml").read_text().replace("source: model", "source: huge"))
    r = run_cli(["run", "huge.yaml", "-o", "out-huge"], cwd=small)
    assert r.returncode == 4, r.stderr[-3000:]
    assert "not enough disk space for the artifacts: up to" in r.stderr and "GB free on" in r.stderr
    assert "(a " in r.stderr and "-> Free space there" in r.stderr
    assert not (small / "out-huge").exists()


def test_unwritable_output_stops_the_run_first(small: Path, tmp_path: Path) -> None:
    """An output folder that cannot be written is reported before any variant, not after the first quantization."""
    locked = tmp_path / "locked"
    locked.mkdir()
    locked.chmod(0o500)
    try:
        if os.access(locked, os.W_OK):
            pytest.skip("running as a user who can write anywhere")
        r = run_cli(["run", "recipe.yaml", "-o", str(locked / "out")], cwd=small)
        assert r.returncode == 2 and "is not writable" in r.stderr, r.stderr[-3000:]
    finally:
        locked.chmod(0o700)


@pytest.mark.skipif(importlib.util.find_spec("gptqmodel") is None, reason="needs gptqmodel")
def test_gptqmodel_debug_dumps_stay_out_of_a_run(small: Path, assets: dict[str, Path]) -> None:
    """GPTQModel printed 'Files in directory:' and whole 'Content of saved config.json' dumps into a run's output
    on every save; they are dropped unless LLMOPT_THIRD_PARTY_LOGS=1 asks for third-party output."""
    (small / "calib.txt").write_text(assets["calibration_text"].read_text()[:20000])
    (small / "gptq.yaml").write_text(
        RECIPE.format(model="model", text="eval.txt").split("variants:")[0]
        + "calibration: {dataset: calib.txt, samples: 4, seq_len: 64}\n"
        + "variants:\n  - name: g4\n    method: gptq\n    options: {bits: 4, group_size: 64}\n"
    )
    r = run_cli(["run", "gptq.yaml", "-o", "out-gptq", "--only", "g4"], cwd=small)
    assert r.returncode in (0, 3), r.stderr[-3000:]
    for stream in (r.stdout, r.stderr):
        assert "Files in directory:" not in stream and "Content of saved" not in stream


def test_a_linked_variant_folder_that_cannot_be_reused_is_replaced_not_written_through(small: Path) -> None:
    """artifacts/b of one run a link to another run's artifact made with other options: b is quantized again, and
    the new artifact takes the link's place; the other run's artifact (and its manifest) stays as it was."""
    r = run_cli(["run", "recipe.yaml", "-o", "first", "--only", "a"], cwd=small)
    assert r.returncode == 0, r.stderr[-3000:]
    theirs = small / "first" / "artifacts" / "a"
    before = {p.name: p.read_bytes() for p in theirs.iterdir() if p.is_file()}
    r = run_cli(["run", "recipe.yaml", "-o", "second", "--only", "a"], cwd=small)  # a run folder of its own
    assert r.returncode == 0, r.stderr[-3000:]
    link = small / "second" / "artifacts" / "b"
    link.symlink_to(theirs)
    r = run_cli(["run", "recipe.yaml", "-o", "second", "--only", "b"], cwd=small)
    assert r.returncode == 0, r.stderr[-3000:]
    assert {p.name: p.read_bytes() for p in theirs.iterdir() if p.is_file()} == before
    assert not link.is_symlink() and (link / "llmopt.json").is_file()
    manifest = json.loads((link / "llmopt.json").read_text())
    assert manifest["options"]["llm_int8_threshold"] == 5.0
    assert "link" in r.stderr + r.stdout
