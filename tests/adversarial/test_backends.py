"""Backend options and plugins, as careless users and broken packages meet them: -O values typed the way flags
are, lists written the way a shell user writes them, and plugins that do not load."""

from __future__ import annotations

import json
import os
import textwrap
from pathlib import Path

import pytest

from tests.helpers import fake_model, first_layers, run_cli

ROOT = Path(__file__).resolve().parents[2]


def assert_refused(proc: object, code: int = 2) -> None:
    assert proc.returncode == code, (proc.returncode, proc.stderr)  # type: ignore[attr-defined]
    assert "Traceback" not in proc.stderr  # type: ignore[attr-defined]
    assert proc.stderr.startswith("error: ")  # type: ignore[attr-defined]


def test_a_leading_zero_is_not_octal(tmp_path: Path) -> None:
    """`-O group_size=0100` was read as YAML, i.e. octal 64, and quietly accepted; it is the number 100, which does
    not divide SmolLM2's layers, and is refused naming 100."""
    fake_model(tmp_path / "m")
    proc = run_cli(["quantize", "m", "-m", "gptq", "-O", "group_size=0100", "--calibration", "c.txt", "-o", "o"],
                   cwd=tmp_path)  # fmt: skip
    assert_refused(proc)
    assert "group size 100 " in proc.stderr
    assert not (tmp_path / "o").exists()


def test_flag_and_option_with_the_same_number_agree(tmp_path: Path) -> None:
    """`--group-size 64 -O group_size=064` was refused as two different values (64 and octal 52): one value."""
    fake_model(tmp_path / "m")
    proc = run_cli(["quantize", "m", "-m", "gptq", "--group-size", "64", "-O", "group_size=064", "-o", "o"],
                   cwd=tmp_path)  # fmt: skip
    assert_refused(proc)
    assert "different values" not in proc.stderr and "calibration" in proc.stderr


def test_an_empty_gguf_imatrix_says_what_to_write(tmp_path: Path) -> None:
    """`-O imatrix=` (a variable that expanded to nothing) was YAML null, refused as 'Input should be a valid
    string'; it reaches the option's own check, which names the values it takes."""
    fake_model(tmp_path / "m")
    proc = run_cli(["quantize", "m", "-m", "gguf", "-O", "imatrix=", "-o", "o"], cwd=tmp_path)
    assert_refused(proc)
    assert "imatrix: empty; use none, auto or a file path" in proc.stderr


def test_a_list_option_written_as_a_shell_user_writes_it(assets: dict[str, Path], tmp_path: Path) -> None:
    """`-O skip_modules=lm_head,model.layers.0.mlp.down_proj` was refused ('Input should be a valid list': YAML
    wanted `[a, b]`); it is the list, and bitsandbytes keeps exactly those modules unquantized."""
    pytest.importorskip("bitsandbytes")
    first_layers(assets["model"], tmp_path / "m", 1)
    proc = run_cli(
        ["quantize", "m", "-m", "bnb-int8", "-O", "skip_modules=lm_head,model.layers.0.mlp.down_proj", "-o", "o", "-q"],
        cwd=tmp_path,
    )
    assert proc.returncode == 0, proc.stderr
    manifest = json.loads((tmp_path / "o" / "llmopt.json").read_text())
    assert manifest["options"]["skip_modules"] == ["lm_head", "model.layers.0.mlp.down_proj"]
    config = json.loads((tmp_path / "o" / "config.json").read_text())
    assert "model.layers.0.mlp.down_proj" in config["quantization_config"]["llm_int8_skip_modules"]


def test_options_of_a_plugin_that_does_not_load(tmp_path: Path) -> None:
    """`llmopt backends --options` of a plugin whose module raises on import: exit 4, its reason in one line."""
    site = tmp_path / "site"
    dist = site / "llmopt_broken_opts-0.1.dist-info"
    dist.mkdir(parents=True)
    (dist / "METADATA").write_text("Metadata-Version: 2.1\nName: llmopt-broken-opts\nVersion: 0.1\n")
    (dist / "entry_points.txt").write_text("[llmopt.backends]\nbroken = plugin_broken_opts:Nope\n")
    (site / "plugin_broken_opts.py").write_text(textwrap.dedent("raise RuntimeError('plugin exploded on import')\n"))
    env = {"PYTHONPATH": os.pathsep.join([str(ROOT), str(site)])}
    proc = run_cli(["backends", "--options", "broken"], cwd=tmp_path, env=env)
    assert_refused(proc, 4)
    assert "plugin exploded on import" in proc.stderr
