"""One speed measurement in a process of its own: ``python -m llmopt.evaluate.bench_child --wait DEVICE``.

``throughput.bench_model`` starts this (through bench_process.py) so that whatever a measurement leaves behind
(a failed CUDA-graph capture poisons the CUDA context and the RNG's graph state; torch.compile's caches; a crash
in a kernel library) ends with the process and cannot change the next model's outcome. The process imports the
model stack and sets up CUDA on a CUDA device, then reads one line of JSON from its input, ``{"request":
REQUEST, "result": RESULT}`` (at end of input it exits): REQUEST is a JSON file with ``bench_model``'s
arguments; the child writes RESULT (JSON) with either ``result`` or ``error``, the latter with llmopt's error
type, message, hint and exit code, or the type, first line and traceback of an unexpected exception. A child
that writes nothing died: the parent reports its exit code or signal and the last lines it printed. It may be
started ahead of its measurement (bench_process.py), so its start-up is reported apart.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import sys
import threading
import time
import traceback
from pathlib import Path
from typing import Any


def _write(path: Path, data: dict[str, Any]) -> None:
    from llmopt.artifact import write_json_atomic

    write_json_atomic(path, data)


def _get_ready(device: str) -> None:
    """What every measurement does first: import torch and transformers' model code, and set up CUDA."""
    import torch
    import transformers.modeling_utils  # noqa: F401  (the bulk of from_pretrained's imports)

    if device.startswith("cuda") and torch.cuda.is_available():
        with contextlib.suppress(Exception):  # the measurement itself reports what is wrong with the device
            torch.empty(1, device=device)  # creates the CUDA context


def _options(argv: list[str]) -> tuple[list[str], dict[str, str]]:
    """Positional arguments, and the values of ``--parent`` / ``--folder``."""
    rest: list[str] = []
    options: dict[str, str] = {}
    i = 0
    while i < len(argv):
        if argv[i] in ("--parent", "--folder") and i + 1 < len(argv):
            options[argv[i]] = argv[i + 1]
            i += 2
        else:
            rest.append(argv[i])
            i += 1
    return rest, options


def _watch_parent(parent: int, folder: str | None, interval: float = 0.5) -> None:
    """End this process (removing ``folder``) once ``parent`` is no longer its parent: it died."""

    def watch() -> None:
        while True:
            time.sleep(interval)
            if os.getppid() != parent:
                if folder:
                    shutil.rmtree(folder, ignore_errors=True)
                os._exit(130)  # EXIT_INTERRUPTED; nobody is left to read it

    threading.Thread(target=watch, name="llmopt-parent-watch", daemon=True).start()


def main(argv: list[str]) -> int:
    argv, options = _options(argv)
    try:
        parent = int(options.get("--parent") or os.getppid())
    except ValueError:
        parent = os.getppid()
    folder = options.get("--folder")
    if os.name == "posix":
        # first: before the seconds of importing below. POSIX only: Windows keeps a dead parent's id as the parent,
        # and a venv's python.exe there is a launcher that starts the real interpreter as its own child
        _watch_parent(parent, folder)
    try:
        return _main(argv, folder)
    finally:
        # a parent that died while this one finished (or at end of input, which a killed parent also gives): nobody
        # is left to remove the folder
        if folder and os.name == "posix" and os.getppid() != parent:
            shutil.rmtree(folder, ignore_errors=True)


def _main(argv: list[str], folder: str | None) -> int:
    started = time.perf_counter()
    from llmopt._thirdparty import quiet_console

    quiet_console()  # before throughput.py imports the model stack
    from llmopt.errors import EXIT_INTERRUPTED, LlmoptError
    from llmopt.evaluate.throughput import ThroughputSettings, bench_model
    from llmopt.progress import LineReporter

    if argv[:1] != ["--wait"]:
        usage = "usage: python -m llmopt.evaluate.bench_child --wait DEVICE [--parent PID] [--folder DIR]"
        print(usage, file=sys.stderr)
        return 2
    try:
        _get_ready(argv[1] if len(argv) > 1 else "cpu")
        ready = time.perf_counter()
        line = sys.stdin.readline()
    except KeyboardInterrupt:
        return EXIT_INTERRUPTED
    if not line.strip():
        # not needed after all, or the parent was killed (which closes this input too, maybe just before this
        # process is handed to its new parent): either way nothing is left to read in the folder
        if folder:
            shutil.rmtree(folder, ignore_errors=True)
        return 0
    handed = json.loads(line)
    request_path, result_path = Path(handed["request"]), Path(handed["result"])
    startup = ready - started
    req = json.loads(request_path.read_text())
    # GPTQModel is quieted where it is loaded (runners/hf.py), for the models that need it: importing it here
    # cost every FP16 and bitsandbytes measurement ~4 s more (2-core CPU; torch + transformers ~9 s).
    try:
        result = bench_model(
            Path(req["path"]),
            req["device"],
            ThroughputSettings.model_validate(req["settings"]),
            runner_kind=req.get("runner_kind"),
            kernel=req.get("kernel"),
            attn_implementation=req.get("attn_implementation"),
            label=req.get("label") or "model",
            reporter=LineReporter(),
            trust_remote_code=bool(req.get("trust_remote_code")),
            isolate=False,
        )
    except KeyboardInterrupt:
        return EXIT_INTERRUPTED
    except LlmoptError as exc:
        error = {"kind": "llmopt", "type": type(exc).__name__, "message": exc.message, "hint": exc.hint}
        _write(result_path, {"error": {**error, "exit_code": exc.exit_code}})
        return 0
    except Exception as exc:
        text = str(exc).strip()
        error = {
            "kind": "exception",
            "type": type(exc).__name__,
            "message": text.splitlines()[0] if text else "",
            "traceback": traceback.format_exc(),
        }
        traceback.print_exc()
        _write(result_path, {"error": error})
        return 0
    result["startup_seconds"] = round(startup, 2)
    _write(result_path, {"result": result})
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
