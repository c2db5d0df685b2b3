"""Integrity: nothing is published past a gate it did not pass, and a manifest's numbers must add up.

Most cases start from the session's real artifact (SmolLM2-135M bnb-int8, evaluated against its FP16: the
``evaluated_artifact`` fixture), copied, then edited the way a careless or hostile user would, and driven
through the real CLI from another working folder with relative paths.
"""

from __future__ import annotations

import json
import os
import secrets
import shutil
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.helpers import run_cli
from tests.hubserver import HubServer

pytest.importorskip("huggingface_hub")


def _copy(evaluated: dict[str, Any], work: Path, name: str = "art") -> Path:
    work.mkdir(parents=True, exist_ok=True)
    dest = work / name
    shutil.copytree(evaluated["path"], dest)
    return dest


def _edit(art: Path, change: Callable[[dict[str, Any]], None]) -> None:
    path = art / "llmopt.json"
    data = json.loads(path.read_text())
    change(data)
    path.write_text(json.dumps(data, indent=2))


def _regate(art: Path, **thresholds: float) -> dict[str, Any]:
    """Apply other thresholds to the stored (genuine) evaluation, as `llmopt run` does on reuse."""
    from llmopt.artifact import Artifact
    from llmopt.evaluate.gate import GateSpec
    from llmopt.pipeline import regate

    a = Artifact.open(art)
    assert a.manifest.evaluation is not None
    return regate(a, a.manifest.evaluation, GateSpec(**thresholds))


@pytest.fixture
def hub_env() -> Iterator[tuple[HubServer, dict[str, str]]]:
    """The Hub stand-in, and the environment a `llmopt` child process needs to publish to it."""
    token = "hf_test_" + secrets.token_hex(12)
    with HubServer(token) as server:
        env = {"HF_TOKEN": token, "HF_ENDPOINT": server.url, "HF_HUB_OFFLINE": "0", "TRANSFORMERS_OFFLINE": "0"}
        env["HF_HUB_DISABLE_XET"] = "1"  # the stand-in has no Xet storage
        yield server, env


def test_flipped_gate_flag_is_refused(evaluated_artifact: dict[str, Any], tmp_path: Path) -> None:
    """After a real gate failure, setting only `gate.passed = true` in llmopt.json used to publish (dry run exit
    0, a card saying it passed next to a failed check). The gate is recomputed from the stored numbers: exit 5."""
    art = _copy(evaluated_artifact, tmp_path)
    delta = evaluated_artifact["report"]["delta_pct"]
    assert delta > 0.2, "needs an artifact measurably worse than FP16"
    report = _regate(art, max_ppl_increase_pct=round(delta / 2, 2))
    assert report["gate"]["passed"] is False
    r = run_cli(["publish", "art", "org/smol-int8", "--dry-run"], cwd=tmp_path)
    assert r.returncode == 3, r.stderr  # the honest failure

    _edit(art, lambda m: m["gate"].update(passed=True))
    r = run_cli(["publish", "art", "org/smol-int8", "--dry-run"], cwd=tmp_path)
    assert r.returncode == 5, r.stdout + r.stderr
    assert "does not add up" in r.stderr and "gate.passed" in r.stderr and "Traceback" not in r.stderr
    assert "README.md" not in r.stdout  # no card rendered


def test_edited_delta_is_refused_even_with_a_consistent_gate(
    evaluated_artifact: dict[str, Any], tmp_path: Path
) -> None:
    """`evaluation.delta_pct` lowered by hand (and the gate re-applied to the edited number, so flag and check
    agree) is caught: the delta does not follow from the stored window NLLs. The message names the number."""
    from llmopt.artifact import Artifact
    from llmopt.evaluate.gate import GateSpec, apply_gate

    art = _copy(evaluated_artifact, tmp_path)
    real = evaluated_artifact["report"]["delta_pct"]
    a = Artifact.open(art)
    assert a.manifest.evaluation is not None
    a.manifest.evaluation.delta_pct = real / 4
    spec = GateSpec(max_ppl_increase_pct=round(real / 2, 2))
    a.manifest.gate = {**apply_gate(spec, a.manifest.evaluation).model_dump(mode="json"), "spec": spec.model_dump()}
    assert a.manifest.gate["passed"] is True
    a.save()
    r = run_cli(["publish", "art", "org/smol-int8", "--dry-run"], cwd=tmp_path)
    assert r.returncode == 5, r.stdout + r.stderr
    assert "delta_pct is" in r.stderr and f"{real:+.4f}%" in r.stderr


@pytest.mark.parametrize(
    ("where", "change", "needle"),
    [
        ("artifact perplexity", lambda m: m["evaluation"]["artifact"].update(perplexity=1.0), "artifact.perplexity"),
        ("baseline stderr", lambda m: m["evaluation"]["baseline"].update(stderr=0.01), "baseline.stderr"),
        ("a window score", lambda m: m["evaluation"]["artifact"]["window_nll"].__setitem__(0, 0.5), "artifact."),
        ("window scores dropped", lambda m: m["evaluation"]["artifact"].pop("window_nll"), "window_nll"),
        ("tokens scored", lambda m: m["evaluation"]["settings"].update(tokens_scored=10**6), "tokens_scored"),
        ("gate threshold", lambda m: m["gate"]["checks"][0].update(threshold=50.0), "gate check"),
        ("thresholds gone", lambda m: m["gate"].pop("spec"), "gate.spec"),
    ],
)
def test_edited_numbers_are_named(
    evaluated_artifact: dict[str, Any],
    tmp_path: Path,
    where: str,
    change: Callable[[dict[str, Any]], None],
    needle: str,
) -> None:
    """Each hand edit of a summary number (or removal of the raw numbers) is exit 5 naming what does not follow."""
    art = _copy(evaluated_artifact, tmp_path)
    _edit(art, change)
    r = run_cli(["publish", "art", "org/smol-int8", "--dry-run"], cwd=tmp_path)
    assert r.returncode == 5, (where, r.stdout + r.stderr)
    assert needle in r.stderr, (where, r.stderr)


def test_run_does_not_regate_an_edited_evaluation(
    evaluated_artifact: dict[str, Any], tmp_path: Path, hub_env: tuple[HubServer, dict[str, str]]
) -> None:
    """The issue's case: delta_pct edited from its real value down, then `llmopt run ... --set
    gates.max_ppl_increase_pct=LOW --publish` reused the evaluation, re-gated it as passed and committed it.
    Now run scores the artifact again, the real delta fails the gate, and nothing reaches the Hub."""
    hub, env = hub_env
    real = evaluated_artifact["report"]["delta_pct"]
    work = tmp_path / "work"
    art = _copy(evaluated_artifact, work / "out" / "artifacts", "int8")
    (work / "out" / ".llmopt-run").write_text("")  # the folder of an earlier run, as `llmopt run` leaves it
    # the recipe the fixture's evaluation corresponds to, so that `run` reuses the artifact
    (work / "r.yaml").write_text(
        f"""\
model:
  source: {evaluated_artifact["model"]}
evaluation:
  dataset: {evaluated_artifact["text"]}
  context_length: {evaluated_artifact["report"]["settings"]["context_length"]}
  max_tokens: {evaluated_artifact["report"]["settings"]["max_tokens"]}
  device: cpu
variants:
  - name: int8
    method: bnb-int8
publish:
  organization: test-org
"""
    )
    _edit(art, lambda m: m["evaluation"].update(delta_pct=real / 4))
    limit = round(real / 2, 2)
    r = run_cli(
        ["run", "r.yaml", "-o", "out", "--set", f"gates.max_ppl_increase_pct={limit}", "--publish", "--json"],
        cwd=work,
        env=env,
    )
    assert r.returncode == 3, r.stdout[-2000:] + r.stderr[-2000:]
    variant = json.loads(r.stdout)["variants"][0]
    assert variant["quantize"]["reused"] is True
    assert variant["evaluation_reused"] is False
    assert variant["status"] == "gate_failed"
    assert abs(variant["delta_pct"] - real) < 0.05 * abs(real) + 0.01
    assert not any(req.path.startswith("/api/models/") and "/commit/" in req.path for req in hub.requests)
    assert hub.state.repos == {}


@pytest.mark.parametrize(
    ("flag", "value"),
    [("--max-ppl-increase", "-5"), ("--max-ppl-increase", "nan"), ("--max-ppl", "0"), ("--min-decode-speedup", "-1")],
)
def test_meaningless_threshold_is_bad_input(tmp_path: Path, flag: str, value: str) -> None:
    """`--max-ppl-increase -5` was accepted and printed as "limit +-5%"; a threshold nothing means is exit 2,
    before any model is loaded."""
    r = run_cli(["eval", "art", "--baseline", "base", "--dataset", "eval.txt", flag, value], cwd=tmp_path)
    assert r.returncode == 2, r.stderr
    assert "not a usable threshold" in r.stderr and "Traceback" not in r.stderr


def test_meaningless_threshold_in_a_recipe(tmp_path: Path) -> None:
    (tmp_path / "r.yaml").write_text(
        "model: {source: m}\nevaluation: {dataset: e.txt}\ngates:\n  max_ppl_increase_pct: -5\n"
        "variants: [{name: a, method: bnb-int8}]\n"
    )
    r = run_cli(["recipe", "validate", "r.yaml"], cwd=tmp_path)
    assert r.returncode == 2 and "r.yaml:4" in r.stderr, r.stderr
    (tmp_path / "r.yaml").write_text(
        "model: {source: m}\nevaluation: {dataset: e.txt}\nvariants: [{name: a, method: bnb-int8}]\n"
    )
    assert run_cli(["plan", "r.yaml"], cwd=tmp_path).returncode == 0
    r = run_cli(["plan", "r.yaml", "--set", "gates.max_ppl_increase_pct=-1"], cwd=tmp_path)
    assert r.returncode == 2 and "max_ppl_increase_pct" in r.stderr, r.stderr


@pytest.mark.parametrize(
    "template", ["{org}/../{model_name}-{variant}", "{org}/{model_name}--{variant}", "a/b/{variant}"]
)
def test_publish_template_validated_at_load(tmp_path: Path, template: str) -> None:
    """A `publish.repo_id` template with `..` passed `recipe validate` and failed only after quantize and eval.
    Filled with sample values it must be a valid repo id: a file:line error at load."""
    (tmp_path / "r.yaml").write_text(
        "model: {source: m}\nevaluation: {dataset: e.txt}\nvariants: [{name: a, method: bnb-int8}]\n"
        f'publish:\n  repo_id: "{template}"\n'
    )
    r = run_cli(["recipe", "validate", "r.yaml"], cwd=tmp_path)
    assert r.returncode == 2, r.stdout + r.stderr
    assert "r.yaml:5" in r.stderr and "valid Hub repo id" in r.stderr


def test_real_artifact_published_byte_for_byte(
    evaluated_artifact: dict[str, Any], tmp_path: Path, hub_env: tuple[HubServer, dict[str, str]]
) -> None:
    """The real artifact goes up in one commit: every uploaded file is byte-identical to the artifact's, and the
    card's numbers are the evaluation report's."""
    hub, env = hub_env
    art = _copy(evaluated_artifact, tmp_path)
    report = evaluated_artifact["report"]
    r = run_cli(["publish", "art", "test-org/smol-int8", "--json"], cwd=tmp_path, env=env)
    assert r.returncode == 0, r.stderr
    commit = hub.commits("test-org/smol-int8")[-1]
    on_disk = {p.relative_to(art).as_posix(): p.read_bytes() for p in art.rglob("*") if p.is_file()}
    uploaded = {k: v for k, v in commit.files.items() if k not in ("README.md", ".gitattributes")}
    manifest = uploaded.pop("llmopt.json").decode()
    assert uploaded == {k: v for k, v in on_disk.items() if k != "llmopt.json"}
    # The manifest goes up as stored except for local paths (cut to <local>/NAME): no home folder on the Hub.
    assert str(tmp_path) not in manifest and os.environ["HOME"] not in manifest
    local = json.loads(on_disk["llmopt.json"])
    public = json.loads(manifest)
    with_paths = ("source", "recipe", "evaluation", "calibration")
    assert {k: v for k, v in public.items() if k not in with_paths} == {
        k: v for k, v in local.items() if k not in with_paths
    }
    assert public["evaluation"]["artifact"]["window_nll"] == local["evaluation"]["artifact"]["window_nll"]
    card = commit.files["README.md"].decode()
    assert f"{report['artifact']['perplexity']:.4f}" in card and f"{report['baseline']['perplexity']:.4f}" in card
    assert f"{report['delta_pct']:+.2f}% ± {report['delta_pct_stderr']:.2f}" in card
    assert f"{report['settings']['tokens_scored']:,} tokens scored" in card
    assert str(tmp_path) not in card and os.environ["HOME"] not in card


def test_plan_and_report_merge_over_real_results(evaluated_artifact: dict[str, Any], tmp_path: Path) -> None:
    """`llmopt plan` jobs, run as a scheduler would (each reusing the real artifact and its real evaluation), then
    `llmopt report merge`: the merged numbers are the real evaluation's, and the strict variant's gate is
    applied to them."""
    import shlex

    report = evaluated_artifact["report"]
    s = report["settings"]
    (tmp_path / "r.yaml").write_text(
        f"""\
name: real
model:
  source: {evaluated_artifact["model"]}
evaluation:
  dataset: {evaluated_artifact["text"]}
  context_length: {s["context_length"]}
  max_tokens: {s["max_tokens"]}
  device: cpu
gates:
  max_ppl_increase_pct: 10
variants:
  - name: int8
    method: bnb-int8
  - name: int8-strict
    method: bnb-int8
    gate: {{max_ppl_increase_pct: {round(report["delta_pct"] / 2, 2)}}}
"""
    )
    r = run_cli(["plan", "r.yaml", "--output-root", "runs"], cwd=tmp_path)
    assert r.returncode == 0, r.stderr
    jobs = json.loads(r.stdout)
    assert [j["variant"] for j in jobs] == ["int8", "int8-strict"]
    for job in jobs:
        _copy(evaluated_artifact, tmp_path / job["output"] / "artifacts", job["variant"])
        (tmp_path / job["output"] / ".llmopt-run").write_text("")  # an earlier run's folder
        args = shlex.split(job["command"])
        assert args[0] == "llmopt"
        done = run_cli(args[1:], cwd=tmp_path)
        assert done.returncode == (0 if job["variant"] == "int8" else 3), done.stderr[-2000:]
    r = run_cli(
        ["report", "merge", "runs/int8", "runs/int8-strict/report.json", "-o", "merged", "--json"], cwd=tmp_path
    )
    assert r.returncode == 0, r.stderr
    merged = json.loads(r.stdout)
    assert [v["name"] for v in merged["variants"]] == ["int8", "int8-strict"]
    assert [v["status"] for v in merged["variants"]] == ["passed", "gate_failed"]
    assert merged["exit_code"] == 3
    for v in merged["variants"]:
        assert v["evaluation_reused"] is True  # the real evaluation, which adds up, was reused, not re-scored
        assert v["perplexity"] == report["artifact"]["perplexity"] and v["delta_pct"] == report["delta_pct"]
    assert merged["baseline"]["perplexity"] == report["baseline"]["perplexity"]
    assert (tmp_path / "merged" / "report.md").is_file()


def test_edited_decode_speedup_is_caught() -> None:
    """The speed gate reads `throughput.decode_speedup`; it must be the ratio of the stored medians."""
    from llmopt.evaluate.gate import GateSpec, apply_gate, evaluation_problems
    from llmopt.evaluate.throughput import ThroughputSettings, compare
    from tests.evaldata import scored

    def side(tps: dict[str, float]) -> dict[str, Any]:
        return {"decode": {b: {"tokens_per_s": {"median": v}} for b, v in tps.items()}, "prefill": {}}

    base, art = side({"1": 50.0, "8": 300.0}), side({"1": 80.0, "8": 330.0})
    ev = {**scored(1.0), "throughput": {"baseline": base, "artifact": art, **compare(base, art, ThroughputSettings())}}
    spec = GateSpec(min_decode_speedup=1.5, at_batch=1)
    gate = {**apply_gate(spec, ev).model_dump(mode="json"), "spec": spec.model_dump()}
    assert gate["passed"] and evaluation_problems(ev, gate) == []
    ev["throughput"]["decode_speedup"]["8"] = 2.0
    assert any("decode_speedup[8]" in p for p in evaluation_problems(ev, gate))


def test_connection_dropped_mid_upload(
    evaluated_artifact: dict[str, Any], tmp_path: Path, hub_env: tuple[HubServer, dict[str, str]]
) -> None:
    """A connection cut during the LFS upload gave exit 1 with huggingface_hub's `RuntimeError: Error while
    uploading 'model.safetensors'` traceback. Now: exit 4, one line naming the file; nothing committed; the
    artifact unchanged."""
    from llmopt.artifact import hash_tree

    hub, env = hub_env
    hub.state.drop_uploads = True
    art = _copy(evaluated_artifact, tmp_path)
    before, manifest = hash_tree(art), (art / "llmopt.json").read_bytes()
    r = run_cli(["publish", "art", "test-org/smol-int8"], cwd=tmp_path, env=env)
    assert r.returncode == 4, r.stderr[-3000:]
    flat = " ".join(r.stderr.split())  # the console wraps long lines
    assert "broke off" in flat and "model.safetensors" in flat, r.stderr[-3000:]
    assert "Traceback" not in r.stderr, r.stderr[-3000:]
    assert any(q.method == "PUT" and q.path.startswith("/lfs-upload/") for q in hub.requests)
    assert len(hub.commits("test-org/smol-int8")) == 1  # only the repo's initial commit
    assert hash_tree(art) == before and (art / "llmopt.json").read_bytes() == manifest
