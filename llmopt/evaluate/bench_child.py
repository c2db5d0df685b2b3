"""One speed measurement in a process of its own: ``python -m llmopt.evaluate.bench_child REQUEST RESULT``.

``throughput.bench_model`` starts this so that whatever a measurement leaves behind (a failed CUDA-graph
capture poisons the CUDA context and the RNG's graph state; torch.compile's caches; a crash in a kernel
library) ends with the process and cannot change the next model's outcome. REQUEST is a JSON file with
``bench_model``'s arguments; the child writes RESULT (JSON) with either ``result`` or ``error``, the
latter with llmopt's error type, message, hint and exit code, or the type, first line and traceback of an
unexpected exception. A child that writes nothing died: the parent reports its exit code or signal and
the last lines it printed.
"""

from __future__ import annotations

import json
import sys
import traceback
from pathlib import Path
from typing import Any


def _write(path: Path, data: dict[str, Any]) -> None:
    from llmopt.artifact import write_json_atomic

    write_json_atomic(path, data)


def main(argv: list[str]) -> int:
    request_path, result_path = Path(argv[0]), Path(argv[1])
    from llmopt._thirdparty import quiet_console

    quiet_console()  # before throughput.py imports the model stack
    from llmopt.errors import EXIT_INTERRUPTED, LlmoptError
    from llmopt.evaluate.throughput import ThroughputSettings, bench_model
    from llmopt.progress import LineReporter

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
    _write(result_path, {"result": result})
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
