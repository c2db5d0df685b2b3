"""Hostile and careless inputs (issue 12): each gets a one-line refusal with the right exit code, never a
traceback, and an artifact carries nothing machine-specific."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest

from llmopt.errors import EXIT_INPUT
from tests.helpers import SMOLLM2_CONFIG, fake_model, first_layers, run_cli

_CONFIG_PY = """
import pathlib
pathlib.Path({sentinel!r}).write_text("configuration imported")
from transformers import LlamaConfig


class EvilConfig(LlamaConfig):
    model_type = "evilnet"
"""

_MODELING_PY = """
import pathlib
pathlib.Path({sentinel!r}).write_text("modeling imported")
from transformers import LlamaForCausalLM

from .configuration_evil import EvilConfig


class EvilForCausalLM(LlamaForCausalLM):
    config_class = EvilConfig
"""


def remote_code_folder(folder: Path, sentinels: Path, base: Path | None = None) -> Path:
    """A model folder whose config points (auto_map) at its own Python files; importing them writes sentinels.

    With ``base`` (a real model folder) the code subclasses Llama, so the model really loads once trusted."""
    if base is not None:
        first_layers(base, folder, 1)
        config = json.loads((folder / "config.json").read_text())
    else:
        fake_model(folder)
        config = dict(SMOLLM2_CONFIG)
    config.update(
        {
            "model_type": "evilnet",
            "architectures": ["EvilForCausalLM"],
            "auto_map": {
                "AutoConfig": "configuration_evil.EvilConfig",
                "AutoModelForCausalLM": "modeling_evil.EvilForCausalLM",
            },
        }
    )
    (folder / "config.json").write_text(json.dumps(config))
    (folder / "configuration_evil.py").write_text(_CONFIG_PY.format(sentinel=str(sentinels / "configuration-ran")))
    (folder / "modeling_evil.py").write_text(_MODELING_PY.format(sentinel=str(sentinels / "modeling-ran")))
    return folder


def assert_refused(proc: Any, code: int = EXIT_INPUT) -> None:
    assert proc.returncode == code, (proc.returncode, proc.stderr[-3000:])
    assert "Traceback" not in proc.stderr, proc.stderr[-3000:]
    errors = [line for line in proc.stderr.splitlines() if line.startswith("error: ")]
    assert len(errors) == 1, proc.stderr[-3000:]  # progress lines may come before it
    assert "  -> " in proc.stderr


@pytest.mark.parametrize("answer", ["y\n", "y\n" * 200, ""], ids=["echo-y", "yes", "empty-stdin"])
def test_remote_code_never_runs_without_the_flag(tmp_path: Path, answer: str) -> None:
    """`echo y | llmopt quantize fx/remote ...` imported the folder's configuration_*.py (and `yes |` its
    modeling_*.py): transformers asked on stdin because llmopt never passed trust_remote_code. Now the folder
    is refused (exit 2) before anything is imported, whatever stdin says."""
    (tmp_path / "fx").mkdir()
    remote_code_folder(tmp_path / "fx" / "remote", tmp_path)
    proc = run_cli(["quantize", "fx/remote", "-m", "bnb-int8", "-o", "o/x"], cwd=tmp_path, stdin=answer)
    assert_refused(proc)
    assert "--trust-remote-code" in proc.stderr and "configuration_evil.py" in proc.stderr
    assert not (tmp_path / "configuration-ran").exists()
    assert not (tmp_path / "modeling-ran").exists()
    assert not (tmp_path / "o").exists() or not any((tmp_path / "o").iterdir())


def test_remote_code_runs_only_with_the_flag_and_is_recorded(tmp_path: Path, assets: dict[str, Path]) -> None:
    """--trust-remote-code lets a real custom-code model quantize (bnb-int8) and the manifest says it was
    allowed; evaluating the artifact (which carries the code) without the flag is refused like the source."""
    (tmp_path / "fx").mkdir()
    remote_code_folder(tmp_path / "fx" / "remote", tmp_path, base=assets["model"])
    proc = run_cli(
        ["quantize", "fx/remote", "-m", "bnb-int8", "-o", "o/x", "--trust-remote-code", "-q"], cwd=tmp_path
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert (tmp_path / "configuration-ran").exists()
    manifest = json.loads((tmp_path / "o" / "x" / "llmopt.json").read_text())
    assert manifest["options"]["_resolved"]["trust_remote_code"] is True

    (tmp_path / "configuration-ran").unlink()
    (tmp_path / "modeling-ran").unlink(missing_ok=True)
    text = assets["eval_text"]
    proc = run_cli(
        ["eval", "o/x", "--baseline", str(assets["model"]), "--dataset", str(text), "--max-tokens", "600"],
        cwd=tmp_path,
        stdin="y\n" * 50,
    )
    assert_refused(proc)
    assert "artifact" in proc.stderr and "--trust-remote-code" in proc.stderr
    assert not (tmp_path / "configuration-ran").exists()
