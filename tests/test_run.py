"""``llmopt run`` / ``plan`` / ``report merge``.

Fast tests drive the real pipeline (resume checks, error isolation, exit codes, reports, publishing only
what passed) with ``api.quantize``/``api.evaluate`` replaced by small stand-ins that write real artifact
folders and manifests; the e2e test runs the real thing on SmolLM2-135M.
"""

from __future__ import annotations

import json
import os
import secrets
import shutil
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from llmopt import api
from llmopt.artifact import (
    Artifact,
    CalibrationInfo,
    EnvironmentInfo,
    Manifest,
    SourceInfo,
    files_digest,
    hash_tree,
    sha256_json,
)
from llmopt.cli import main
from llmopt.errors import BackendUnavailableError
from llmopt.evaluate.gate import GateSpec, apply_gate
from llmopt.report import run_exit_code
from llmopt.results import EvalReport
from llmopt.specs import EvalSpec
from tests.evaldata import scored
from tests.helpers import fake_model

RECIPE = """\
name: fake
model:
  source: {model}
evaluation:
  dataset: {text}
  context_length: 64
  device: cpu
  kld: false  # the stand-in evaluate below computes no KL divergence (a real one does, by default)
gates:
  max_ppl_increase_pct: 5
variants:
  - name: int8
    method: bnb-int8
  - name: nf4
    method: bnb-nf4
  - name: int8-strict
    method: bnb-int8
    options: {{llm_int8_threshold: 4.0}}
    gate: {{max_ppl_increase_pct: 1}}
publish:
  organization: test-org
  base_model: HuggingFaceTB/SmolLM2-135M-Instruct
  license: apache-2.0
"""


def cli(args: list[str]) -> int:
    try:
        main(args)
    except SystemExit as exc:
        return int(exc.code or 0)
    return 0


class FakeApi:
    """Stand-ins for api.quantize / api.evaluate with the same signatures and on-disk effects."""

    def __init__(self) -> None:
        self.calls: list[tuple[str, str]] = []
        self.unavailable: set[str] = {"bnb-nf4"}

    def quantize(self, model: str, method: str, output: str | Path, **kw: Any) -> Artifact:
        from llmopt.backends import get_backend
        from llmopt.source import resolve

        out = Path(output)
        self.calls.append(("quantize", out.name))
        if method in self.unavailable:
            raise BackendUnavailableError("bitsandbytes 4-bit cannot run here.", "Use a GPU.")
        if out.exists():
            shutil.rmtree(out)
        out.mkdir(parents=True)
        (out / "model.safetensors").write_bytes(secrets.token_bytes(256))
        (out / "config.json").write_text("{}")
        src = resolve(model)
        calibration = None
        if kw.get("calibration"):
            import hashlib

            from llmopt.data import load_text

            text = load_text(kw["calibration"], purpose="calibration")
            calibration = CalibrationInfo(
                dataset=kw["calibration"], samples=kw["samples"], seq_len=kw["seq_len"], tokens_sha256="0" * 64,
                text_sha256=hashlib.sha256(text.encode()).hexdigest(),
            )  # fmt: skip
        manifest = Manifest(
            llmopt_version="0.1.0",
            backend=method,
            format="bnb-8bit",
            runner="hf",
            options=get_backend(method, require_usable=False).parse_options(kw["options"]).model_dump(mode="json"),
            source=SourceInfo(model=model, resolved_path=str(src.path), weights_sha256=src.weights_sha256()),
            calibration=calibration,
            environment=EnvironmentInfo(python="3", platform="test", packages={}, device="cpu"),
            quantize_seconds=1.5,
            files=hash_tree(out),
            recipe=kw["recipe"],
        )
        art = Artifact(out, manifest)
        art.save()
        return art

    def evaluate(self, artifact_path: str | Path, baseline: str, spec: EvalSpec, **kw: Any) -> EvalReport:
        from llmopt.data import load_text
        from llmopt.environment import device_name, package_versions

        dataset = spec.dataset

        art = Artifact.open(artifact_path)
        self.calls.append(("evaluate", art.path.name))
        delta = 2.0  # int8: +2% passes the default 5% gate, fails int8-strict's 1%
        numbers = scored(
            delta, context_length=spec.context_length, stride=spec.stride
        )  # a summary that follows from per-window scores, or publish refuses it
        report: dict[str, Any] = {
            "schema": api.EVAL_SCHEMA,
            "settings": {
                "dataset": dataset,
                "text_sha256": sha256_json(load_text(dataset)),
                "tokens_sha256": "t" * 64,
                "context_length": spec.context_length,
                "stride": spec.resolved_stride(),
                "add_bos": spec.add_bos,
                "max_tokens": spec.max_tokens,
                **{k: numbers["settings"][k] for k in ("tokens_total", "tokens_scored", "windows")},
                "device": device_name("cpu"),
                "dtype": "float32",
            },
            "baseline": {**numbers["baseline"], "size_bytes": 8192, "model": baseline},
            "artifact": {**numbers["artifact"], "size_bytes": art.size_bytes()},
            "delta_pct": numbers["delta_pct"],
            "delta_pct_stderr": numbers["delta_pct_stderr"],
            "size_ratio": art.size_bytes() / 8192,
            "environment": {"packages": package_versions(("torch", "transformers"))},
            "artifact_files_sha256": files_digest(art.manifest.files),
        }
        gate: GateSpec = kw["gate"]
        report["gate"] = {**apply_gate(gate, report).model_dump(mode="json"), "spec": gate.model_dump(mode="json")}
        art.manifest.evaluation = {k: v for k, v in report.items() if k != "gate"}
        art.manifest.gate = report["gate"]
        art.save()
        return EvalReport.model_validate(report)


@pytest.fixture
def fake(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[tuple[FakeApi, Path]]:
    model = fake_model(tmp_path / "model")
    text = tmp_path / "eval.txt"
    text.write_text("Some prose to score. " * 50)
    recipe = tmp_path / "fake.yaml"
    recipe.write_text(RECIPE.format(model=model, text=text))
    stand_in = FakeApi()
    monkeypatch.setattr(api, "quantize", stand_in.quantize)
    monkeypatch.setattr(api, "evaluate", stand_in.evaluate)
    yield stand_in, recipe


def test_exit_code_rules() -> None:
    from llmopt.results import VariantOutcome

    def row(status: str, code: int | None = None) -> VariantOutcome:
        error = {"stage": "quantize", "type": "E", "message": "m", "exit_code": code} if code else None
        return VariantOutcome.model_validate({"name": "v", "method": "m", "status": status, "error": error})

    ok, gate, err4, err5 = row("passed"), row("gate_failed"), row("error", 4), row("error", 5)
    assert run_exit_code([ok, ok]) == 0
    assert run_exit_code([ok, gate]) == 3
    assert run_exit_code([gate, err5, err4]) == 5  # first error in recipe order wins over a gate failure
    assert run_exit_code([row("error", 1)]) == 1


def test_run_isolates_errors_and_resumes(
    fake: tuple[FakeApi, Path], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    stand_in, recipe = fake
    out = tmp_path / "out"
    assert cli(["run", str(recipe), "-o", str(out), "-q"]) == 4  # nf4 errored (exit 4): first error wins
    printed = capsys.readouterr()
    assert "bitsandbytes 4-bit cannot run here" in printed.err
    assert stand_in.calls == [
        ("quantize", "int8"), ("evaluate", "int8"), ("quantize", "nf4"),
        ("quantize", "int8-strict"), ("evaluate", "int8-strict"),
    ]  # fmt: skip
    report = json.loads((out / "report.json").read_text())
    status = {v["name"]: v["status"] for v in report["variants"]}
    assert status == {"int8": "passed", "nf4": "error", "int8-strict": "gate_failed"}
    assert report["exit_code"] == 4 and report["counts"] == {"passed": 1, "gate_failed": 1, "error": 1, "not_run": 0}
    nf4 = next(v for v in report["variants"] if v["name"] == "nf4")
    assert nf4["error"] == {
        "stage": "quantize", "type": "BackendUnavailableError", "message": "bitsandbytes 4-bit cannot run here.",
        "hint": "Use a GPU.", "exit_code": 4,
    }  # fmt: skip
    md = (out / "report.md").read_text()
    n = scored(2.0, context_length=64)
    a = n["artifact"]
    assert (
        f"| int8 | bnb-int8 | {a['perplexity']:.4f} ± {a['stderr']:.4f} | +2.00% ± {n['delta_pct_stderr']:.2f} |" in md
    )
    assert "nf4 (quantize, exit 4): bitsandbytes 4-bit cannot run here." in md
    manifest = Artifact.open(out / "artifacts" / "int8").manifest
    assert manifest.recipe is not None and manifest.recipe["variant"] == "int8"
    assert manifest.recipe["resolved"]["evaluation"]["context_length"] == 64

    # second run: nothing to redo except the variant that failed
    stand_in.calls.clear()
    stand_in.unavailable.clear()
    mtime = (out / "artifacts" / "int8" / "model.safetensors").stat().st_mtime_ns
    assert cli(["run", str(recipe), "-o", str(out), "-q", "--only", "int8", "--only", "nf4"]) == 0
    assert stand_in.calls == [("quantize", "nf4"), ("evaluate", "nf4")]
    assert (out / "artifacts" / "int8" / "model.safetensors").stat().st_mtime_ns == mtime
    report = json.loads((out / "report.json").read_text())
    int8 = report["variants"][0]
    assert int8["quantize"]["reused"] and int8["evaluation_reused"]


def test_run_redoes_what_changed(fake: tuple[FakeApi, Path], tmp_path: Path) -> None:
    stand_in, recipe = fake
    stand_in.unavailable.clear()
    out = tmp_path / "out"
    assert cli(["run", str(recipe), "-o", str(out), "-q"]) == 3  # int8-strict fails its 1% gate
    stand_in.calls.clear()

    # a gate change re-applies the gate to the stored evaluation: no quantize, no evaluate
    sets = ["--set", "variants.int8-strict.gate.max_ppl_increase_pct=3"]
    assert cli(["run", str(recipe), "-o", str(out), "-q", *sets]) == 0
    assert stand_in.calls == []
    assert Artifact.open(out / "artifacts" / "int8-strict").manifest.gate["passed"]  # type: ignore[index]

    # changed options -> quantized again; a tampered file -> quantized again; other settings -> re-evaluated
    (out / "artifacts" / "nf4" / "config.json").write_text('{"tampered": true}')
    args = ["--set", "variants.int8.options.llm_int8_threshold=5.0", "--context", "32"]
    assert cli(["run", str(recipe), "-o", str(out), "-q", *sets, *args]) == 0
    assert stand_in.calls == [
        ("quantize", "int8"), ("evaluate", "int8"), ("quantize", "nf4"), ("evaluate", "nf4"),
        ("evaluate", "int8-strict"),
    ]  # fmt: skip
    report = json.loads((out / "report.json").read_text())
    assert report["variants"][1]["quantize"]["reason"].startswith("its files changed (config.json (changed)")


def test_run_unfinished_artifact_is_rebuilt(fake: tuple[FakeApi, Path], tmp_path: Path) -> None:
    _, recipe = fake
    out = tmp_path / "out"
    (out / "artifacts" / "int8").mkdir(parents=True)
    (out / "artifacts" / "int8" / "partial.bin").write_bytes(b"x")  # no llmopt.json: unfinished
    (out / ".llmopt-run").write_text("")  # left by the earlier, interrupted run
    cli(["run", str(recipe), "-o", str(out), "-q", "--only", "int8"])
    report = json.loads((out / "report.json").read_text())
    assert report["variants"][0]["quantize"]["reason"] == "the folder holds an unfinished artifact"
    assert not (out / "artifacts" / "int8" / "partial.bin").exists()


def test_run_bad_inputs(fake: tuple[FakeApi, Path], tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    _, recipe = fake
    assert cli(["run", str(recipe), "--only", "int9", "-o", str(tmp_path / "o")]) == 2
    assert "no variant 'int9' (did you mean 'int8'?)" in capsys.readouterr().err
    assert cli(["run", str(recipe), "--set", "evaluation.contxt=5", "-o", str(tmp_path / "o")]) == 2
    assert "unknown key 'contxt' in evaluation" in capsys.readouterr().err
    gone = tmp_path / "gone.yaml"
    gone.write_text(recipe.read_text().replace(str(tmp_path / "model"), str(tmp_path / "missing-model")))
    assert cli(["run", str(gone), "-o", str(tmp_path / "o2")]) == 2  # shared problems fail before any work
    assert "missing-model does not exist" in capsys.readouterr().err
    assert not (tmp_path / "o2").exists()


def test_run_publishes_only_passing(
    fake: tuple[FakeApi, Path], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    pytest.importorskip("huggingface_hub")
    import huggingface_hub.constants as hf_constants

    from tests.hubserver import HubServer

    stand_in, recipe = fake
    stand_in.unavailable.clear()
    token = "hf_test_" + secrets.token_hex(8)
    with HubServer(token) as hub:
        monkeypatch.setenv("HF_TOKEN", token)
        monkeypatch.setenv("HF_ENDPOINT", hub.url)
        monkeypatch.setattr(hf_constants, "HF_HUB_OFFLINE", False)
        monkeypatch.setattr(hf_constants, "HF_HUB_DISABLE_XET", True)
        out = tmp_path / "out"
        assert cli(["run", str(recipe), "-o", str(out), "-q", "--publish"]) == 3
        assert sorted(hub.state.repos) == ["test-org/SmolLM2-135M-Instruct-int8", "test-org/SmolLM2-135M-Instruct-nf4"]
        commit = hub.commits("test-org/SmolLM2-135M-Instruct-int8")[-1]
        assert {"model.safetensors", "config.json", "llmopt.json", "README.md"} <= set(commit.files)
        assert "variant `int8`" in commit.files["README.md"].decode()
        report = json.loads((out / "report.json").read_text())
        published = {v["name"]: v["publish"] for v in report["variants"]}
        assert published["int8-strict"] is None  # failed its gate: not published
        assert published["int8"]["repo_id"] == "test-org/SmolLM2-135M-Instruct-int8"
        assert "card" not in published["int8"]
        assert all(token.encode() not in r.body for r in hub.requests)
        assert token not in (out / "report.json").read_text()


def test_run_publish_without_token_fails_before_work(
    fake: tuple[FakeApi, Path], tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    pytest.importorskip("huggingface_hub")
    stand_in, recipe = fake
    monkeypatch.delenv("HF_TOKEN", raising=False)
    assert cli(["run", str(recipe), "-o", str(tmp_path / "o"), "--publish"]) == 2
    assert "no Hugging Face token found" in capsys.readouterr().err
    assert stand_in.calls == []


def test_plan(fake: tuple[FakeApi, Path], capsys: pytest.CaptureFixture[str]) -> None:
    _, recipe = fake
    args = ["plan", str(recipe), "--format", "github-matrix", "--publish", "--set", "evaluation.max_tokens=64"]
    assert cli([*args, "--output-root", "runs"]) == 0
    out = capsys.readouterr().out
    assert out.count("\n") == 1  # one line, for $GITHUB_OUTPUT
    jobs = json.loads(out)["include"]
    assert [j["variant"] for j in jobs] == ["int8", "nf4", "int8-strict"]
    assert jobs[0]["command"] == (
        f"llmopt run {recipe} --only int8 --output runs/int8 --set evaluation.max_tokens=64 --publish"
    )
    assert cli(["plan", str(recipe)]) == 0
    assert json.loads(capsys.readouterr().out)[2]["output"] == "llmopt-runs/int8-strict"
    assert cli(["plan", str(recipe), "--set", "variants.int8.options.nope=1"]) == 2


def test_report_merge(fake: tuple[FakeApi, Path], tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    stand_in, recipe = fake
    stand_in.unavailable.clear()
    for name in ("int8", "nf4", "int8-strict"):  # as three CI jobs would
        cli(["run", str(recipe), "--only", name, "-o", str(tmp_path / "jobs" / name), "-q"])
    capsys.readouterr()
    jobs = [str(tmp_path / "jobs" / n) for n in ("int8", "nf4")] + [str(tmp_path / "jobs/int8-strict/report.json")]
    merged_dir = tmp_path / "merged"
    assert cli(["report", "merge", *jobs, "-o", str(merged_dir)]) == 0
    merged = json.loads((merged_dir / "report.json").read_text())
    assert [v["name"] for v in merged["variants"]] == ["int8", "nf4", "int8-strict"]
    assert merged["exit_code"] == 3 and merged["recipe"]["names"] == ["fake"]
    assert (merged_dir / "report.md").is_file()
    assert (
        Path(merged_dir / merged["variants"][0]["artifact"]).resolve()
        == (tmp_path / "jobs" / "int8" / "artifacts" / "int8").resolve()
    )
    if "matplotlib" in sys.modules or _has_matplotlib():
        assert (merged_dir / "plots" / "perplexity_vs_size.png").is_file()

    # reports measured on other tokens are not comparable
    other = json.loads((tmp_path / "jobs" / "nf4" / "report.json").read_text())
    other["settings"]["tokens_sha256"] = "0" * 64
    (tmp_path / "other.json").write_text(json.dumps(other))
    assert cli(["report", "merge", jobs[0], str(tmp_path / "other.json"), "-o", str(tmp_path / "m2")]) == 2
    assert "not comparable" in capsys.readouterr().err
    assert cli(["report", "merge", str(tmp_path / "nothing"), "-o", str(tmp_path / "m3")]) == 2


def _evaluation(perplexity: float, size_bytes: int, delta_pct: float, **more: Any) -> dict[str, Any]:
    """An evaluation report with the numbers a run report's table and plots read (the rest made up)."""
    ev = scored(delta_pct)
    ev["artifact"].update(perplexity=perplexity, stderr=0.1, size_bytes=size_bytes)
    return {**ev, "delta_pct": delta_pct, **more}


def _has_matplotlib() -> bool:
    import importlib.util

    return importlib.util.find_spec("matplotlib") is not None


def test_report_without_matplotlib(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from llmopt.report import build_run_report, write_report

    monkeypatch.setitem(sys.modules, "matplotlib", None)  # import fails as if not installed
    row = {"name": "a", "method": "bnb-int8", "status": "passed", "evaluation": _evaluation(10.0, 100, 1.0)}
    report = write_report(build_run_report(recipe={"name": "r"}, variants=[row], output=tmp_path), tmp_path)
    assert report["files"]["plots"] == []
    assert any("matplotlib is not installed" in n for n in report["notes"])
    assert "pip install 'llmopt[report]'" in (tmp_path / "report.md").read_text()


@pytest.mark.e2e
def test_e2e_tiny_recipe(assets: dict[str, Path], tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """bnb-int8 + bnb-nf4 on SmolLM2-135M, 256 tokens, context 128: run, then resume without redoing work."""
    recipe = tmp_path / "tiny.yaml"
    recipe.write_text(
        f"""\
model:
  source: {assets["model"]}
evaluation:
  dataset: {assets["eval_text"]}
  context_length: 128
  max_tokens: 256
  device: cpu
gates:
  max_ppl_increase_pct: 25
variants:
  - name: int8
    method: bnb-int8
  - name: nf4
    method: bnb-nf4
    gate: {{max_ppl_increase_pct: 0}}
"""
    )
    out = tmp_path / "out"
    start = time.perf_counter()
    assert cli(["run", str(recipe), "-o", str(out)]) == 3  # nf4 costs far more than 0%
    first = time.perf_counter() - start
    printed = capsys.readouterr().out
    assert "FP16 baseline" in printed and "int8" in printed and "FAIL" in printed
    report = json.loads((out / "report.json").read_text())
    int8, nf4 = report["variants"]
    assert int8["status"] == "passed" and nf4["status"] == "gate_failed"
    assert 0 < int8["size_bytes"] < report["baseline"]["size_bytes"]
    assert nf4["size_bytes"] < int8["size_bytes"]
    assert abs(int8["delta_pct"]) < 25 and nf4["delta_pct"] > 0
    assert report["settings"]["tokens_scored"] == 254 and report["baseline"]["perplexity"] > 1
    assert (out / "report.md").is_file()
    if _has_matplotlib():
        assert (out / "plots" / "perplexity_vs_size.png").stat().st_size > 1000

    weights = out / "artifacts" / "int8" / "model.safetensors"
    mtime = weights.stat().st_mtime_ns
    start = time.perf_counter()
    assert cli(["run", str(recipe), "-o", str(out), "--json"]) == 3
    second = time.perf_counter() - start
    again = json.loads(capsys.readouterr().out)
    assert all(v["quantize"]["reused"] and v["evaluation_reused"] for v in again["variants"])
    assert [v["perplexity"] for v in again["variants"]] == [int8["perplexity"], nf4["perplexity"]]
    assert weights.stat().st_mtime_ns == mtime
    assert second < first / 3, (first, second)
    assert sorted(os.listdir(out / "artifacts")) == ["int8", "nf4"]


def test_report_with_speed_plot(tmp_path: Path) -> None:
    pytest.importorskip("matplotlib")
    from llmopt.report import build_run_report, write_report

    rows = [
        {"name": n, "method": "gptq", "status": "passed",
         "evaluation": _evaluation(p, s, d, throughput={"decode_speedup": {"1": x, "8": None}})}
        for n, p, s, d, x in (("a", 10.0, 100, 1.0, 1.8), ("b", 11.0, 60, 10.0, 2.4))
    ]  # fmt: skip
    report = write_report(build_run_report(recipe={"name": "r"}, variants=rows, output=tmp_path), tmp_path)
    assert report["files"]["plots"] == ["plots/perplexity_vs_size.png", "plots/decode_speedup.png"]
    assert "- b: batch 1: 2.40x" in (tmp_path / "report.md").read_text()


def test_ci_doc_workflow_matches_plan(fake: tuple[FakeApi, Path], capsys: pytest.CaptureFixture[str]) -> None:
    """docs/ci-github-actions.md: the workflow parses and reads only fields that `llmopt plan` emits."""
    import re

    import yaml

    text = (Path(__file__).resolve().parents[1] / "docs" / "ci-github-actions.md").read_text()
    block = text.split("```yaml\n", 1)[1].split("```", 1)[0]
    workflow = yaml.safe_load(block)
    assert set(workflow["jobs"]) == {"plan", "quantize", "report"}
    assert "--format github-matrix" in workflow["jobs"]["plan"]["steps"][-1]["run"]
    assert workflow["jobs"]["quantize"]["strategy"]["fail-fast"] is False
    _, recipe = fake
    assert cli(["plan", str(recipe), "--format", "github-matrix"]) == 0
    job = json.loads(capsys.readouterr().out)["include"][0]
    assert set(re.findall(r"matrix\.(\w+)", block)) <= set(job)


def test_run_calibration_changes_requantize(fake: tuple[FakeApi, Path], tmp_path: Path) -> None:
    stand_in, _ = fake
    calib = tmp_path / "calib.txt"
    calib.write_text("Calibration prose. " * 100)
    recipe = tmp_path / "gptq.yaml"
    recipe.write_text(
        f"""\
model: {{source: {tmp_path / "model"}}}
calibration: {{dataset: {calib}, samples: 4, seq_len: 16, seed: 0}}
evaluation: {{dataset: {tmp_path / "eval.txt"}, context_length: 64, device: cpu, kld: false}}
gates: {{max_ppl_increase_pct: 5}}
variants:
  - {{name: gptq4, method: gptq, options: {{bits: 4, group_size: 64}}}}
  - {{name: int8, method: bnb-int8}}
"""
    )
    out = tmp_path / "out"
    assert cli(["run", str(recipe), "-o", str(out), "-q"]) == 0
    manifest = Artifact.open(out / "artifacts" / "gptq4").manifest
    assert manifest.calibration is not None and manifest.calibration.samples == 4
    assert Artifact.open(out / "artifacts" / "int8").manifest.calibration is None  # bnb needs none
    stand_in.calls.clear()
    assert cli(["run", str(recipe), "-o", str(out), "-q"]) == 0
    assert stand_in.calls == []
    # another seed, or other calibration text, picks other samples: quantize again (bnb is unaffected)
    assert cli(["run", str(recipe), "-o", str(out), "-q", "--set", "calibration.seed=1"]) == 0
    assert stand_in.calls == [("quantize", "gptq4"), ("evaluate", "gptq4")]
    stand_in.calls.clear()
    calib.write_text("Other calibration prose. " * 100)
    assert cli(["run", str(recipe), "-o", str(out), "-q", "--set", "calibration.seed=1"]) == 0
    assert stand_in.calls == [("quantize", "gptq4"), ("evaluate", "gptq4")]
    report = json.loads((out / "report.json").read_text())
    assert report["variants"][0]["quantize"]["reason"] == "calibration changed"


def test_artifact_size_bound_is_an_honest_upper_bound(assets: dict[str, Path]) -> None:
    """The run's disk check bounds each artifact from the config; on SmolLM2 the bound is above what the backends
    wrote (README's CPU table: int8 167.1 MB, nf4 115.4, GPTQ 4-bit g64 118.2, 8-bit g64 172.1; HQQ g64 117.5) by
    < 25%."""
    from llmopt.pipeline import artifact_bytes_bound

    config = json.loads((assets["model"] / "config.json").read_text())
    measured = {
        ("bnb-int8", ()): 167.1e6,
        ("bnb-nf4", ()): 115.4e6,
        ("gptq", (("bits", 4), ("group_size", 64))): 118.2e6,
        ("gptq", (("bits", 8), ("group_size", 64))): 172.1e6,
        ("hqq", (("group_size", 64),)): 117.5e6,  # docs/hqq.md
    }
    for (method, opts), size in measured.items():
        bound = artifact_bytes_bound(method, dict(opts), config)
        assert size < bound < 1.25 * size, (method, opts, bound)
    assert artifact_bytes_bound("gguf", {"quant_type": "q4_k_m"}, config) > 100e6


def test_merge_keeps_a_finished_variant_over_a_not_run_placeholder(tmp_path: Path) -> None:
    """An interrupted job's report lists unfinished variants as not_run; merged with (even older) reports that
    finished them, the finished rows win, and the markdown says which variants did not run."""
    from llmopt.report import build_run_report, merge_reports, render_markdown, write_report

    done = {"name": "x", "method": "bnb-int8", "status": "passed", "gate": {"passed": True, "checks": []}}
    placeholder = {"name": "x", "method": "bnb-int8", "status": "not_run"}
    other = {"name": "y", "method": "bnb-nf4", "status": "not_run"}
    write_report(build_run_report(recipe={"name": "r"}, variants=[done], output=tmp_path / "a"), tmp_path / "a")
    time.sleep(1.1)  # created_at has one-second resolution; the interrupted report is the newer one
    partial = build_run_report(recipe={"name": "r"}, variants=[placeholder, other], output=tmp_path / "b")
    partial.state, partial.exit_code = "interrupted", 130
    write_report(partial, tmp_path / "b", plots=False)
    assert "Run interrupted" in (tmp_path / "b" / "report.md").read_text()
    merged = merge_reports([tmp_path / "a", tmp_path / "b"], tmp_path / "m")
    assert [(v["name"], v["status"]) for v in merged["variants"]] == [("x", "passed"), ("y", "not_run")]
    assert merged["counts"]["not_run"] == 1
    assert "| y | bnb-nf4 | – | – | – | – | not run |" in render_markdown(merged)
