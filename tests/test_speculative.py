"""`llmopt speculate`: assisted generation with a draft, measured against the target alone."""

from __future__ import annotations

import json
import struct
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest

from llmopt.speculative import _AcceptanceCounter


def run_cli(argv: list[str], capsys: pytest.CaptureFixture[str]) -> tuple[int, str, str]:
    from llmopt.cli import main

    with pytest.raises(SystemExit) as exc:
        main(argv)
    out, err = capsys.readouterr()
    code = exc.value.code
    return (code if isinstance(code, int) else 0), out, err


class _FakeIds:
    def __init__(self, n: int) -> None:
        self.shape = (1, n)


class _FakeGenerator:
    """Stands in for transformers' AssistedCandidateGenerator: proposes 3 tokens each round."""

    def __init__(self) -> None:
        self.updates: list[int] = []

    def get_candidates(self, input_ids: _FakeIds) -> tuple[_FakeIds, None]:
        return _FakeIds(input_ids.shape[1] + 3), None

    def update_candidate_strategy(self, input_ids: Any, scores: Any, num_matches: int) -> None:
        self.updates.append(num_matches)


def test_acceptance_counter_reads_what_the_target_kept() -> None:
    built: list[_FakeGenerator] = []

    def build(*args: Any, **kwargs: Any) -> _FakeGenerator:
        built.append(_FakeGenerator())
        return built[-1]

    model = SimpleNamespace(_get_candidate_generator=build)
    counter = _AcceptanceCounter()
    counter.install(model)
    gen = model._get_candidate_generator("config")  # what generate() calls once per assisted call
    for matches in (3, 1, 0):  # the verification loop: draft, verify, report the matches
        gen.get_candidates(_FakeIds(10))
        gen.update_candidate_strategy(None, None, matches)
    assert (counter.drafted, counter.accepted, counter.rounds) == (9, 4, 3)
    assert built[0].updates == [3, 1, 0]  # transformers' own bookkeeping still runs
    counter.uninstall(model)
    assert model._get_candidate_generator is build


def _tiny_folder(path: Path) -> Path:
    """A folder `llmopt.source.resolve` accepts (config + a valid safetensors), loaded by nothing."""
    path.mkdir(parents=True, exist_ok=True)
    (path / "config.json").write_text(json.dumps({"model_type": "llama", "architectures": ["LlamaForCausalLM"]}))
    header = json.dumps({"w": {"dtype": "F16", "shape": [1], "data_offsets": [0, 2]}}).encode()
    (path / "model.safetensors").write_bytes(struct.pack("<Q", len(header)) + header + b"\0\0")
    return path


def test_cli_bad_inputs(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    target = str(_tiny_folder(tmp_path / "target"))
    code, _, err = run_cli(["speculate", target, "--draft", target, "--max-new-tokens", "0"], capsys)
    assert code == 2 and "--max-new-tokens must be at least 1" in err

    empty = tmp_path / "prompts.txt"
    empty.write_text("\n  \n")
    code, _, err = run_cli(["speculate", target, "--draft", target, "--prompt-file", str(empty)], capsys)
    assert code == 2 and "has no prompts" in err

    code, _, err = run_cli(["speculate", target, "--draft", str(tmp_path / "missing"), "--device", "cpu"], capsys)
    assert code == 2 and "does not exist" in err and "Traceback" not in err


def test_cli_rejects_a_gguf_draft(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    from llmopt.artifact import Artifact, EnvironmentInfo, Manifest, SourceInfo

    target = str(_tiny_folder(tmp_path / "target"))
    draft = tmp_path / "draft"
    draft.mkdir()
    Artifact(
        draft,
        Manifest(
            llmopt_version="0",
            backend="gguf",
            format="gguf",
            runner="llamacpp",
            options={},
            source=SourceInfo(model="x", resolved_path="x"),
            files={},
            environment=EnvironmentInfo(python="3", platform="x", device="cpu"),
        ),
    ).save()
    code, _, err = run_cli(["speculate", target, "--draft", str(draft), "--device", "cpu"], capsys)
    assert code == 2 and "run by 'llamacpp'" in err and "assisted generation cannot use" in err


@pytest.mark.e2e
def test_speculate_with_itself_as_draft(
    assets: dict[str, Path], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("The history of the printing press begins\n")
    model = str(assets["model"])
    code, out, _ = run_cli(
        ["speculate", model, "--draft", model, "--prompt-file", str(prompts), "--max-new-tokens", "5",
         "--device", "cpu", "--json"],
        capsys,
    )  # fmt: skip
    assert code == 0
    r = json.loads(out)
    assert r["identical"] is True and r["prompts"] == 1
    assert r["per_prompt"][0]["target_new_tokens"] == r["per_prompt"][0]["assisted_new_tokens"] == 5
    assert 0.0 <= r["acceptance_rate"] <= 1.0
    assert r["drafted_tokens"] > 0 and r["accepted_tokens"] <= r["drafted_tokens"]
    # every new token is either an accepted draft token or the target's own token of a round
    assert r["accepted_tokens"] + r["rounds"] >= 5
    assert r["target_tokens_per_s"] > 0 and r["assisted_tokens_per_s"] > 0


@pytest.mark.e2e
def test_speculate_with_a_bnb_int8_draft(assets: dict[str, Path], tmp_path: Path) -> None:
    pytest.importorskip("bitsandbytes")
    from llmopt.api import quantize
    from llmopt.speculative import speculative_bench

    draft = quantize(str(assets["model"]), "bnb-int8", tmp_path / "int8", device="cpu")
    assert draft.manifest.runner == "hf"
    r = speculative_bench(
        str(assets["model"]), str(draft.path), prompts=["def fibonacci(n):"], max_new_tokens=4, device="cpu"
    )
    assert r.identical, r.per_prompt
    assert r.acceptance_rate is not None and 0.0 <= r.acceptance_rate <= 1.0
    assert r.draft_runner == "hf" and r.per_prompt[0].assisted_new_tokens == 4
