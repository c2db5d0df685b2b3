"""Careless users of the llm-compressor methods, through the real CLI from another working folder.

llm-compressor itself is replaced by a stand-in package on PYTHONPATH (its metadata with the pins under
test, and a module that fails if anything imports it): every case here is refused before llm-compressor
would be imported, so the tests run the same whether or not the real one is installed.
"""

from __future__ import annotations

import importlib.util
import os
from pathlib import Path

import pytest

from tests.helpers import fake_model, run_cli

ROOT = Path(__file__).resolve().parents[2]


def stand_in(tmp_path: Path, transformers_pin: str) -> dict[str, str]:
    """PYTHONPATH with stand-ins for llmcompressor and compressed-tensors, pinning transformers as given."""
    site = tmp_path / "stand-in"
    for module, dist, version, requires in (
        ("llmcompressor", "llmcompressor", "0.14.0.1", [f"transformers{transformers_pin}"]),
        ("compressed_tensors", "compressed_tensors", "0.19.0", []),
    ):
        (site / module).mkdir(parents=True)
        (site / module / "__init__.py").write_text("raise ImportError('stand-in: llmopt must not import this')\n")
        info = site / f"{dist}-{version}.dist-info"
        info.mkdir()
        meta = ["Metadata-Version: 2.1", f"Name: {dist.replace('_', '-')}", f"Version: {version}"]
        meta += [f"Requires-Dist: {r}" for r in requires]
        (info / "METADATA").write_text("\n".join(meta) + "\n")
    return {"PYTHONPATH": os.pathsep.join([str(ROOT), str(site)])}


def test_backends_explains_a_pin_conflict_instead_of_failing(tmp_path: Path) -> None:
    """llm-compressor installed next to a transformers it does not support: `llmopt backends` still lists
    everything, says which pin is broken and the command that fixes it, and never imports llm-compressor."""
    env = stand_in(tmp_path, "<=1.0")
    proc = run_cli(["backends"], cwd=tmp_path, env={**env, "COLUMNS": "250"})
    assert proc.returncode == 0, proc.stderr
    out = " ".join(proc.stdout.split())
    assert "llmc-w4a16" in out and "needs transformers<=1.0" in out
    assert "pip install 'transformers<=1.0'" in out
    assert "stand-in" not in out + proc.stderr


def test_quantize_with_a_pin_conflict_exits_4_before_work(tmp_path: Path) -> None:
    env = stand_in(tmp_path, "<=1.0")
    fake_model(tmp_path / "m")
    proc = run_cli(["quantize", "m", "-m", "llmc-fp8-dynamic", "-o", "out"], cwd=tmp_path, env=env)
    assert proc.returncode == 4, proc.stderr
    assert "needs transformers<=1.0" in proc.stderr and "Traceback" not in proc.stderr
    assert not (tmp_path / "out").exists()


def test_an_option_of_another_method_exits_2(tmp_path: Path) -> None:
    """`--bits 4` is GPTQ's; llmc-fp8-dynamic has no bits: refused, with the options it does have."""
    env = stand_in(tmp_path, ">=1.0")
    fake_model(tmp_path / "m")
    proc = run_cli(["quantize", "m", "-m", "llmc-fp8-dynamic", "--bits", "4", "-o", "out"], cwd=tmp_path, env=env)
    assert proc.returncode == 2, proc.stderr
    assert "'bits' is not an option of llmc-fp8-dynamic" in proc.stderr
    assert "valid options of llmc-fp8-dynamic: ignore, pipeline" in proc.stderr
    assert not (tmp_path / "out").exists()


def test_w4a16_group_size_that_does_not_divide_exits_2_before_reading_weights(tmp_path: Path) -> None:
    """llm-compressor's default group 128 on a model 576 wide: refused from config.json (the weights here are a
    zero-filled stand-in), naming the sizes that fit."""
    pytest.importorskip("transformers")
    env = stand_in(tmp_path, ">=1.0")
    fake_model(tmp_path / "m")
    args = ["quantize", "m", "-m", "llmc-w4a16", "-o", "out", "--calibration", "calib.txt"]
    (tmp_path / "calib.txt").write_text("word " * 50)
    proc = run_cli(args, cwd=tmp_path, env=env)
    assert proc.returncode == 2, proc.stderr
    assert "576" in proc.stderr and "every layer: 32, 64, or -1" in proc.stderr


def test_calibration_text_too_short_exits_2(assets: dict[str, Path], tmp_path: Path) -> None:
    env = stand_in(tmp_path, ">=1.0")
    (tmp_path / "short.txt").write_text("The quick brown fox. " * 20)
    args = ["quantize", str(assets["model"]), "-m", "llmc-w8a8-int8", "-o", "out", "--calibration", "short.txt"]
    proc = run_cli([*args, "--samples", "16", "--seq-len", "512"], cwd=tmp_path, env=env)
    assert proc.returncode == 2, proc.stderr
    assert "samples of 512 tokens, 16 asked" in proc.stderr and "Traceback" not in proc.stderr
    assert not (tmp_path / "out").exists()


def test_calibrated_method_without_calibration_exits_2(tmp_path: Path) -> None:
    pytest.importorskip("transformers")
    env = stand_in(tmp_path, ">=1.0")
    fake_model(tmp_path / "m")
    proc = run_cli(["quantize", "m", "-m", "llmc-nvfp4", "-o", "out"], cwd=tmp_path, env=env)
    assert proc.returncode == 2, proc.stderr
    assert "llmc-nvfp4 needs calibration text" in proc.stderr


@pytest.mark.skipif(importlib.util.find_spec("llmcompressor") is not None, reason="llm-compressor is installed here")
def test_missing_llmcompressor_names_the_install_command(tmp_path: Path) -> None:
    fake_model(tmp_path / "m")
    proc = run_cli(["quantize", "m", "-m", "llmc-w4a16", "-o", "out"], cwd=tmp_path)
    assert proc.returncode == 4, proc.stderr
    assert "pip install 'llmopt[llmc]'" in proc.stderr
