"""Speed measurements' processes started ahead (llmopt/evaluate/bench_process.py), on CPU with a tiny model.

Each measurement still runs in a fresh process of its own; inside ``measurement_processes_ahead`` that process is
started while the run does other work. Checked: a started process is used, a mismatched one never is, one that
died is reported as its measurement's failure without touching the next, and nothing is left running.
"""

from __future__ import annotations

import importlib.util
import os
import signal
import time
from pathlib import Path
from typing import Any

import pytest

from llmopt.evaluate import bench_process
from llmopt.evaluate.bench_process import ahead_enabled_by_default
from llmopt.evaluate.throughput import ThroughputSettings, bench_model, measurement_processes_ahead
from llmopt.progress import SilentReporter
from tests.helpers import random_models

pytestmark = pytest.mark.skipif(importlib.util.find_spec("torch") is None, reason="needs torch")
SMALL = ThroughputSettings(batch_sizes=[1], prompt_lens=[8], gen_len=3, warmup=0, repetitions=1)


class Lines(SilentReporter):
    def __init__(self) -> None:
        self.lines: list[str] = []

    def info(self, message: str) -> None:
        self.lines.append(message)


@pytest.fixture(scope="module")
def tiny(tmp_path_factory: pytest.TempPathFactory) -> Path:
    import torch

    rm = random_models()
    folder = tmp_path_factory.mktemp("tiny") / "model"
    rm.save_fp16(rm.build_fp16(rm.llama_config("tiny"), "cpu").to(torch.float32), folder)
    return folder


def _children() -> list[int]:
    """This process's live bench_child processes."""
    found = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            cmd = (entry / "cmdline").read_bytes()
            ppid = int((entry / "stat").read_text().rsplit(")", 1)[1].split()[1])
        except (OSError, ValueError, IndexError):
            continue
        if ppid == os.getpid() and b"llmopt.evaluate.bench_child" in cmd:
            found.append(int(entry.name))
    return found


def _count_settles_at(expected: int, seconds: float = 20) -> int:
    """How many bench_child processes this process has, once that number is ``expected`` or ``seconds`` have
    passed. A CI run on a loaded 2-core machine once found 1 of 2 in /proc right after both were started, and
    the same test passed alone; the cause was not pinned down. What is checked is how many exist, not how fast
    /proc shows them; ``_waiting_alive`` (asserted first) says whether a started process died."""
    deadline = time.monotonic() + seconds
    found = len(_children())
    while found != expected and time.monotonic() < deadline:
        time.sleep(0.05)
        found = len(_children())
    return found


def _waiting_alive() -> int:
    return sum(1 for w in bench_process._AHEAD.waiting if w.proc.poll() is None)


def _measure(tiny: Path, rep: Lines) -> dict[str, Any]:
    return bench_model(tiny, "cpu", SMALL, runner_kind="hf", label="tiny", reporter=rep)


def test_on_by_default_only_where_the_cpu_is_idle(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("LLMOPT_BENCH_AHEAD", raising=False)
    assert ahead_enabled_by_default("cuda:0") and ahead_enabled_by_default("cuda:0,1")
    assert not ahead_enabled_by_default("cpu")
    monkeypatch.setenv("LLMOPT_BENCH_AHEAD", "1")
    assert ahead_enabled_by_default("cpu")
    monkeypatch.setenv("LLMOPT_BENCH_AHEAD", "0")
    assert not ahead_enabled_by_default("cuda:0")
    monkeypatch.setenv("LLMOPT_BENCH_AHEAD", "True")
    assert ahead_enabled_by_default("cpu")
    monkeypatch.setenv("LLMOPT_BENCH_AHEAD", "off")
    assert not ahead_enabled_by_default("cuda:0")


@pytest.mark.skipif(not Path("/proc").is_dir(), reason="finds the processes through /proc")
def test_each_measurement_takes_a_process_started_ahead_and_none_is_left(
    tiny: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("LLMOPT_BENCH_AHEAD", "1")
    rep = Lines()
    with measurement_processes_ahead("cpu"):
        assert _waiting_alive() == 2  # started at once: the FP16 baseline's and the first variant's
        assert _count_settles_at(2) == 2
        first = _measure(tiny, rep)
        assert _waiting_alive() == 1 and _count_settles_at(1) == 1  # the second still waits: none beside it
        second = _measure(tiny, rep)
        assert _waiting_alive() == 1 and _count_settles_at(1) == 1  # the next one's, started after the second
    assert bench_process._AHEAD.waiting == [] and bench_process._AHEAD.depth == 0
    deadline = time.monotonic() + 10
    while _children() and time.monotonic() < deadline:
        time.sleep(0.05)
    assert _children() == []
    ahead = [line for line in rep.lines if "process start-up" in line]
    assert len(ahead) == 2 and all("started ahead" in line for line in ahead), rep.lines
    for result in (first, second):
        assert "startup_seconds" not in result and result["decode"]["1"]["tokens_per_s"]["median"] > 0


@pytest.mark.skipif(not Path("/proc").is_dir(), reason="finds the processes through /proc")
def test_no_process_is_started_after_the_last_measurement(tiny: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A block told how many measurements it makes (a run: FP16's and one per variant; `eval`: two) starts no
    process after the last one: it would import torch and set up CUDA only to be stopped unused."""
    monkeypatch.setenv("LLMOPT_BENCH_AHEAD", "1")
    rep = Lines()
    with measurement_processes_ahead("cpu", measurements=3):
        assert _waiting_alive() == 2 and _count_settles_at(2) == 2
        _measure(tiny, rep)
        _measure(tiny, rep)
        assert _waiting_alive() == 1 and _count_settles_at(1) == 1  # the third's, started after the second
        _measure(tiny, rep)
        assert bench_process._AHEAD.waiting == [] and _count_settles_at(0) == 0  # none after the third
    with measurement_processes_ahead("cpu", measurements=1):
        assert len(bench_process._AHEAD.waiting) == 1  # one started at once, not two
    ahead = [line for line in rep.lines if "process start-up" in line]
    assert len(ahead) == 3 and all("started ahead" in line for line in ahead), rep.lines


def test_without_the_block_or_when_off_a_measurement_starts_its_own(
    tiny: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("LLMOPT_BENCH_AHEAD", "0")
    rep = Lines()
    with measurement_processes_ahead("cpu"):
        assert bench_process._AHEAD.waiting == []
        _measure(tiny, rep)
        assert bench_process._AHEAD.waiting == []
    _measure(tiny, rep)
    lines = [line for line in rep.lines if "process start-up" in line]
    assert len(lines) == 2 and not any("started ahead" in line for line in lines), rep.lines


def test_measurements_in_a_block_share_its_environment(tiny: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """GPTQModel sets PYTORCH_ALLOC_CONF in this process when it is imported: a variant measured after it would run
    under other allocator settings than the FP16 baseline before it. Inside a block every measurement gets the
    block's environment, so the processes started ahead stay usable."""
    from llmopt.evaluate.bench_process import measurement_env

    monkeypatch.setenv("LLMOPT_BENCH_AHEAD", "1")
    monkeypatch.delenv("LLMOPT_TEST_MARK", raising=False)
    rep = Lines()
    with measurement_processes_ahead("cpu"):
        monkeypatch.setenv("LLMOPT_TEST_MARK", "set by a library")
        assert "LLMOPT_TEST_MARK" not in measurement_env(dict(os.environ))
        _measure(tiny, rep)
    assert measurement_env(dict(os.environ))["LLMOPT_TEST_MARK"] == "set by a library"  # outside: as it is
    lines = [line for line in rep.lines if "process start-up" in line]
    assert len(lines) == 1 and "started ahead" in lines[0], rep.lines


def test_a_process_for_another_device_or_output_is_not_used(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("LLMOPT_BENCH_AHEAD", "1")
    with measurement_processes_ahead("cpu"):
        waiting = list(bench_process._AHEAD.waiting)
        env = bench_process.measurement_env(dict(os.environ))
        other = bench_process.take_measurement_process("cpu", env, show=True)  # LLMOPT_DEBUG output: not theirs
        try:
            assert not other.started_early and other not in waiting
            assert all(p.proc.poll() is not None for p in waiting)  # stopped, not left waiting
        finally:
            other.stop()


@pytest.mark.skipif(not hasattr(signal, "SIGKILL"), reason="POSIX signals")
def test_a_process_that_died_while_waiting_is_replaced(tiny: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A process that died before its measurement (killed, out of memory) is not handed the request: the
    measurement takes the next one and measures normally."""
    monkeypatch.setenv("LLMOPT_BENCH_AHEAD", "1")
    rep = Lines()
    with measurement_processes_ahead("cpu"):
        waiting = bench_process._AHEAD.waiting[0]
        os.kill(waiting.proc.pid, signal.SIGKILL)
        waiting.proc.wait()
        assert _measure(tiny, rep)["decode"]["1"]["tokens_per_s"]["median"] > 0
    lines = [line for line in rep.lines if "process start-up" in line]
    assert len(lines) == 1 and "started ahead" in lines[0], rep.lines  # the second one, alive


@pytest.mark.skipif(not hasattr(signal, "SIGKILL"), reason="POSIX signals")
def test_a_process_killed_as_it_takes_the_request_fails_that_measurement_only(
    tiny: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Killed between being picked and measuring: its measurement is an error naming the signal, and the next
    measurement in the same block gets a working process."""
    from llmopt.evaluate.throughput import MeasurementError

    monkeypatch.setenv("LLMOPT_BENCH_AHEAD", "1")
    real_take = bench_process.take_measurement_process

    def take_then_kill(*args: Any) -> bench_process.MeasurementProcess:
        child = real_take(*args)
        os.kill(child.proc.pid, signal.SIGKILL)
        child.proc.wait()
        return child

    rep = Lines()
    with measurement_processes_ahead("cpu"):
        monkeypatch.setattr(bench_process, "take_measurement_process", take_then_kill)
        with pytest.raises(MeasurementError, match="killed by SIGKILL") as info:
            _measure(tiny, rep)
        assert "rest of this run is not affected" in info.value.message
        monkeypatch.setattr(bench_process, "take_measurement_process", real_take)
        assert _measure(tiny, rep)["decode"]["1"]["tokens_per_s"]["median"] > 0


def test_waiting_processes_can_be_stopped_before_other_gpu_work(monkeypatch: pytest.MonkeyPatch) -> None:
    """`llmopt run` with evaluation.serving stops them before it starts a server: their CUDA contexts (about
    0.5 GB each on the GPU machine) would sit beside it."""
    from llmopt.evaluate.bench_process import stop_waiting

    monkeypatch.setenv("LLMOPT_BENCH_AHEAD", "1")
    with measurement_processes_ahead("cpu"):
        waiting = list(bench_process._AHEAD.waiting)
        assert len(waiting) == 2
        stop_waiting()
        assert bench_process._AHEAD.waiting == [] and all(p.proc.poll() is not None for p in waiting)
