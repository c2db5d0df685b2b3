"""KL divergence against FP16 (issue 14): careless settings, a baseline of another vocabulary, a hand-edited
distribution block, and the KLD gates, each with its exit code."""

from __future__ import annotations

import copy
import json
import shutil
from pathlib import Path
from typing import Any

import pytest

from llmopt.errors import EXIT_GATE, EXIT_INPUT
from tests.helpers import first_layers, run_cli


def _eval_args(art: Path, model: Path, text: Path, *extra: str) -> list[str]:
    return ["eval", str(art), "--baseline", str(model), "--dataset", str(text), "--device", "cpu", *extra]


def test_kld_gate_with_no_kld_is_refused_before_loading(evaluated_artifact: dict[str, Any], tmp_path: Path) -> None:
    """--max-kld with --no-kld: nothing could be checked, so it is bad input (2), said before any model loads."""
    cwd = tmp_path / "elsewhere"
    cwd.mkdir()
    art = shutil.copytree(evaluated_artifact["path"], cwd / "art")
    proc = run_cli(
        _eval_args(
            Path("art"), evaluated_artifact["model"], evaluated_artifact["text"], "--no-kld", "--max-kld", "0.1"
        ),
        cwd=cwd,
    )
    assert proc.returncode == EXIT_INPUT, proc.stderr
    assert "--no-kld" in proc.stderr and "Traceback" not in proc.stderr
    assert (
        json.loads((art / "llmopt.json").read_text())["evaluation"]
        == json.loads((evaluated_artifact["path"] / "llmopt.json").read_text())["evaluation"]
    )


@pytest.mark.parametrize(("flag", "value"), [("--min-top1", "150"), ("--max-kld", "-0.5"), ("--max-kld", "nan")])
def test_meaningless_kld_thresholds_are_bad_input(
    evaluated_artifact: dict[str, Any], tmp_path: Path, flag: str, value: str
) -> None:
    """A top-1 share over 100%, a negative or NaN KL limit: refused with the flag's name (2)."""
    proc = run_cli(
        _eval_args(evaluated_artifact["path"], evaluated_artifact["model"], evaluated_artifact["text"], flag, value),
        cwd=tmp_path,
    )
    assert proc.returncode == EXIT_INPUT, proc.stderr
    assert flag in proc.stderr and "Traceback" not in proc.stderr


def test_kld_gates_fail_with_value_threshold_and_margin(evaluated_artifact: dict[str, Any], tmp_path: Path) -> None:
    """An int8 artifact against a KL limit no quantization meets: exit 3, the checks name value, limit, margin."""
    art = shutil.copytree(evaluated_artifact["path"], tmp_path / "art")
    proc = run_cli(
        _eval_args(
            art,
            evaluated_artifact["model"],
            evaluated_artifact["text"],
            "--context",
            "256",
            "--max-tokens",
            "1024",
            "--max-kld",
            "1e-9",
            "--min-top1",
            "50",
            "--json",
            str(tmp_path / "r.json"),
        ),
        cwd=tmp_path,
    )
    assert proc.returncode == EXIT_GATE, proc.stderr
    report = json.loads((tmp_path / "r.json").read_text())
    dist = report["artifact"]["distribution"]
    checks = {c["name"]: c for c in report["gate"]["checks"]}
    assert checks["max_kld"]["passed"] is False
    assert checks["max_kld"]["value"] == dist["kld_mean"] > 0
    assert checks["max_kld"]["margin"] == pytest.approx(1e-9 - dist["kld_mean"])
    assert checks["min_top1_pct"]["passed"] is True
    assert checks["min_top1_pct"]["value"] == pytest.approx(100 * dist["top1_agreement"])
    assert checks["min_top1_pct"]["margin"] > 0
    assert "mean KL divergence" in proc.stderr and "gate failed" in proc.stderr
    # the baseline and its reference came from the session's cache: the FP16 side is computed once
    assert report["baseline"]["cached"] is True


def test_an_edited_distribution_block_does_not_add_up(evaluated_artifact: dict[str, Any]) -> None:
    """A lowered mean KLD or raised top-1 agreement in a manifest is caught by the recomputation (publish: 5)."""
    from llmopt.evaluate.gate import evaluation_problems

    report = evaluated_artifact["report"]
    evaluation = report.without_gate().to_json()
    assert evaluation_problems(evaluation, report.gate) == []
    for key, value in (("kld_mean", 1e-6), ("top1_agreement", 1.0), ("kld_stderr", 0.0)):
        edited = copy.deepcopy(evaluation)
        edited["artifact"]["distribution"][key] = value
        problems = evaluation_problems(edited)
        assert any(f"distribution.{key}" in p for p in problems), (key, problems)
    edited = copy.deepcopy(evaluation)
    edited["artifact"]["distribution"]["window_kld"][0] = -1.0
    assert any("window_kld" in p for p in evaluation_problems(edited))


def test_a_baseline_of_another_vocabulary_is_refused(assets: dict[str, Path], tmp_path: Path) -> None:
    """An artifact whose output layer is padded to another size (same tokenizer): KL is undefined, exit 2."""
    pytest.importorskip("bitsandbytes")
    from transformers import AutoModelForCausalLM

    from llmopt import api

    base = first_layers(assets["model"], tmp_path / "base", 1)
    padded = tmp_path / "padded"
    model = AutoModelForCausalLM.from_pretrained(base)
    model.resize_token_embeddings(49152 + 64)
    model.save_pretrained(padded)
    for extra in base.iterdir():
        if extra.name.startswith(("tokenizer", "special_tokens", "vocab", "merges")):
            shutil.copy(extra, padded / extra.name)
    api.quantize(str(padded), "bnb-int8", tmp_path / "art", device="cpu")
    proc = run_cli(
        _eval_args(Path("art"), Path("base"), assets["eval_text"], "--context", "64", "--max-tokens", "128"),
        cwd=tmp_path,
    )
    assert proc.returncode == EXIT_INPUT, proc.stderr
    assert "49,152" in proc.stderr and "49,216" in proc.stderr and "--no-kld" in proc.stderr
    # --no-kld scores perplexity alone
    proc = run_cli(
        _eval_args(
            Path("art"), Path("base"), assets["eval_text"], "--context", "64", "--max-tokens", "128", "--no-kld"
        ),
        cwd=tmp_path,
    )
    assert proc.returncode == 0, proc.stderr


def test_no_room_for_the_fp16_reference_is_said_before_scoring(
    evaluated_artifact: dict[str, Any], tmp_path: Path
) -> None:
    """LLMOPT_CACHE on a disk too small for FP16's reference: exit 4 naming the size and the ways out, no
    half-written reference left, and nothing recorded in the artifact."""
    from llmopt.errors import EXIT_UNAVAILABLE
    from tests.adversarial.test_paths import _mounted_tmpfs

    art = shutil.copytree(evaluated_artifact["path"], tmp_path / "art")
    before = (art / "llmopt.json").read_bytes()
    cache = tmp_path / "cache"
    with _mounted_tmpfs(cache, "size=4m"):
        proc = run_cli(
            _eval_args(Path("art"), evaluated_artifact["model"], evaluated_artifact["text"], "--max-tokens", "4096"),
            cwd=tmp_path,
            env={"LLMOPT_CACHE": str(cache)},
        )
        assert proc.returncode == EXIT_UNAVAILABLE, proc.stderr
        assert "FP16 reference for the KL divergence needs" in proc.stderr and "--no-kld" in proc.stderr
        assert "Traceback" not in proc.stderr
        assert not [p for p in cache.rglob("*") if "kld" in p.name]
    assert (art / "llmopt.json").read_bytes() == before
