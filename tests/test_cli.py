"""CLI behaviour that needs no model weights: bad input fails fast with one message and its exit code."""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from llmopt.cli import main
from llmopt.errors import EXIT_ARTIFACT, EXIT_INPUT, EXIT_UNAVAILABLE
from tests.helpers import SMOLLM2_CONFIG, fake_model


def run_cli(args: list[str], capsys: pytest.CaptureFixture[str]) -> tuple[int, str, str]:
    with pytest.raises(SystemExit) as exc:
        main(args)
    out, err = capsys.readouterr()
    code = exc.value.code if isinstance(exc.value.code, int) else 1
    return code, out, err


def assert_one_clear_error(err: str) -> None:
    assert err.startswith("error: "), err
    assert "Traceback" not in err
    assert "  -> " in err  # the next step


def test_help_and_backends_do_not_import_torch() -> None:
    code = textwrap.dedent(
        """
        import sys
        from llmopt.cli import main
        for args in (["--help"], ["backends", "--json"], ["quantize", "--help"], ["eval", "--help"]):
            try:
                main(args)
            except SystemExit as e:
                assert e.code == 0, (args, e.code)
        heavy = [m for m in ("torch", "transformers", "gptqmodel", "bitsandbytes") if m in sys.modules]
        assert not heavy, heavy
        """
    )
    subprocess.run([sys.executable, "-c", code], check=True, capture_output=True)


def test_python_dash_m_works() -> None:
    out = subprocess.run([sys.executable, "-m", "llmopt", "--version"], check=True, capture_output=True, text=True)
    assert out.stdout.startswith("llmopt ")


def test_backends_json_lists_every_builtin(capsys: pytest.CaptureFixture[str]) -> None:
    code, out, _ = run_cli(["backends", "--json"], capsys)
    assert code == 0
    rows = {r["name"]: r for r in json.loads(out)}
    assert {"gptq", "bnb-int8", "bnb-nf4", "bnb-fp4"} <= set(rows)
    for row in rows.values():
        assert row["usable"] == (not row["problems"])


def test_unknown_method_suggests_close_names(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    model = fake_model(tmp_path / "m")
    code, _, err = run_cli(["quantize", str(model), "-m", "gtpq", "-o", str(tmp_path / "o")], capsys)
    assert code == EXIT_INPUT
    assert_one_clear_error(err)
    assert "did you mean 'gptq'" in err


def test_path_that_is_no_model(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    (tmp_path / "empty").mkdir()
    code, _, err = run_cli(["quantize", str(tmp_path / "empty"), "-m", "bnb-int8", "-o", str(tmp_path / "o")], capsys)
    assert code == EXIT_INPUT
    assert_one_clear_error(err)
    assert "no config.json" in err
    assert not (tmp_path / "o").exists()


def test_missing_path(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    code, _, err = run_cli(["quantize", str(tmp_path / "nope"), "-m", "bnb-int8", "-o", str(tmp_path / "o")], capsys)
    assert code == EXIT_INPUT
    assert "does not exist" in err


def test_truncated_safetensors(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    model = fake_model(tmp_path / "m", truncate=100)
    code, _, err = run_cli(["quantize", str(model), "-m", "bnb-int8", "-o", str(tmp_path / "o")], capsys)
    assert code == EXIT_INPUT
    assert_one_clear_error(err)
    assert "truncated" in err and "fetch the model again" in err


def test_corrupt_safetensors_header(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    model = fake_model(tmp_path / "m")
    (model / "model.safetensors").write_bytes(b"\xff" * 64)
    code, _, err = run_cli(["quantize", str(model), "-m", "bnb-int8", "-o", str(tmp_path / "o")], capsys)
    assert code == EXIT_INPUT
    assert "not a readable safetensors file" in err


def test_non_causal_architecture(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    model = fake_model(tmp_path / "m", {"architectures": ["BertModel"], "model_type": "bert", "hidden_size": 768})
    code, _, err = run_cli(["quantize", str(model), "-m", "gptq", "-o", str(tmp_path / "o")], capsys)
    assert code == EXIT_INPUT
    assert "not a causal language model" in err


def test_architecture_gptq_cannot_build(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    cfg = {**SMOLLM2_CONFIG, "architectures": ["FancyNewForCausalLM"], "model_type": "fancy_new"}
    model = fake_model(tmp_path / "m", cfg)
    code, _, err = run_cli(
        ["quantize", str(model), "-m", "gptq", "--group-size", "64", "-o", str(tmp_path / "o")], capsys
    )
    assert code == EXIT_INPUT
    assert_one_clear_error(err)
    assert "FancyNewForCausalLM" in err


def test_group_size_that_does_not_divide_names_layer_and_working_sizes(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    model = fake_model(tmp_path / "m")
    code, _, err = run_cli(
        ["quantize", str(model), "-m", "gptq", "--group-size", "128", "--calibration", "x", "-o", str(tmp_path / "o")],
        capsys,
    )
    assert code == EXIT_INPUT
    assert_one_clear_error(err)
    assert "does not divide the input width 576 of q_proj" in err
    assert "32, 64" in err


def test_unsupported_bits(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    code, _, err = run_cli(
        ["quantize", str(fake_model(tmp_path / "m")), "-m", "gptq", "--bits", "5", "-o", str(tmp_path / "o")], capsys
    )
    assert code == EXIT_INPUT
    assert_one_clear_error(err)
    assert "bits" in err and "valid options of gptq" in err


def test_option_of_another_backend_is_refused(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    code, _, err = run_cli(
        ["quantize", str(fake_model(tmp_path / "m")), "-m", "bnb-int8", "--group-size", "64", "-o",
         str(tmp_path / "o")],
        capsys,
    )
    assert code == EXIT_INPUT
    assert "'group_size' is not an option of bnb-int8" in err


def test_output_exists_and_not_empty(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "o"
    out.mkdir()
    (out / "keep.txt").write_text("mine")
    code, _, err = run_cli(["quantize", str(fake_model(tmp_path / "m")), "-m", "bnb-int8", "-o", str(out)], capsys)
    assert code == EXIT_INPUT
    assert "--overwrite" in err
    assert (out / "keep.txt").read_text() == "mine"


def test_gpu_requested_where_none_is_visible(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    pytest.importorskip("torch")
    import torch

    if torch.cuda.is_available():
        pytest.skip("this machine has a GPU")
    code, _, err = run_cli(
        ["quantize", str(fake_model(tmp_path / "m")), "-m", "bnb-nf4", "--device", "cuda", "-o", str(tmp_path / "o")],
        capsys,
    )
    assert code == EXIT_UNAVAILABLE
    assert "no CUDA GPU is visible" in err


def test_gptq_without_calibration(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    pytest.importorskip("transformers")
    code, _, err = run_cli(
        ["quantize", str(fake_model(tmp_path / "m")), "-m", "gptq", "--group-size", "64", "-o", str(tmp_path / "o")],
        capsys,
    )
    assert code == EXIT_INPUT
    assert "needs calibration text" in err


def test_eval_of_folder_without_manifest(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    model = fake_model(tmp_path / "m")
    code, _, err = run_cli(["eval", str(model), "--baseline", str(model), "--dataset", "x"], capsys)
    assert code == EXIT_ARTIFACT
    assert_one_clear_error(err)
    assert "no llmopt.json" in err


def test_debug_env_shows_traceback(tmp_path: Path) -> None:
    proc = subprocess.run(
        [sys.executable, "-m", "llmopt", "quantize", str(tmp_path / "nope"), "-m", "bnb-int8", "-o",
         str(tmp_path / "o")],
        capture_output=True,
        text=True,
        env={**__import__("os").environ, "LLMOPT_DEBUG": "1"},
    )
    assert proc.returncode != 0
    assert "Traceback" in proc.stderr and "ModelError" in proc.stderr


def test_broken_and_incomplete_plugins_are_listed_not_fatal(tmp_path: Path) -> None:
    """A third-party backend registered through the entry-point group; one imports badly, one lacks a package."""
    site = tmp_path / "site"
    dist = site / "llmopt_plugin_demo-0.1.dist-info"
    dist.mkdir(parents=True)
    (dist / "METADATA").write_text("Metadata-Version: 2.1\nName: llmopt-plugin-demo\nVersion: 0.1\n")
    (dist / "entry_points.txt").write_text(
        "[llmopt.backends]\nbroken = plugin_broken:Nope\nneedy = plugin_needy:NeedyBackend\n"
    )
    (site / "plugin_broken.py").write_text("raise RuntimeError('plugin exploded on import')\n")
    (site / "plugin_needy.py").write_text(
        textwrap.dedent(
            """
            from pydantic import BaseModel, ConfigDict
            from llmopt.backends.base import Backend, Requirement

            class NeedyOptions(BaseModel):
                model_config = ConfigDict(extra="forbid")

            class NeedyBackend(Backend):
                name = "needy"
                format = "needy"
                Options = NeedyOptions
                requirements = (Requirement("definitely_missing_pkg_xyz", "definitely-missing-pkg-xyz"),)

                def quantize(self, inputs):
                    raise AssertionError("must not run")
            """
        )
    )
    env = {**__import__("os").environ, "PYTHONPATH": str(site)}
    listing = subprocess.run(
        [sys.executable, "-m", "llmopt", "backends", "--json"], capture_output=True, text=True, env=env, check=True
    )
    rows = {r["name"]: r for r in json.loads(listing.stdout)}
    assert rows["broken"]["usable"] is False and "plugin exploded on import" in rows["broken"]["problems"][0]
    assert rows["needy"]["usable"] is False
    assert "pip install definitely-missing-pkg-xyz" in rows["needy"]["problems"][0]
    assert rows["bnb-int8"]["origin"] == "builtin"

    model = fake_model(tmp_path / "m")
    run = subprocess.run(
        [sys.executable, "-m", "llmopt", "quantize", str(model), "-m", "needy", "-o", str(tmp_path / "o")],
        capture_output=True,
        text=True,
        env=env,
    )
    assert run.returncode == EXIT_UNAVAILABLE
    assert "pip install definitely-missing-pkg-xyz" in run.stderr
    assert "Traceback" not in run.stderr


@pytest.mark.parametrize(
    "args",
    [["run"], ["quantize", "x", "-m", "gptq", "-o", "y", "--bits", "four"], ["no-such-command"]],
)
def test_usage_errors_exit_2_without_traceback(args: list[str], capsys: pytest.CaptureFixture[str]) -> None:
    code, _, err = run_cli(args, capsys)
    assert code == EXIT_INPUT
    assert "Traceback" not in err and "Error" in err


def test_recorded_interrupt_stops_before_anything_is_visible() -> None:
    """A Ctrl-C swallowed by a finalizer is still acted on: interrupt.check raises exit 130."""
    from llmopt import interrupt
    from llmopt.errors import EXIT_INTERRUPTED, InterruptedRunError

    interrupt.reset()
    interrupt.check()  # nothing requested: no error
    interrupt.request()
    try:
        with pytest.raises(InterruptedRunError) as exc:
            interrupt.check()
        assert exc.value.exit_code == EXIT_INTERRUPTED and "nothing was written" in exc.value.message
    finally:
        interrupt.reset()


def test_third_party_console_noise_stays_out(tmp_path: Path, assets: dict[str, Path]) -> None:
    """A quantize prints llmopt's steps only: no transformers weight-loading/shard-writing bars, no torchao
    'Failed to load' lines, no torch pytree deprecation lines; LLMOPT_THIRD_PARTY_LOGS=1 brings them back."""
    from tests.helpers import first_layers, run_cli

    model = first_layers(assets["model"], tmp_path / "model", 1)
    quiet = run_cli(["quantize", str(model), "-m", "bnb-int8", "-o", str(tmp_path / "a")], cwd=tmp_path)
    assert quiet.returncode == 0, quiet.stderr[-2000:]
    for noise in ("Loading weights", "Writing model shards", "Failed to load", "_pytree.py"):
        assert noise not in quiet.stderr + quiet.stdout, noise
    loud = run_cli(
        ["quantize", str(model), "-m", "bnb-int8", "-o", str(tmp_path / "b")],
        cwd=tmp_path,
        # in-process CLI calls of other tests set the default in this process's environment: undo it here
        env={"LLMOPT_THIRD_PARTY_LOGS": "1", "HF_HUB_DISABLE_PROGRESS_BARS": "0"},
    )
    assert loud.returncode == 0, loud.stderr[-2000:]
    assert "Loading weights" in loud.stderr + loud.stdout
