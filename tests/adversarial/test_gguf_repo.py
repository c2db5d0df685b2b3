"""The one-repo GGUF publish (``--layout gguf-one-repo``) against what careless users and a repo's other writers
do: relative paths from another folder, a half-written artifact next to finished ones, a manifest naming a file
it does not hold, and records in the repo that are not what they claim to be."""

from __future__ import annotations

import json
import secrets
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.helpers import run_cli
from tests.hubserver import HubServer
from tests.test_publish_gguf_repo import REPO, make_gguf

pytest.importorskip("huggingface_hub")


@pytest.fixture
def hub_env() -> Iterator[tuple[HubServer, dict[str, str]]]:
    token = "hf_test_" + secrets.token_hex(12)
    with HubServer(token) as server:
        env = {"HF_TOKEN": token, "HF_ENDPOINT": server.url, "HF_HUB_OFFLINE": "0", "TRANSFORMERS_OFFLINE": "0"}
        env["HF_HUB_DISABLE_XET"] = "1"  # the stand-in has no Xet storage
        yield server, env


def test_relative_run_folder_with_a_half_written_artifact(
    tmp_path: Path, hub_env: tuple[HubServer, dict[str, str]]
) -> None:
    """From another working folder, a relative run path; the run folder also holds a variant whose quantization
    was interrupted (no llmopt.json) and a hidden staging folder: both are passed over, the rest is published,
    and no local path reaches the repo."""
    hub, env = hub_env
    run = tmp_path / "work" / "runs" / "smol"
    make_gguf(run, "q8_0")
    (run / "artifacts" / "q4-k-m").mkdir()
    (run / "artifacts" / "q4-k-m" / "half.gguf").write_bytes(b"GGUF")
    (run / "artifacts" / ".staging-q5").mkdir()
    (tmp_path / "elsewhere").mkdir()
    r = run_cli(
        ["publish", "../work/runs/smol", REPO, "--layout", "gguf-one-repo", "--json"],
        cwd=tmp_path / "elsewhere",
        env=env,
    )
    assert r.returncode == 0, r.stderr[-2000:]
    result = json.loads(r.stdout)
    assert [row["path"] for row in result["table"]] == ["SmolLM2-135M-Instruct-Q8_0.gguf"]
    assert result["skipped"] == ["q4-k-m: unfinished artifact (no llmopt.json)"]
    tree = hub.commits(REPO)[-1].files
    assert not any("half" in p or "staging" in p for p in tree)
    assert all(str(tmp_path).encode() not in blob for blob in tree.values())
    assert env["HF_TOKEN"] not in r.stdout + r.stderr


def test_manifest_naming_a_file_it_does_not_hold(tmp_path: Path, hub_env: tuple[HubServer, dict[str, str]]) -> None:
    """``_resolved.gguf_file`` edited to name a file the artifact does not hold: the gate and hashes still hold, but the
    .gguf to upload is not known. Refused (exit 5) before any request, instead of uploading the wrong file."""
    hub, env = hub_env
    art = make_gguf(tmp_path / "run", "q8_0")
    data = json.loads((art / "llmopt.json").read_text())
    data["options"]["_resolved"]["gguf_file"] = "nope.gguf"
    (art / "llmopt.json").write_text(json.dumps(data))
    r = run_cli(["publish", str(art), REPO, "--layout", "gguf-one-repo"], env=env)
    assert r.returncode == 5
    assert "names no GGUF model file" in r.stderr and "Traceback" not in r.stderr
    assert hub.requests == []


@pytest.mark.parametrize(
    ("record", "needle"),
    [
        (b"not json at all", "is not an llmopt manifest this version reads"),
        (json.dumps({"schema_version": 99}).encode(), "is not an llmopt manifest this version reads"),
    ],
)
def test_records_in_the_repo_that_do_not_parse(
    tmp_path: Path, hub_env: tuple[HubServer, dict[str, str]], record: bytes, needle: str
) -> None:
    """Another writer left a record that is not JSON, or one from a newer llmopt: the file is listed without
    numbers and with a note; the publish of the new file goes on."""
    hub, env = hub_env
    run = tmp_path / "run"
    make_gguf(run, "q8_0")
    make_gguf(run, "q4_k_m")
    assert (
        run_cli(["publish", str(run), REPO, "--layout", "gguf-one-repo", "--only", "q4-k-m"], env=env).returncode == 0
    )
    repo = hub.state.repos[REPO]
    hub.state.commit(repo, "main", "edit", "", {"llmopt/SmolLM2-135M-Instruct-Q4_K_M.json": record}, [])
    r = run_cli(["publish", str(run), REPO, "--layout", "gguf-one-repo", "--only", "q8-0", "--json"], env=env)
    assert r.returncode == 0, r.stderr[-2000:]
    rows = {row["path"]: row for row in json.loads(r.stdout)["table"]}
    kept = rows["SmolLM2-135M-Instruct-Q4_K_M.gguf"]
    assert kept["origin"] == "already in the repo" and needle in kept["note"] and "delta_pct" not in kept
    assert rows["SmolLM2-135M-Instruct-Q8_0.gguf"]["delta_pct"] is not None


def test_the_repo_readme_is_replaced_with_a_note(tmp_path: Path, hub_env: tuple[HubServer, dict[str, str]]) -> None:
    hub, env = hub_env
    run = tmp_path / "run"
    make_gguf(run, "q8_0")
    assert run_cli(["publish", str(run), REPO, "--layout", "gguf-one-repo"], env=env).returncode == 0
    r = run_cli(["publish", str(run), REPO, "--layout", "gguf-one-repo"], env=env)
    assert r.returncode == 0
    assert "the repo's README.md is replaced by the generated card" in r.stdout
    # publishing the same file again: the card is the same, and still one row
    _, card = hub.commits(REPO)[-1].files["README.md"].decode().split("---", 2)[1:]
    assert card.count("| [`SmolLM2-135M-Instruct-Q8_0.gguf`]") == 1


def test_a_record_in_the_repo_with_flattering_numbers(
    tmp_path: Path, hub_env: tuple[HubServer, dict[str, str]]
) -> None:
    """Someone with write access lowers the mean KLD and the Δ in a kept file's record (its sha256 still matches the
    file): the next publish recomputes them from the record's per-window scores and shows no numbers for it."""
    hub, env = hub_env
    run = tmp_path / "run"
    make_gguf(run, "q8_0")
    make_gguf(run, "q4_k_m", delta=4.0, kld=0.2)
    assert (
        run_cli(["publish", str(run), REPO, "--layout", "gguf-one-repo", "--only", "q4-k-m"], env=env).returncode == 0
    )
    repo = hub.state.repos[REPO]
    path = "llmopt/SmolLM2-135M-Instruct-Q4_K_M.json"
    record = json.loads(repo.tree()[path])
    record["evaluation"]["artifact"]["distribution"]["kld_mean"] = 0.0001
    record["evaluation"]["delta_pct"] = 0.1
    hub.state.commit(repo, "main", "better numbers", "", {path: json.dumps(record).encode()}, [])
    r = run_cli(["publish", str(run), REPO, "--layout", "gguf-one-repo", "--only", "q8-0", "--json"], env=env)
    assert r.returncode == 0, r.stderr[-2000:]
    kept = next(row for row in json.loads(r.stdout)["table"] if row["path"].endswith("Q4_K_M.gguf"))
    assert "do not add up" in kept["note"] and "delta_pct" not in kept and "kld_mean" not in kept
    card = hub.commits(REPO)[-1].files["README.md"].decode()
    assert "0.00010" not in card and "+0.10%" not in card
