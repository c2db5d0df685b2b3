"""The processes that speed measurements run in, and one started ahead of time.

Each measurement runs in a process of its own (bench_child.py), so that a failed CUDA-graph capture, the
compiler's state or a crash ends with it. Starting that process costs seconds before it measures anything:
Python, torch, transformers and a CUDA context (measured on the GPU machine: about 20 s of a 32-40 s
measurement of SmolLM2). Inside ``measurement_process_ahead``, once a measurement is over, the next one's process
is started at once and waits, imported and with CUDA set up, while this process quantizes or scores the next
variant; the next measurement then hands it its request. Two are started when the block begins, since a run's
first variant measures the FP16 baseline and then itself, back to back.

Every measurement still has a fresh process of its own. Inside the block every measurement's process gets the
environment of the block's start: quantizing libraries set variables in this process as they go (GPTQModel sets
PYTORCH_ALLOC_CONF and CUDA_DEVICE_ORDER when it is imported), and a measurement made after them would otherwise
run under other allocator settings than the FP16 baseline measured before them. A started process is never used
for a measurement on another device or with other output settings.
"""

from __future__ import annotations

import contextlib
import json
import os
import subprocess
import sys
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Any


@dataclass
class MeasurementProcess:
    """A started bench_child process in ``--wait`` mode: its folder (request, result, output log) and settings."""

    proc: subprocess.Popen[bytes]
    folder: tempfile.TemporaryDirectory[str]
    log_file: IO[str]
    device: str
    env: dict[str, str]
    show: bool
    started_early: bool = False
    _closed: bool = field(default=False, repr=False)

    @property
    def request(self) -> Path:
        return Path(self.folder.name) / "request.json"

    @property
    def result(self) -> Path:
        return Path(self.folder.name) / "result.json"

    @property
    def log(self) -> Path:
        return Path(self.folder.name) / "output.log"

    def send(self, request: dict[str, Any]) -> bool:
        """Write the request and hand it over; False when the process is gone (its exit code tells why)."""
        self.request.write_text(json.dumps(request))
        line = json.dumps({"request": str(self.request), "result": str(self.result)}) + "\n"
        assert self.proc.stdin is not None
        try:
            self.proc.stdin.write(line.encode())
            self.proc.stdin.close()
        except OSError:  # BrokenPipeError: it died while starting
            return False
        return True

    def stop(self) -> None:
        """Stop it (end of input, then SIGTERM, then SIGKILL) and remove its folder."""
        if self._closed:
            return
        self._closed = True
        with contextlib.suppress(OSError, ValueError):
            if self.proc.stdin is not None and not self.proc.stdin.closed:
                self.proc.stdin.close()  # a waiting process exits on end of input
        if self.proc.poll() is None:
            try:
                self.proc.wait(timeout=2)
            except subprocess.TimeoutExpired:
                self.proc.terminate()
                try:
                    self.proc.wait(timeout=10)
                except subprocess.TimeoutExpired:
                    self.proc.kill()
                    self.proc.wait()
        with contextlib.suppress(OSError):
            self.log_file.close()
        with contextlib.suppress(OSError):
            self.folder.cleanup()


def start_measurement_process(device: str, env: dict[str, str], show: bool) -> MeasurementProcess:
    """Start bench_child in ``--wait`` mode: it imports the model stack (and sets up CUDA on a CUDA device), then
    waits for a request on its input."""
    folder = tempfile.TemporaryDirectory(prefix="llmopt-bench-")
    log_file = open(Path(folder.name) / "output.log", "w")  # noqa: SIM115 (closed by stop())
    proc = subprocess.Popen(
        # --parent/--folder: it ends, and removes its folder, if this process is killed (SIGKILL) before stopping it
        [
            sys.executable,
            "-m",
            "llmopt.evaluate.bench_child",
            "--wait",
            device,
            "--parent",
            str(os.getpid()),
            "--folder",
            folder.name,
        ],
        stdin=subprocess.PIPE,
        # never the parent's stdout: that carries --json output
        stdout=sys.__stderr__ if show else log_file,
        stderr=None if show else log_file,
        env=env,
    )
    return MeasurementProcess(proc, folder, log_file, device, env, show)


@dataclass
class _Ahead:
    depth: int = 0
    enabled: bool = False
    device: str | None = None
    env: dict[str, str] | None = None  # the environment of the block's start, for every measurement in it
    waiting: list[MeasurementProcess] = field(default_factory=list)
    left: int | None = None  # measurements the block may still make (None: not known), so none is started past them


_AHEAD = _Ahead()


def measurement_env(env: dict[str, str]) -> dict[str, str]:
    """The environment for a measurement's process: inside a ``measurement_process_ahead`` block, the block's."""
    return dict(_AHEAD.env) if _AHEAD.depth > 0 and _AHEAD.env is not None else env


def take_measurement_process(device: str, env: dict[str, str], show: bool) -> MeasurementProcess:
    """A process started ahead for this measurement if one matches and is alive, else a new one."""
    if _AHEAD.depth > 0 and _AHEAD.left is not None:
        _AHEAD.left = max(0, _AHEAD.left - 1)
    while _AHEAD.waiting:
        waiting = _AHEAD.waiting.pop(0)
        if waiting.device == device and waiting.env == env and waiting.show == show and waiting.proc.poll() is None:
            waiting.started_early = True
            return waiting
        waiting.stop()
    return start_measurement_process(device, env, show)


def stop_waiting() -> None:
    """Stop the processes waiting for a measurement (before work that wants the GPU to itself, e.g. a server); the
    next measurement starts its own."""
    waiting, _AHEAD.waiting = _AHEAD.waiting, []
    for process in waiting:
        process.stop()


def measurement_over(device: str, env: dict[str, str], show: bool) -> None:
    """After a measurement: inside ``measurement_process_ahead``, start the next one's process now (unless one is
    still waiting, or the block has made all the measurements it said it would)."""
    more = _AHEAD.left is None or _AHEAD.left > 0
    if _AHEAD.depth > 0 and _AHEAD.enabled and not _AHEAD.waiting and _AHEAD.device == device and more:
        _AHEAD.waiting.append(start_measurement_process(device, env, show))


def ahead_enabled_by_default(device: str) -> bool:
    """On a CUDA device the CPU is mostly idle while the GPU quantizes or scores, so a process importing beside it
    costs nothing; on a CPU it would take cores from the work it waits beside (2 cores in CI). ``LLMOPT_BENCH_AHEAD``
    = 1/true/yes/on or 0/false/no/off overrides (anything else: the default)."""
    setting = (os.environ.get("LLMOPT_BENCH_AHEAD") or "").strip().lower()
    if setting in ("1", "true", "yes", "on"):
        return True
    if setting in ("0", "false", "no", "off"):
        return False
    return device.startswith("cuda")


@contextlib.contextmanager
def measurement_process_ahead(
    device: str,
    env: dict[str, str] | None = None,
    *,
    show: bool = False,
    first: int = 2,
    measurements: int | None = None,
) -> Iterator[None]:
    """Within this block, keep one measurement process started ahead on ``device`` (see the module's docstring).

    Nested blocks share the outer one's processes; the outermost stops the unused ones when it ends (also on
    errors and interrupts). ``env``: the environment every measurement in the block gets (and the processes
    started at once, ``first`` of them). ``measurements``: at most how many the block will make (a run: the
    baseline and one per variant), so that no process is started after the last one."""
    outer = _AHEAD.depth == 0
    if outer:
        _AHEAD.enabled = ahead_enabled_by_default(device)
        _AHEAD.device = device
        _AHEAD.env = dict(env) if env is not None else None
        _AHEAD.left = None if measurements is None else max(0, measurements)
    _AHEAD.depth += 1
    try:
        if outer and _AHEAD.enabled and env is not None:
            count = first if _AHEAD.left is None else min(first, _AHEAD.left)
            _AHEAD.waiting.extend(start_measurement_process(device, dict(env), show) for _ in range(count))
        yield
    finally:
        _AHEAD.depth -= 1
        if _AHEAD.depth == 0:
            waiting, _AHEAD.waiting = _AHEAD.waiting, []
            _AHEAD.enabled, _AHEAD.device, _AHEAD.env, _AHEAD.left = False, None, None, None
            for process in waiting:
                process.stop()
