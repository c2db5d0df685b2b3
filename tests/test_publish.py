"""``llmopt publish``: the gate and the hashes guard the upload; the real huggingface_hub client talks HTTP
to a local stand-in of the Hub (tests/hubserver.py), and the tests read what it received."""

from __future__ import annotations

import json
import os
import secrets
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml

from llmopt.artifact import (
    Artifact,
    EnvironmentInfo,
    Manifest,
    SourceInfo,
    files_digest,
    hash_tree,
)
from llmopt.cli import main
from llmopt.evaluate.gate import GateSpec, apply_gate
from tests.evaldata import scored
from tests.hubserver import HubServer

pytest.importorskip("huggingface_hub")


def run_cli(args: list[str]) -> int:
    try:
        main(args)
    except SystemExit as exc:
        return int(exc.code or 0)
    return 0


def make_artifact(
    root: Path,
    *,
    evaluated: bool = True,
    passed: bool = True,
    thresholds: bool = True,
    fmt: str = "bnb-8bit",
    backend: str = "bnb-int8",
    options: dict[str, Any] | None = None,
    recipe_publish: dict[str, Any] | None = None,
) -> Path:
    """A small artifact folder with a manifest as `llmopt quantize` + `llmopt eval` leave it."""
    art = root / "artifact"
    art.mkdir(parents=True)
    (art / "model.safetensors").write_bytes(secrets.token_bytes(4096))
    (art / "config.json").write_text(json.dumps({"architectures": ["LlamaForCausalLM"], "model_type": "llama"}))
    (art / "tokenizer.json").write_text('{"version": "1.0"}')
    source = root / "source-model"
    source.mkdir()
    (source / "README.md").write_text("---\nlicense: apache-2.0\n---\n# base\n")
    files = hash_tree(art)
    manifest = Manifest(
        llmopt_version="0.1.0",
        backend=backend,
        format=fmt,
        runner="hf",
        options=options if options is not None else {"llm_int8_threshold": 6.0, "skip_modules": ["lm_head"]},
        source=SourceInfo(
            model=str(source), resolved_path=str(source), weights_sha256={"model.safetensors": "ab" * 32}
        ),
        calibration=None,
        environment=EnvironmentInfo(python="3.11", platform="linux", packages={"torch": "2.13"}, device="cpu (x86)"),
        quantize_seconds=3.2,
        files=files,
        recipe={
            "variant": "int8",
            "file": str(root / "r.yaml"),
            "resolved": {
                "model": {"source": str(source), "revision": None},
                "evaluation": {"dataset": str(root / "eval.txt")},
                "publish": {"base_model": "HuggingFaceTB/SmolLM2-135M-Instruct", **(recipe_publish or {})},
            },
        },
    )
    if evaluated:
        # the numbers are derived from per-window scores, as api.evaluate derives them, and the gate is really
        # applied to them: a "failed" artifact is one whose delta is over its threshold, not a flipped flag
        numbers = scored(1.8 if passed else 30.0)
        spec = GateSpec(max_ppl_increase_pct=5.0 if thresholds else None)
        manifest.evaluation = {
            "schema": "llmopt.eval/1",
            "settings": {
                "dataset": str(root / "eval.txt"),
                "text_sha256": "cd" * 32,
                **numbers["settings"],
                "device": "cpu (x86)",
                "dtype": "float32",
            },
            "baseline": {**numbers["baseline"], "size_bytes": 269_000_000, "model": str(source)},
            "artifact": {**numbers["artifact"], "size_bytes": 4200, "backend": backend, "format": fmt},
            "delta_pct": numbers["delta_pct"],
            "delta_pct_stderr": numbers["delta_pct_stderr"],
            "environment": {"python": "3.11", "platform": "linux", "packages": {"torch": "2.13"}, "device": "cpu"},
            "artifact_files_sha256": files_digest(files),
        }
        manifest.gate = {
            **apply_gate(spec, manifest.evaluation).model_dump(mode="json"),
            "spec": spec.model_dump(mode="json"),
        }
    Artifact(art, manifest).save()
    return art


@pytest.fixture
def hub(monkeypatch: pytest.MonkeyPatch) -> Iterator[HubServer]:
    import huggingface_hub.constants as hf_constants

    token = "hf_test_" + secrets.token_hex(12)
    with HubServer(token) as server:
        monkeypatch.setenv("HF_TOKEN", token)
        monkeypatch.setenv("HF_ENDPOINT", server.url)
        # read by huggingface_hub at import time: the suite runs offline, and this server has no Xet storage
        monkeypatch.setattr(hf_constants, "HF_HUB_OFFLINE", False)
        monkeypatch.setattr(hf_constants, "HF_HUB_DISABLE_XET", True)
        yield server


def test_dry_run_prints_card_and_files_and_sends_nothing(
    tmp_path: Path, hub: HubServer, capsys: pytest.CaptureFixture[str]
) -> None:
    art = make_artifact(tmp_path)
    before = sorted(p.name for p in art.iterdir())
    code = run_cli(["publish", str(art), "test-org/smol-int8", "--dry-run"])
    out = capsys.readouterr().out
    assert code == 0
    assert "would upload 5 files" in out
    for name in ("model.safetensors", "config.json", "tokenizer.json", "llmopt.json", "README.md"):
        assert name in out
    assert "base_model: HuggingFaceTB/SmolLM2-135M-Instruct" in out
    assert "base_model_relation: quantized" in out
    assert hub.requests == []  # nothing left the machine
    assert sorted(p.name for p in art.iterdir()) == before  # no card written into the artifact


def test_publish_one_commit_with_card(tmp_path: Path, hub: HubServer, capsys: pytest.CaptureFixture[str]) -> None:
    art = make_artifact(tmp_path)
    weights = (art / "model.safetensors").read_bytes()
    code = run_cli(["publish", str(art), "test-org/smol-int8", "--private"])
    captured = capsys.readouterr()
    assert code == 0, captured.err

    repo = hub.state.repos["test-org/smol-int8"]
    assert repo.private
    commits = hub.commits("test-org/smol-int8")
    assert len(commits) == 2  # the repo's initial commit, then ours: one commit for everything
    ours = commits[-1]
    assert set(ours.added) == {"model.safetensors", "config.json", "tokenizer.json", "llmopt.json", "README.md"}
    assert ours.lfs == ["model.safetensors"]  # went through the LFS batch API, PUT and verify
    assert ours.files["model.safetensors"] == weights
    # The uploaded manifest is the local one with the publisher's folders cut to their last component.
    local = json.loads((art / "llmopt.json").read_text())
    uploaded = json.loads(ours.files["llmopt.json"])
    assert str(tmp_path) not in ours.files["llmopt.json"].decode()
    assert uploaded["source"]["resolved_path"] == "<local>/source-model"
    assert uploaded["evaluation"]["settings"]["dataset"] == "<local>/eval.txt"
    assert uploaded["files"] == local["files"] and uploaded["gate"] == local["gate"]
    assert uploaded["evaluation"]["artifact"] == local["evaluation"]["artifact"]
    assert uploaded["source"]["weights_sha256"] == local["source"]["weights_sha256"]
    assert "gate passed" in ours.summary and "+1.80% vs FP16" in ours.summary

    card = ours.files["README.md"].decode()
    meta = yaml.safe_load(card.split("---")[1])
    assert meta["base_model"] == "HuggingFaceTB/SmolLM2-135M-Instruct"
    assert meta["base_model_relation"] == "quantized"
    assert meta["license"] == "apache-2.0"  # read from the source model's README
    assert meta["library_name"] == "transformers"
    assert meta["pipeline_tag"] == "text-generation"
    assert {"llmopt", "bitsandbytes", "bnb-int8", "8-bit"} <= set(meta["tags"])
    ev = Artifact.open(art).manifest.evaluation or {}
    assert "| FP16 baseline" in card and f"+1.80% ± {ev['delta_pct_stderr']:.2f}" in card and "cpu (x86)" in card
    assert 'from_pretrained("test-org/smol-int8"' in card
    assert str(tmp_path) not in card  # no local folders in a public card
    assert files_digest(hash_tree(art)) in card

    # the token went only into the Authorization header, never into a body or our output
    token = os.environ["HF_TOKEN"]
    assert all(token.encode() not in r.body for r in hub.requests)
    api_calls = [r for r in hub.requests if r.path.startswith("/api/")]
    assert api_calls and all(r.headers.get("authorization") == f"Bearer {token}" for r in api_calls)
    assert token not in captured.out + captured.err
    assert not (art / "README.md").exists()


def test_publish_to_branch(tmp_path: Path, hub: HubServer) -> None:
    art = make_artifact(tmp_path)
    assert run_cli(["publish", str(art), "test-org/smol", "--revision", "int8"]) == 0
    assert any(r.path == "/api/models/test-org/smol/branch/int8" for r in hub.requests)
    assert len(hub.commits("test-org/smol", "main")) == 1  # main untouched
    branch = hub.commits("test-org/smol", "int8")[-1]
    assert "README.md" in branch.files
    assert 'revision="int8"' in branch.files["README.md"].decode()


def test_publish_again_to_existing_repo(tmp_path: Path, hub: HubServer) -> None:
    art = make_artifact(tmp_path)
    assert run_cli(["publish", str(art), "test-org/smol-int8"]) == 0
    assert run_cli(["publish", str(art), "test-org/smol-int8"]) == 0  # create_repo(exist_ok=True) on a 409
    assert len(hub.commits("test-org/smol-int8")) == 3


def test_tampered_artifact_refused(tmp_path: Path, hub: HubServer, capsys: pytest.CaptureFixture[str]) -> None:
    art = make_artifact(tmp_path)
    (art / "config.json").write_text('{"architectures": ["Tampered"]}')
    code = run_cli(["publish", str(art), "test-org/smol-int8"])
    err = capsys.readouterr().err
    assert code == 5
    assert "not the ones its evaluation saw" in err and "config.json" in err
    assert hub.requests == []


def test_tampered_manifest_file_table_refused(tmp_path: Path, hub: HubServer) -> None:
    """Rewriting the manifest's hashes to match changed files does not help: the evaluation's digest differs."""
    art = make_artifact(tmp_path)
    (art / "tokenizer.json").write_text('{"version": "2.0"}')
    a = Artifact.open(art)
    a.manifest.files = hash_tree(art)
    a.save()
    assert run_cli(["publish", str(art), "test-org/smol-int8", "--dry-run"]) == 5


def test_extra_file_refused(tmp_path: Path, hub: HubServer) -> None:
    art = make_artifact(tmp_path)
    (art / "notes.txt").write_text("added after evaluation")
    assert run_cli(["publish", str(art), "test-org/smol-int8"]) == 5
    assert hub.requests == []


@pytest.mark.parametrize(
    ("kind", "needle"),
    [
        ("failed", "did not pass its gate"),
        ("unevaluated", "has not been evaluated"),
        ("no-thresholds", "no gate thresholds"),
    ],
)
def test_no_passing_gate_refused(
    tmp_path: Path, hub: HubServer, capsys: pytest.CaptureFixture[str], kind: str, needle: str
) -> None:
    art = make_artifact(
        tmp_path, passed=kind != "failed", evaluated=kind != "unevaluated", thresholds=kind != "no-thresholds"
    )
    code = run_cli(["publish", str(art), "test-org/smol-int8"])
    assert code == 3
    assert needle in capsys.readouterr().err
    assert hub.requests == []


def test_not_an_artifact(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """A wrong path is bad input (README: exit 2), not an unfinished artifact (5)."""
    assert run_cli(["publish", str(tmp_path / "nope"), "test-org/x", "--dry-run"]) == 2
    assert "not an artifact folder" in capsys.readouterr().err


def test_invalid_repo_id(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    art = make_artifact(tmp_path)
    assert run_cli(["publish", str(art), "test-org/bad--name", "--dry-run"]) == 2
    assert "not a valid Hub repo id" in capsys.readouterr().err


def test_no_token(
    tmp_path: Path, hub: HubServer, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.delenv("HF_TOKEN")
    art = make_artifact(tmp_path)
    assert run_cli(["publish", str(art), "test-org/smol-int8"]) == 2
    assert "no Hugging Face token found" in capsys.readouterr().err
    assert hub.requests == []


def test_wrong_token(
    tmp_path: Path, hub: HubServer, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    wrong = "hf_wrong_" + secrets.token_hex(8)
    monkeypatch.setenv("HF_TOKEN", wrong)
    art = make_artifact(tmp_path)
    assert run_cli(["publish", str(art), "test-org/smol-int8"]) == 2
    captured = capsys.readouterr()
    assert "did not accept the token" in captured.err
    assert wrong not in captured.out + captured.err
    assert hub.state.repos == {}


def test_commit_failure_is_reported(tmp_path: Path, hub: HubServer, capsys: pytest.CaptureFixture[str]) -> None:
    hub.state.fail_commit_with = 500
    art = make_artifact(tmp_path)
    assert run_cli(["publish", str(art), "test-org/smol-int8"]) == 4
    assert "answered 500" in capsys.readouterr().err
    assert len(hub.commits("test-org/smol-int8")) == 1  # nothing committed


def test_hub_unreachable(
    tmp_path: Path, hub: HubServer, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.setenv("HF_ENDPOINT", "http://127.0.0.1:9")  # discard port: connection refused
    art = make_artifact(tmp_path)
    assert run_cli(["publish", str(art), "test-org/smol-int8"]) == 4
    assert "could not reach the Hub" in capsys.readouterr().err


def test_gptq_card(tmp_path: Path) -> None:
    from llmopt.model_card import render_card

    art = make_artifact(tmp_path, fmt="gptq", backend="gptq", options={"bits": 4, "group_size": 64})
    card = render_card(Artifact.open(art), "org/smol-gptq")
    meta = yaml.safe_load(card.split("---")[1])
    assert {"gptq", "4-bit"} <= set(meta["tags"])
    assert "vllm serve org/smol-gptq" in card and "gptqmodel" in card


def test_ensure_ready_resolves_org_from_token(hub: HubServer) -> None:
    from llmopt.hub import ensure_ready

    assert ensure_ready("my-org") == "my-org"
    assert ensure_ready(None) == "test-user"  # whoami of the token
    assert [r.path for r in hub.requests] == ["/api/whoami-v2"]


def test_repo_targets_from_recipes() -> None:
    from llmopt.pipeline import repo_target
    from llmopt.recipe import load_recipe

    root = Path(__file__).resolve().parents[1] / "recipes"
    mistral = load_recipe(root / "mistral-7b-gpu.yaml")
    assert repo_target(mistral, mistral.variants[0], "org") == ("org/Mistral-7B-v0.3-llmopt", "gptq-4bit-g128")
    smol = load_recipe(root / "smollm2-135m-cpu.yaml")
    assert repo_target(smol, smol.variants[1], "org") == ("org/SmolLM2-135M-Instruct-bnb-nf4", None)


def test_offline_mode_is_explained(
    tmp_path: Path, hub: HubServer, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    import huggingface_hub.constants as hf_constants

    monkeypatch.setattr(hf_constants, "HF_HUB_OFFLINE", True)
    art = make_artifact(tmp_path)
    assert run_cli(["publish", str(art), "test-org/smol-int8"]) == 2
    assert "offline mode (HF_HUB_OFFLINE is set)" in capsys.readouterr().err
    assert hub.requests == []


def test_card_claims_only_what_was_measured(tmp_path: Path) -> None:
    """No link to an unclaimed registry name; the baseline row names the local folder that was scored (by its
    weights' hash), not the Hub model; a dtype is shown only where the evaluation recorded one, per side."""
    from llmopt.model_card import render_card

    art = make_artifact(tmp_path)
    card = render_card(Artifact.open(art), "org/smol-int8")
    assert "pypi.org" not in card
    assert "FP16 baseline (HuggingFaceTB/SmolLM2-135M-Instruct)" not in card
    row = next(line for line in card.splitlines() if line.startswith("| FP16 baseline"))
    assert "local `source-model`" in row and "abababababababab" in row  # the source's weights sha256
    assert "not recorded" in row  # the evaluation recorded no baseline dtype: none is printed
    mine = next(line for line in card.splitlines() if line.startswith("| **this model**"))
    assert "`float32`" in mine  # what this evaluation recorded for the artifact

    a = Artifact.open(art)
    assert a.manifest.evaluation is not None
    a.manifest.evaluation.baseline.dtype = "float16"
    row = next(line for line in render_card(a, "org/x").splitlines() if line.startswith("| FP16 baseline"))
    assert "`float16`" in row


def test_standalone_publish_uses_the_recipe_license(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """`publish.license` in the recipe reaches the card without --license (docs/publish.md promises it), and
    beats the source's own README license; --license still wins."""
    art = make_artifact(tmp_path, recipe_publish={"license": "mit", "tags": ["britannica"]})
    assert run_cli(["publish", str(art), "test-org/smol-int8", "--dry-run", "--json"]) == 0
    result = json.loads(capsys.readouterr().out)
    meta = yaml.safe_load(result["card"].split("---")[1])
    assert meta["license"] == "mit" and "britannica" in meta["tags"]
    assert run_cli(["publish", str(art), "test-org/smol-int8", "--dry-run", "--json", "--license", "gpl-3.0"]) == 0
    assert "license: gpl-3.0" in json.loads(capsys.readouterr().out)["card"]


def test_awq_card_lets_vllm_choose_the_kernel(tmp_path: Path) -> None:
    """`--quantization awq` would force vLLM's plain AWQ kernel (float16 only) instead of AWQ-Marlin."""
    from llmopt.model_card import render_card

    art = make_artifact(tmp_path, fmt="awq", backend="awq", options={"bits": 4, "group_size": 64})
    card = render_card(Artifact.open(art), "org/smol-awq")
    assert "vllm serve org/smol-awq" in card
    assert "--quantization awq" not in card
