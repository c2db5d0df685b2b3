"""``llmopt publish RUN --layout gguf-one-repo`` and ``publish.mode: gguf-one-repo``: a run's GGUF variants in
one Hub repo, one file per quant type, one card table; the real huggingface_hub client against the stand-in
Hub (tests/hubserver.py). The GGUF artifacts are synthetic (real ones take minutes to make): a file that starts
with the GGUF magic, and an evaluation and gate built from per-window scores, as api.evaluate builds them."""

from __future__ import annotations

import json
import os
import re
import secrets
from pathlib import Path
from typing import Any

import pytest
import yaml

from llmopt.artifact import Artifact, EnvironmentInfo, Manifest, SourceInfo, files_digest, hash_tree
from llmopt.evaluate.gate import GateSpec, apply_gate
from tests.evaldata import distribution, scored
from tests.hubserver import HubServer
from tests.test_publish import hub, make_artifact, run_cli

pytest.importorskip("huggingface_hub")

__all__ = ["hub"]  # the stand-in Hub fixture, shared with test_publish.py

BASE = "HuggingFaceTB/SmolLM2-135M-Instruct"
REPO = "test-org/SmolLM2-135M-Instruct-GGUF"


def make_gguf(
    run: Path,
    quant: str,
    *,
    variant: str | None = None,
    delta: float = 1.8,
    kld: float = 0.01,
    max_delta: float = 5.0,
    evaluated: bool = True,
    base_model: str | None = BASE,
) -> Path:
    """A GGUF artifact as `llmopt run` leaves it in RUN/artifacts/VARIANT (quantized, evaluated, gated)."""
    name = variant or quant.replace("_", "-")
    art = run / "artifacts" / name
    art.mkdir(parents=True)
    gguf = f"source-model-{quant.upper()}.gguf"
    # sized like the real files: about 1 KB per bit of the type
    (art / gguf).write_bytes(b"GGUF" + secrets.token_bytes(1000 * int(re.sub(r"\D", "", quant)[:1] or 4)))
    (art / "tokenizer.json").write_text('{"version": "1.0"}')
    source = run.parent / "source-model"
    if not source.exists():
        source.mkdir()
        (source / "README.md").write_text("---\nlicense: apache-2.0\n---\n# base\n")
    files = hash_tree(art)
    manifest = Manifest(
        llmopt_version="0.1.0",
        backend="gguf",
        format="gguf",
        runner="llamacpp",
        options={
            "quant_type": quant,
            "imatrix": "none",
            "pure": False,
            "_resolved": {"gguf_file": gguf, "threads": 2, "imatrix": {"file": str(run / "imatrix.dat")}},
        },
        source=SourceInfo(
            model=str(source), resolved_path=str(source), weights_sha256={"model.safetensors": "ab" * 32}
        ),
        calibration=None,
        environment=EnvironmentInfo(python="3.11", platform="linux", packages={"llama_cpp": "0.3"}, device="cpu"),
        quantize_seconds=2.0,
        files=files,
        recipe={
            "variant": name,
            "file": str(run.parent / "r.yaml"),
            "resolved": {
                "model": {"source": str(source)},
                "evaluation": {"dataset": str(run.parent / "eval.txt")},
                "publish": {"mode": "gguf-one-repo", **({"base_model": base_model} if base_model else {})},
            },
        },
    )
    if evaluated:
        numbers = scored(delta)
        spec = GateSpec(max_ppl_increase_pct=max_delta, max_kld=0.5)
        manifest.evaluation = {
            "schema": "llmopt.eval/1",
            "settings": {
                "dataset": str(run.parent / "eval.txt"),
                "text_sha256": "cd" * 32,
                **numbers["settings"],
                "device": "cpu (x86)",
            },
            "baseline": {**numbers["baseline"], "size_bytes": 269_000_000, "model": str(source)},
            "artifact": {
                **numbers["artifact"],
                "size_bytes": files[gguf].size,
                "backend": "gguf",
                "format": "gguf",
                "distribution": distribution(kld, numbers["settings"]),
            },
            "delta_pct": numbers["delta_pct"],
            "delta_pct_stderr": numbers["delta_pct_stderr"],
            "environment": {"python": "3.11", "platform": "linux", "packages": {}, "device": "cpu"},
            "artifact_files_sha256": files_digest(files),
        }
        manifest.gate = {
            **apply_gate(spec, manifest.evaluation).model_dump(mode="json"),
            "spec": spec.model_dump(mode="json"),
        }
    Artifact(art, manifest).save()
    return art


@pytest.fixture
def run(tmp_path: Path) -> Path:
    """A run folder: Q8_0 and Q4_K_M passed, Q2_K failed its gate, and a bitsandbytes variant."""
    folder = tmp_path / "runs" / "smol"
    make_gguf(folder, "q8_0", delta=0.3, kld=0.002)
    make_gguf(folder, "q4_k_m", delta=2.5, kld=0.03)
    make_gguf(folder, "q2_k", delta=30.0, kld=0.4)
    make_artifact(folder / "artifacts" / "bnb")  # makes .../bnb/artifact
    (folder / "artifacts" / "bnb" / "artifact").rename(folder / "artifacts" / "bnb-int8")
    (folder / "artifacts" / "bnb").rename(tmp_path / "elsewhere")
    return folder


def _card(commit_files: dict[str, bytes]) -> tuple[dict[str, Any], str]:
    text = commit_files["README.md"].decode()
    return yaml.safe_load(text.split("---")[1]), text


def _row(card: str, path: str) -> str:
    return next(line for line in card.splitlines() if line.startswith(f"| [`{path}`]"))


def test_run_folder_in_one_commit(run: Path, hub: HubServer, capsys: pytest.CaptureFixture[str]) -> None:
    q4 = (run / "artifacts" / "q4-k-m" / "source-model-Q4_K_M.gguf").read_bytes()
    code = run_cli(["publish", str(run), REPO, "--layout", "gguf-one-repo"])
    captured = capsys.readouterr()
    assert code == 0, captured.err
    commits = hub.commits(REPO)
    assert len(commits) == 2  # the repo's initial commit, then ours
    ours = commits[-1]
    q4_name, q8_name = "SmolLM2-135M-Instruct-Q4_K_M.gguf", "SmolLM2-135M-Instruct-Q8_0.gguf"
    assert set(ours.added) == {
        q4_name,
        q8_name,
        "llmopt/SmolLM2-135M-Instruct-Q4_K_M.json",
        "llmopt/SmolLM2-135M-Instruct-Q8_0.json",
        "README.md",
    }
    assert ours.lfs == [q4_name, q8_name]
    assert ours.files[q4_name] == q4
    assert not any("Q2_K" in p or "tokenizer" in p or "bnb" in p for p in ours.files)
    assert "2 GGUF files (Q8_0, Q4_K_M), gate passed; 1 left out" in ours.summary

    record = json.loads(ours.files["llmopt/SmolLM2-135M-Instruct-Q4_K_M.json"])
    local = json.loads((run / "artifacts" / "q4-k-m" / "llmopt.json").read_text())
    assert str(run.parent) not in ours.files["llmopt/SmolLM2-135M-Instruct-Q4_K_M.json"].decode()
    assert record["options"]["_resolved"]["imatrix"]["file"] == "<local>/imatrix.dat"
    assert record["files"] == local["files"] and record["gate"] == local["gate"]

    meta, card = _card(ours.files)
    assert meta["base_model"] == BASE and meta["base_model_relation"] == "quantized"
    assert meta["library_name"] == "gguf" and meta["license"] == "apache-2.0"
    assert {"gguf", "llmopt", "q8_0", "q4_k_m"} <= set(meta["tags"]) and "q2_k" not in meta["tags"]
    ev = Artifact.open(run / "artifacts" / "q4-k-m").manifest.evaluation
    assert ev is not None and ev.artifact.distribution is not None
    row = _row(card, q4_name)
    assert "| Q4_K_M | ~4.6 bpw |" in row
    assert f"{ev.delta_pct:+.2f}% ± {ev.delta_pct_stderr:.2f}" in row
    assert f"{ev.artifact.distribution.kld_mean:.5f} ± {ev.artifact.distribution.kld_stderr:.5f}" in row
    assert row.endswith("| ✅ passed (Δ ≤ +5%, KLD ≤ 0.5) |")
    # rows by size (bigger, better types first); the failed type is listed as left out, not as a file
    assert card.index(q8_name) < card.index(q4_name)
    assert "- `q2-k` (Q2_K): gate failed: perplexity +30.00% vs FP16 (limit +5%)" in card
    assert f"llama-cli -hf {REPO}:Q4_K_M" in card and f"llama-server -hf {REPO}:Q4_K_M" in card
    assert "every row was scored on `eval.txt`" in card
    assert str(run.parent) not in card
    assert "int8: bnb-8bit, not GGUF" in captured.out
    assert "left out q2-k (Q2_K)" in captured.out

    token = os.environ["HF_TOKEN"]
    assert all(token.encode() not in r.body for r in hub.requests)
    assert token not in captured.out + captured.err


def test_dry_run_sends_nothing(run: Path, hub: HubServer, capsys: pytest.CaptureFixture[str]) -> None:
    before = {p: p.stat().st_mtime_ns for p in run.rglob("*")}
    code = run_cli(["publish", str(run), REPO, "--layout", "gguf-one-repo", "--dry-run", "--json"])
    assert code == 0
    result = json.loads(capsys.readouterr().out)
    assert hub.requests == []
    assert {f["path"] for f in result["files"]} == {
        "SmolLM2-135M-Instruct-Q8_0.gguf",
        "SmolLM2-135M-Instruct-Q4_K_M.gguf",
        "llmopt/SmolLM2-135M-Instruct-Q8_0.json",
        "llmopt/SmolLM2-135M-Instruct-Q4_K_M.json",
        "README.md",
    }
    assert result["total_bytes"] == sum(f["size"] for f in result["files"])
    assert [lo["variant"] for lo in result["left_out"]] == ["q2-k"]
    assert "repo was not read" in " ".join(result["notes"])
    assert "llama-cli -hf" in result["card"]
    assert {p: p.stat().st_mtime_ns for p in run.rglob("*")} == before


def test_dry_run_prints_the_plan_and_the_card(run: Path, hub: HubServer, capsys: pytest.CaptureFixture[str]) -> None:
    assert run_cli(["publish", str(run), REPO, "--layout", "gguf-one-repo", "--dry-run"]) == 0
    out = capsys.readouterr().out
    assert "would upload 5 files" in out and f"to {REPO} in one commit" in out
    assert "  SmolLM2-135M-Instruct-Q8_0.gguf  " in out and "left out q2-k (Q2_K)" in out
    card = out.split("----- README.md (model card) -----\n", 1)[1]
    assert card.startswith("---\nbase_model: HuggingFaceTB/SmolLM2-135M-Instruct\n")
    assert hub.requests == []


def test_publishing_again_adds_and_keeps(
    run: Path, tmp_path: Path, hub: HubServer, capsys: pytest.CaptureFixture[str]
) -> None:
    """A second run adds Q6_K and replaces Q4_K_M: Q8_0 stays, and the card lists all three with the numbers of
    each file's record (read back from the repo)."""
    assert run_cli(["publish", str(run), REPO, "--layout", "gguf-one-repo"]) == 0
    second = tmp_path / "runs" / "smol-2"
    make_gguf(second, "q6_k", delta=1.0, kld=0.008)
    make_gguf(second, "q4_k_m", delta=2.0, kld=0.02)
    capsys.readouterr()
    assert run_cli(["publish", str(second), REPO, "--layout", "gguf-one-repo"]) == 0
    out = capsys.readouterr().out
    commits = hub.commits(REPO)
    assert len(commits) == 3
    tree = commits[-1].files
    ggufs = sorted(p for p in tree if p.endswith(".gguf"))
    assert ggufs == [f"SmolLM2-135M-Instruct-{t}.gguf" for t in ("Q4_K_M", "Q6_K", "Q8_0")]
    assert (
        tree["SmolLM2-135M-Instruct-Q4_K_M.gguf"]
        == (second / "artifacts" / "q4-k-m" / "source-model-Q4_K_M.gguf").read_bytes()
    )
    assert "SmolLM2-135M-Instruct-Q8_0.gguf" not in commits[-1].added  # kept, not sent again
    _, card = _card(tree)
    q8 = Artifact.open(run / "artifacts" / "q8-0").manifest.evaluation
    assert q8 is not None
    assert f"{q8.delta_pct:+.2f}%" in _row(card, "SmolLM2-135M-Instruct-Q8_0.gguf")
    assert "+2.00%" in _row(card, "SmolLM2-135M-Instruct-Q4_K_M.gguf")  # the new file's numbers
    assert "q8-0 | [`llmopt/SmolLM2-135M-Instruct-Q8_0.json`]" in card  # provenance of the kept file
    assert "kept in the repo and listed on the card: SmolLM2-135M-Instruct-Q8_0.gguf" in out
    # what was read: the repo's files at the branch, then only the record of the file this commit keeps
    reads = [r.path for r in hub.requests if r.method == "GET" and "/resolve/" in r.path]
    assert len(reads) == 1 and reads[0].endswith("/llmopt/SmolLM2-135M-Instruct-Q8_0.json")


def test_files_in_the_repo_without_a_matching_record(
    run: Path, hub: HubServer, capsys: pytest.CaptureFixture[str]
) -> None:
    """A .gguf someone uploaded by hand is listed without numbers; a record whose file was replaced since is
    not believed for the new file."""
    assert run_cli(["publish", str(run), REPO, "--layout", "gguf-one-repo", "--only", "q4-k-m"]) == 0
    repo = hub.state.repos[REPO]
    hub.state.commit(repo, "main", "by hand", "", {"SmolLM2-135M-Instruct-Q5_K_M.gguf": b"GGUF" + b"5" * 500}, [])
    hub.state.commit(repo, "main", "swap", "", {"SmolLM2-135M-Instruct-Q4_K_M.gguf": b"GGUF" + b"x" * 700}, [])
    assert run_cli(["publish", str(run), REPO, "--layout", "gguf-one-repo", "--only", "q8-0"]) == 0
    _, card = _card(hub.commits(REPO)[-1].files)
    q5 = _row(card, "SmolLM2-135M-Instruct-Q5_K_M.gguf")
    assert "| Q5_K_M |" in q5 and "| – | – | – | – |" in q5
    assert "`SmolLM2-135M-Instruct-Q5_K_M.gguf`: no llmopt record in the repo" in card
    q4 = _row(card, "SmolLM2-135M-Instruct-Q4_K_M.gguf")
    assert "| – | – | – | – |" in q4
    assert "describes another file (the sha256 differs)" in card


def test_a_commit_in_between_is_read_again(run: Path, hub: HubServer) -> None:
    """Someone commits between our read and our commit: the Hub refuses the commit (its parent moved), the repo
    is read again and the card rebuilt, and nothing of theirs is lost."""
    assert run_cli(["publish", str(run), REPO, "--layout", "gguf-one-repo", "--only", "q4-k-m"]) == 0
    hub.state.foreign_commits = 1
    assert run_cli(["publish", str(run), REPO, "--layout", "gguf-one-repo", "--only", "q8-0"]) == 0
    commits = hub.commits(REPO)
    assert commits[-2].summary.startswith("someone else's commit")
    tree = commits[-1].files
    assert any(p.startswith("other-") for p in tree)
    assert {"SmolLM2-135M-Instruct-Q4_K_M.gguf", "SmolLM2-135M-Instruct-Q8_0.gguf"} <= set(tree)
    commit_posts = [r for r in hub.requests if r.path.startswith(f"/api/models/{REPO}/commit/")]
    assert len(commit_posts) == 3  # first publish, the refused one, the retry


def test_a_repo_that_keeps_moving_is_given_up(run: Path, hub: HubServer, capsys: pytest.CaptureFixture[str]) -> None:
    assert run_cli(["publish", str(run), REPO, "--layout", "gguf-one-repo", "--only", "q4-k-m"]) == 0
    hub.state.foreign_commits = 10
    assert run_cli(["publish", str(run), REPO, "--layout", "gguf-one-repo", "--only", "q8-0"]) == 4
    assert "kept changing while publishing (3 attempts)" in capsys.readouterr().err
    assert not any("Q8_0" in p for p in hub.commits(REPO)[-1].files)


def test_to_a_branch(run: Path, hub: HubServer) -> None:
    assert run_cli(["publish", str(run), REPO, "--layout", "gguf-one-repo", "--revision", "v2"]) == 0
    assert len(hub.commits(REPO, "main")) == 1
    _, card = _card(hub.commits(REPO, "v2")[-1].files)
    assert "--revision v2" in card and "llama-cli -hf" not in card
    assert f"https://huggingface.co/{REPO}/blob/v2/SmolLM2-135M-Instruct-Q8_0.gguf" in card


def test_one_gguf_artifact_folder(run: Path, hub: HubServer) -> None:
    assert run_cli(["publish", str(run / "artifacts" / "q8-0"), REPO, "--layout", "gguf-one-repo"]) == 0
    assert "SmolLM2-135M-Instruct-Q8_0.gguf" in hub.commits(REPO)[-1].added


def test_file_names_without_a_base_model(tmp_path: Path, hub: HubServer, capsys: pytest.CaptureFixture[str]) -> None:
    """No Hub id known: the files are named after the artifact's own file, and a note asks for --base-model."""
    run = tmp_path / "run"
    make_gguf(run, "q4_k_m", base_model=None)
    assert run_cli(["publish", str(run), "test-org/x", "--layout", "gguf-one-repo", "--dry-run", "--json"]) == 0
    result = json.loads(capsys.readouterr().out)
    assert result["files"][0]["path"] == "source-model-Q4_K_M.gguf"
    assert any("--base-model" in n for n in result["notes"])
    assert run_cli(["publish", str(run), "test-org/x", "--layout", "gguf-one-repo", "--dry-run", "--json",
                    "--base-model", "org/Other-1B"]) == 0  # fmt: skip
    assert json.loads(capsys.readouterr().out)["files"][0]["path"] == "Other-1B-Q4_K_M.gguf"


# --- refusals: nothing is sent ------------------------------------------------------------------------------


def test_none_passed_is_exit_3(tmp_path: Path, hub: HubServer, capsys: pytest.CaptureFixture[str]) -> None:
    run = tmp_path / "run"
    make_gguf(run, "q2_k", delta=30.0)
    make_gguf(run, "q4_k_m", evaluated=False)
    assert run_cli(["publish", str(run), REPO, "--layout", "gguf-one-repo"]) == 3
    err = capsys.readouterr().err
    assert "no GGUF artifact passed its gate" in err and "q2-k: gate failed" in err and "q4-k-m: not evaluated" in err
    assert hub.requests == []


def test_tampered_file_stops_everything(run: Path, hub: HubServer, capsys: pytest.CaptureFixture[str]) -> None:
    with open(run / "artifacts" / "q8-0" / "source-model-Q8_0.gguf", "ab") as f:
        f.write(b"appended after the evaluation")
    assert run_cli(["publish", str(run), REPO, "--layout", "gguf-one-repo"]) == 5
    assert "not the ones its evaluation saw" in capsys.readouterr().err
    assert hub.requests == []


def test_edited_numbers_stop_everything(run: Path, hub: HubServer, capsys: pytest.CaptureFixture[str]) -> None:
    path = run / "artifacts" / "q4-k-m" / "llmopt.json"
    data = json.loads(path.read_text())
    data["evaluation"]["artifact"]["distribution"]["kld_mean"] = 1e-6
    path.write_text(json.dumps(data))
    assert run_cli(["publish", str(run), REPO, "--layout", "gguf-one-repo", "--dry-run"]) == 5
    assert "does not add up" in capsys.readouterr().err
    assert hub.requests == []


def test_two_variants_of_one_quant_type(tmp_path: Path, hub: HubServer, capsys: pytest.CaptureFixture[str]) -> None:
    run = tmp_path / "run"
    make_gguf(run, "q4_k_m", variant="q4-plain")
    make_gguf(run, "q4_k_m", variant="q4-imatrix")
    assert run_cli(["publish", str(run), REPO, "--layout", "gguf-one-repo"]) == 2
    err = capsys.readouterr().err
    assert "'q4-imatrix' and 'q4-plain' are both Q4_K_M" in err and "--only" in err
    assert hub.requests == []


@pytest.mark.parametrize(
    ("args", "code", "needle"),
    [
        (["--only", "q5"], 2, "has no artifact 'q5'"),
        (["--layout", "folder", "--only", "q8-0"], 2, "--only picks variants for --layout gguf-one-repo"),
        (["--revision", "bad..name"], 2, "not a valid branch name"),
        (["--base-model", "/home/me/model"], 2, "is not a Hub id"),
    ],
)
def test_bad_input(
    run: Path, hub: HubServer, capsys: pytest.CaptureFixture[str], args: list[str], code: int, needle: str
) -> None:
    layout = [] if "--layout" in args else ["--layout", "gguf-one-repo"]
    assert run_cli(["publish", str(run), REPO, *layout, *args]) == code
    assert needle in capsys.readouterr().err
    assert hub.requests == []


def test_not_a_run_nor_gguf(run: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert run_cli(["publish", str(run / "artifacts" / "bnb-int8"), REPO, "--layout", "gguf-one-repo"]) == 2
    assert "is a bnb-8bit artifact" in capsys.readouterr().err
    assert run_cli(["publish", str(tmp_path), REPO, "--layout", "gguf-one-repo"]) == 5
    assert "neither an artifact folder" in capsys.readouterr().err
    assert run_cli(["publish", str(run / "artifacts" / "q8-0"), REPO, "--layout", "gguf-one-repo",
                    "--only", "q8-0"]) == 2  # fmt: skip
    assert "is one artifact" in capsys.readouterr().err


# --- llmopt run --publish with publish.mode: gguf-one-repo ---------------------------------------------------


def _run_context(run: Path, variants: list[str]) -> Any:
    from llmopt.pipeline import _Context
    from llmopt.progress import SilentReporter
    from llmopt.recipe import parse_recipe

    recipe = parse_recipe(
        {
            "model": {"source": str(run.parent / "source-model")},
            "evaluation": {"dataset": "eval.txt"},
            "variants": [
                {"name": v, "method": "gguf", "options": {"quant_type": v.replace("-", "_")}} for v in variants
            ],
            "publish": {"mode": "gguf-one-repo", "base_model": BASE},
        }
    )
    ctx = _Context(recipe, None, run, SilentReporter())
    ctx.org = "test-org"
    return ctx


def test_run_publishes_once_after_every_variant(run: Path, hub: HubServer) -> None:
    """The run's publish step: one commit with the passing variants, the failed one on the card, nothing of the
    variant that errored; each passing variant's report row says where its file went."""
    from llmopt.pipeline import _publish_gguf_repo
    from llmopt.results import VariantOutcome

    make_gguf(run, "q6_k", delta=1.0)  # in the folder from an earlier run, but not a variant of this one
    ctx = _run_context(run, ["q8-0", "q4-k-m", "q2-k", "q5-k-m"])
    outcomes = [
        VariantOutcome(name="q8-0", method="gguf", status="passed"),
        VariantOutcome(name="q4-k-m", method="gguf", status="passed"),
        VariantOutcome(name="q2-k", method="gguf", status="gate_failed"),
        VariantOutcome(name="q5-k-m", method="gguf", status="error"),
    ]
    _publish_gguf_repo(ctx, outcomes)
    ours = hub.commits(REPO)[-1]
    assert sorted(p for p in ours.added if p.endswith(".gguf")) == [
        "SmolLM2-135M-Instruct-Q4_K_M.gguf",
        "SmolLM2-135M-Instruct-Q8_0.gguf",
    ]
    assert "- `q2-k` (Q2_K): gate failed" in ours.files["README.md"].decode()
    q8 = outcomes[0].publish
    assert q8 is not None and q8["file"] == "SmolLM2-135M-Instruct-Q8_0.gguf" and q8["layout"] == "gguf-one-repo"
    assert q8["commit_oid"] == ours.oid and q8["repo_id"] == REPO
    assert outcomes[2].publish is None and outcomes[3].publish is None


def test_run_publish_failure_is_each_passing_variants_error(run: Path, hub: HubServer) -> None:
    from llmopt.pipeline import _publish_gguf_repo
    from llmopt.report import run_exit_code
    from llmopt.results import VariantOutcome

    hub.state.fail_commit_with = 500
    ctx = _run_context(run, ["q8-0", "q2-k"])
    outcomes = [
        VariantOutcome(name="q8-0", method="gguf", status="passed"),
        VariantOutcome(name="q2-k", method="gguf", status="gate_failed"),
    ]
    _publish_gguf_repo(ctx, outcomes)
    err = outcomes[0].error
    assert outcomes[0].status == "error" and err is not None
    assert err.stage == "publish" and err.exit_code == 4 and "answered 500" in err.message
    assert outcomes[1].status == "gate_failed" and outcomes[1].error is None
    assert run_exit_code(outcomes) == 4
    assert len(hub.commits(REPO)) == 1  # only the repo's initial commit


def test_run_with_nothing_passed_sends_nothing(run: Path, hub: HubServer) -> None:
    from llmopt.pipeline import _publish_gguf_repo
    from llmopt.results import VariantOutcome

    ctx = _run_context(run, ["q2-k"])
    outcomes = [VariantOutcome(name="q2-k", method="gguf", status="gate_failed")]
    _publish_gguf_repo(ctx, outcomes)
    assert hub.requests == [] and outcomes[0].publish is None and outcomes[0].error is None


# --- real GGUF files ------------------------------------------------------------------------------------------


@pytest.mark.e2e
def test_real_gguf_files_of_a_cut_smollm2(assets: dict[str, Path], tmp_path: Path, hub: HubServer) -> None:
    """Two real GGUF artifacts of SmolLM2 cut to 2 layers (llama.cpp's converter and quantizer), scored through
    llama.cpp against their FP16 on the same token ids and gated: the passing one reaches the repo byte for byte
    with its measured numbers on the card; the failing one is named as left out."""
    import importlib.util

    from llmopt.api import evaluate, quantize
    from llmopt.backends import gguf_toolchain
    from llmopt.gguf_repo import publish_gguf_repo
    from tests.helpers import first_layers

    if importlib.util.find_spec("llama_cpp") is None or gguf_toolchain.find_toolchain() is None:
        pytest.skip("llama.cpp is not set up here (python scripts/build_llamacpp.py)")
    model = first_layers(assets["model"], tmp_path / "smol-2l", 2)
    run = tmp_path / "run"
    reports = {}
    # a 2-layer cut scores a perplexity in the thousands, which 4-bit noise may lower: KL divergence is what
    # tells the types apart here, so the gates are on it (Q4_0's limit is one it cannot meet)
    for quant, limit in (("q8_0", 0.5), ("q4_0", 1e-6)):
        art = quantize(str(model), "gguf", run / "artifacts" / quant, options={"quant_type": quant})
        reports[quant] = evaluate(
            art.path,
            str(model),
            str(assets["eval_text"]),
            gate=GateSpec(max_kld=limit),
            context_length=128,
            max_tokens=512,
            device="cpu",
        )
    assert reports["q8_0"].gate is not None and reports["q8_0"].gate.passed
    assert reports["q4_0"].gate is not None and not reports["q4_0"].gate.passed
    result = publish_gguf_repo(run, "test-org/smol-2l-GGUF", base_model=BASE)
    tree = hub.commits("test-org/smol-2l-GGUF")[-1].files
    local = next((run / "artifacts" / "q8_0").glob("*-Q8_0.gguf"))
    assert tree["SmolLM2-135M-Instruct-Q8_0.gguf"] == local.read_bytes()
    assert not any("Q4_0" in p for p in tree)
    assert [lo.variant for lo in result.left_out] == ["q4_0"]
    card = tree["README.md"].decode()
    q8 = reports["q8_0"]
    assert q8.delta_pct is not None and q8.artifact.distribution is not None
    row = _row(card, "SmolLM2-135M-Instruct-Q8_0.gguf")
    assert f"{q8.delta_pct:+.2f}%" in row and f"{q8.artifact.distribution.kld_mean:.5f}" in row
    assert "- `q4_0` (Q4_0): gate failed" in card
