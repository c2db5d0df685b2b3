"""GPTQModel's console output is kept out of llmopt's unless asked for (llmopt/_thirdparty.py)."""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from tests.helpers import first_layers

pytestmark = pytest.mark.skipif(importlib.util.find_spec("gptqmodel") is None, reason="needs gptqmodel")

PROBE = """
from llmopt._thirdparty import quiet_gptqmodel
print("quieted:", quiet_gptqmodel())
from gptqmodel.utils import logger
print("bars suppressed:", logger.live_renderables_suppressed())
"""


def _run(extra_env: dict[str, str]) -> str:
    env = {k: v for k, v in os.environ.items() if k not in ("PYTEST_CURRENT_TEST", "LLMOPT_DEBUG")}
    env.update(extra_env)
    done = subprocess.run([sys.executable, "-c", PROBE], env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    return done.stdout + done.stderr


def test_gptqmodel_banner_and_bars_are_off_by_default() -> None:
    out = _run({})
    assert "quieted: True" in out and "bars suppressed: True" in out
    assert "GPT-QModel" not in out  # the import banner (an INFO log)


def test_importing_gptqmodel_prints_nothing_on_stdout() -> None:
    """logbar's first shared logger printed one empty line to stdout (a blank line in every GPTQ run's output)."""
    env = {k: v for k, v in os.environ.items() if k not in ("PYTEST_CURRENT_TEST", "LLMOPT_DEBUG")}
    probe = "from llmopt._thirdparty import quiet_gptqmodel\nimport time\nquiet_gptqmodel()\ntime.sleep(0.5)\n"
    done = subprocess.run([sys.executable, "-c", probe], env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    assert done.stdout == ""


def test_third_party_logs_can_be_kept() -> None:
    out = _run({"LLMOPT_THIRD_PARTY_LOGS": "1"})
    assert "quieted: False" in out and "GPT-QModel" in out


@pytest.mark.e2e
def test_json_on_stdout_stays_parseable_through_gptqmodel(assets: dict[str, Path], tmp_path: Path) -> None:
    """GPTQModel writes its logs and save messages to stdout: `quantize --json` and `eval --json -` printed
    invalid JSON before llmopt routed third-party stdout to stderr. Real processes, real stdout."""
    model = first_layers(assets["model"], tmp_path / "smollm2-2l", 2)
    env = {k: v for k, v in os.environ.items() if k != "PYTEST_CURRENT_TEST"}
    env["LLMOPT_THIRD_PARTY_LOGS"] = "1"  # the loudest case: GPTQModel's own output kept (on stderr)

    def llmopt(*args: str) -> dict[str, object]:
        done = subprocess.run(
            [sys.executable, "-m", "llmopt", *args], env=env, capture_output=True, text=True, timeout=900
        )
        assert done.returncode == 0, done.stderr[-3000:]
        assert "GPT-QModel" in done.stderr  # it did print, just not on stdout
        parsed: dict[str, object] = json.loads(done.stdout)
        return parsed

    art = tmp_path / "gptq"
    manifest = llmopt(
        "quantize", str(model), "-m", "gptq", "--bits", "4", "--group-size", "64", "--calibration",
        str(assets["calibration_text"]), "--samples", "4", "--seq-len", "64", "--device", "cpu", "-o", str(art),
        "--json",
    )  # fmt: skip
    assert manifest["backend"] == "gptq"
    report = llmopt(
        "eval", str(art), "--baseline", str(model), "--dataset", str(assets["eval_text"]), "--max-tokens", "256",
        "--context", "128", "--device", "cpu", "--json", "-",
    )  # fmt: skip
    assert isinstance(report["artifact"], dict) and report["artifact"]["runner"] == "gptqmodel"


@pytest.mark.e2e
def test_gptq_quantize_prints_no_third_party_chatter(assets: dict[str, Path], tmp_path: Path) -> None:
    """The CPU main job's log had GPTQModel's tokenizer helper announcing its pad token four times per GPTQ
    variant ("INFO:tokenicer...") and accelerate's "weights are not tied" warning: neither is about the user's
    model, so neither reaches the console unless third-party logs are asked for."""
    model = first_layers(assets["model"], tmp_path / "smollm2-2l", 2)
    env = {k: v for k, v in os.environ.items() if k not in ("PYTEST_CURRENT_TEST", "LLMOPT_DEBUG")}
    env.pop("LLMOPT_THIRD_PARTY_LOGS", None)
    done = subprocess.run(
        [sys.executable, "-m", "llmopt", "quantize", str(model), "-m", "gptq", "--bits", "4", "--group-size", "64",
         "--calibration", str(assets["calibration_text"]), "--samples", "4", "--seq-len", "64", "--device", "cpu",
         "-o", str(tmp_path / "gptq")],
        env=env, capture_output=True, text=True, timeout=900,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr[-3000:]
    out = done.stdout + done.stderr
    assert "tokenicer" not in out.lower() and "weights are not tied" not in out
    # GPTQModel's advice about its own set-up, datasets' import-time line, transformers' deprecation notices
    # raised inside GPTQModel: seen in a GPU recipe's log (2026-12-02)
    for chatter in ("Calibration dataset size should be", "GIL is enabled", "INFO:datasets", "FutureWarning"):
        assert chatter not in out, chatter
