"""``llmopt run`` with ``evaluation.serving``: each variant served under load after its evaluation, the SLO gate, and
every way a server fails (cannot load the artifact, dies mid-run, port in use, saturates), each confined to its own
variant. Real GGUF artifacts of SmolLM2 cut to two layers; llama.cpp's server is played by tests/servestub.py
(LLMOPT_LLAMA_SERVER), a real HTTP server in a process of its own, told how to misbehave by the artifact's name."""

from __future__ import annotations

import json
import socket
import sys
from pathlib import Path
from typing import Any

import pytest

from tests.helpers import first_layers, run_cli

ROOT = Path(__file__).resolve().parents[2]


def recipe(serving: str, variants: list[str], gates: str) -> str:
    """The recipe text every test here runs, in a folder made by ``workdir``: its 2-layer model scored on eval.txt in
    two windows of 16 tokens (no KL divergence); ``serving`` and ``gates`` (YAML flow mappings) as evaluation.serving
    and gates; one variant per entry of ``variants``: NAME (a GGUF q8_0) or NAME=METHOD."""
    rows = []
    for entry in variants:
        name, _, method = entry.partition("=")
        rows.append(f"  - {{name: {name}, method: {method}}}" if method else
                    f"  - {{name: {name}, method: gguf, options: {{quant_type: q8_0}}}}")  # fmt: skip
    return (
        "model:\n  source: model\n"
        "evaluation:\n  dataset: eval.txt\n  context_length: 16\n  max_tokens: 32\n  device: cpu\n  kld: false\n"
        f"  serving: {serving}\ngates: {gates}\nvariants:\n" + "\n".join(rows) + "\n"
    )


def workdir(assets: dict[str, Path], folder: Path, recipe_text: str) -> Path:
    """``folder`` as ``recipe`` expects it: model/ (SmolLM2 cut to 2 layers), eval.txt, and recipe.yaml."""
    first_layers(assets["model"], folder / "model", 2)
    (folder / "eval.txt").write_text(assets["eval_text"].read_text()[:4000])
    (folder / "recipe.yaml").write_text(recipe_text)
    return folder


# Four GGUF variants, each served by a stand-in that misbehaves as its name says (WRAPPER below).
RECIPE = recipe(
    "{rates: [2, 4], requests: 6, warmup: 1, prompt_len: 16, output_len: 4, baseline: false}",
    ["broken", "good", "dies", "saturates"],
    gates="{max_ppl_increase_pct: 50, slo: {ttft_p95_ms: 2000}, min_goodput: 0.5}",
)

# The stand-in server misbehaves by the artifact it is given (its path names the variant).
WRAPPER = """\
#!/bin/sh
case "$*" in
  */artifacts/broken/*) export STUB_MODE=exit-at-start ;;
  */artifacts/dies/*) export STUB_MODE=die-after:9 ;;
  */artifacts/saturates/*) export STUB_SERIALIZE=1 STUB_ITL=0.25 ;;
esac
exec "{python}" "{stub}" "$@"
"""


@pytest.fixture(scope="module")
def work(assets: dict[str, Path], tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    from llmopt.backends import get_backend
    from llmopt.errors import LlmoptError

    try:
        get_backend("gguf", require_usable=True)
    except LlmoptError as exc:
        pytest.skip(f"gguf backend not usable here: {exc.message}")
    folder = workdir(assets, tmp_path_factory.mktemp("run-serving"), RECIPE)
    exe = folder / "bin" / "llama-server"
    exe.parent.mkdir()
    exe.write_text(WRAPPER.format(python=sys.executable, stub=ROOT / "tests" / "servestub.py"))
    exe.chmod(0o755)
    env = {"LLMOPT_LLAMA_SERVER": str(exe), "STUB_TTFT": "0.02", "STUB_ITL": "0.005"}
    r = run_cli(["run", "recipe.yaml", "-o", "out", "--json"], cwd=folder, env=env)
    return {"folder": folder, "env": env, "first": r}


def _variants(data: dict[str, Any]) -> dict[str, dict[str, Any]]:
    return {v["name"]: v for v in data["variants"]}


def test_each_variant_is_served_and_each_failure_stays_its_own(work: dict[str, Any]) -> None:
    r = work["first"]
    assert r.returncode == 4, r.stderr  # the first error in recipe order: a server that cannot load its model
    data = json.loads(r.stdout)
    v = _variants(data)

    broken = v["broken"]
    assert broken["status"] == "error" and broken["error"]["stage"] == "serve" and broken["error"]["exit_code"] == 4
    assert "failed to load model" in broken["error"]["message"]
    assert broken["perplexity"] is not None  # its evaluation is kept

    good = v["good"]
    assert good["status"] == "passed", good.get("error") or good["gate"]
    points = good["evaluation"]["serving"]["points"]
    assert [p["value"] for p in points] == [2.0, 4.0] and all(p["ok"] == 6 for p in points)
    assert good["evaluation"]["serving"]["server"]["kind"] == "llama.cpp"
    names = [c["name"] for c in good["gate"]["checks"]]
    assert "slo.ttft_p95_ms@2/s" in names and "slo.min_goodput@4/s" in names
    assert len(points[0]["latencies"]) == 6  # what a later gate or the optimizer judges

    dies = v["dies"]
    assert dies["status"] == "error" and dies["error"]["stage"] == "serve" and dies["error"]["exit_code"] == 4
    serving = dies["evaluation"]["serving"]
    assert serving["failed"] and "measured until then" in serving["failed"]
    assert serving["points"], "the points measured before the server died are kept"

    sat = v["saturates"]
    assert sat["status"] == "gate_failed", sat.get("error")
    top = sat["evaluation"]["serving"]["points"][-1]
    assert top["saturated"] and top["ttft_ms"] is None  # no meaningless percentile
    failed = [c["message"] for c in sat["gate"]["checks"] if not c["passed"]]
    assert any("saturated" in m for m in failed)

    out = work["folder"] / "out"
    md = (out / "report.md").read_text()
    assert "## Serving under load" in md and "| good | 4 req/s | 6/6 |" in md
    assert "serving failed" in md  # the dead server's error
    assert (out / "plots" / "serve-latency.png").stat().st_size > 1000
    assert (out / "plots" / "serve-throughput.png").is_file()
    assert (out / "serving" / "good" / "server-model.log").is_file()
    # the manifest keeps a finished measurement only
    manifest = json.loads((out / "artifacts" / "good" / "llmopt.json").read_text())
    assert manifest["evaluation"]["serving"]["points"][0]["ok"] == 6
    assert "serving" not in (json.loads((out / "artifacts" / "dies" / "llmopt.json").read_text())["evaluation"] or {})


def test_a_rerun_reuses_the_measurement_and_regates_a_new_slo(work: dict[str, Any]) -> None:
    before = _variants(json.loads(work["first"].stdout))["good"]["evaluation"]["serving"]
    r = run_cli(
        ["run", "recipe.yaml", "-o", "out", "--only", "good", "--set", "gates.slo.ttft_p95_ms=0.001"],
        cwd=work["folder"],
        env=work["env"],
    )
    assert r.returncode == 3, r.stderr
    assert "good: serving measurement up to date, not serving again" in r.stderr
    assert "serving (top rate)" in r.stdout and "TTFT p95" in r.stdout  # the table's serving column
    good = _variants(json.loads((work["folder"] / "out" / "report.json").read_text()))["good"]
    assert good["evaluation"]["serving"] == before  # the same measurement, judged against the new SLO
    assert good["status"] == "gate_failed"
    assert any(c["name"] == "slo.ttft_p95_ms@4/s" and not c["passed"] for c in good["gate"]["checks"])


def test_the_optimizer_reads_the_run(work: dict[str, Any]) -> None:
    # the first run's report.json (a later --only run rewrites the folder's with its variant alone)
    (work["folder"] / "first-report.json").write_text(work["first"].stdout)
    r = run_cli(
        ["estimate", "--report", "first-report.json", "--slo", "ttft_p95=2s", "--rate", "4", "--json"],
        cwd=work["folder"],
    )
    assert r.returncode == 0, r.stderr
    plan = json.loads(r.stdout)
    assert plan["recommended"]["variant"] == "good" and plan["recommended"]["source"] == "measured"
    assert {o["variant"] for o in plan["options"]} >= {"good", "saturates", "dies"}


def test_a_port_in_use_fails_serving_not_the_evaluations(work: dict[str, Any]) -> None:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        s.listen()
        port = s.getsockname()[1]
        args = ["run", "recipe.yaml", "-o", "out2", "--only", "good", "--set", f"evaluation.serving.port={port}"]
        r = run_cli([*args, "--json"], cwd=work["folder"], env=work["env"])
    assert r.returncode == 2, r.stderr
    good = _variants(json.loads(r.stdout))["good"]
    assert good["error"]["stage"] == "serve" and f"port {port} on 127.0.0.1 is in use" in good["error"]["message"]
    assert good["perplexity"] is not None


BNB_RECIPE = recipe(
    "{server: llama.cpp, rates: [2], requests: 4, prompt_len: 16, output_len: 4}",
    ["int8=bnb-int8"],
    gates="{max_ppl_increase_pct: 50}",
)


def test_an_artifact_the_chosen_server_cannot_load(assets: dict[str, Path], tmp_path: Path) -> None:
    """`server: llama.cpp` for a bitsandbytes folder (and for the FP16 folder): the variant errors at its serve
    stage (exit 2) with its evaluation kept; the baseline's failure is a note, not an error."""
    workdir(assets, tmp_path, BNB_RECIPE)
    r = run_cli(["run", "recipe.yaml", "-o", "out", "--json"], cwd=tmp_path)
    assert r.returncode == 2, r.stderr
    data = json.loads(r.stdout)
    row = data["variants"][0]
    assert row["status"] == "error" and row["error"]["stage"] == "serve"
    assert "llama.cpp's server loads .gguf files" in row["error"]["message"]
    assert row["perplexity"] is not None and "serving" not in row["evaluation"]
    assert any("the FP16 baseline could not be served" in n for n in data["notes"])
    assert "baseline_serving" not in data


REAL_RECIPE = recipe(
    "{rates: [1, 2], requests: 4, warmup: 1, prompt_len: 16, output_len: 4, threads: 2, baseline: false}",
    ["q8"],
    gates="{slo: {e2e_p95_s: 60}}",
)


@pytest.mark.e2e
def test_real_llama_server_in_a_run(assets: dict[str, Path], tmp_path: Path) -> None:
    """The real llama-server behind a GGUF variant of `llmopt run`: every request streams exactly output_len tokens
    (ignore_eos), counted by the server, and the gate reads the SLO on it."""
    from llmopt.errors import BackendUnavailableError
    from llmopt.serving.servers import llama_server_binary

    try:
        llama_server_binary()
    except BackendUnavailableError:
        pytest.skip("llama-server is not built here (scripts/build_llamacpp.py, or LLMOPT_LLAMA_SERVER)")
    workdir(assets, tmp_path, REAL_RECIPE)
    r = run_cli(["run", "recipe.yaml", "-o", "out", "--json"], cwd=tmp_path)
    assert r.returncode == 0, r.stderr
    row = json.loads(r.stdout)["variants"][0]
    serving = row["evaluation"]["serving"]
    assert serving["server"]["kind"] == "llama.cpp" and "llama-server" in serving["server"]["command"][0]
    for p in serving["points"]:
        assert p["ok"] == 4 and p["tokens_from"] == "usage"
        assert p["output_tokens_per_s"] == pytest.approx(4 * 4 / p["duration_s"])
    assert row["gate"]["passed"] and any(c["name"].startswith("slo.e2e_p95_ms") for c in row["gate"]["checks"])


VLLM_RECIPE = recipe(
    "{server: vllm, rates: [2, 4], requests: 4, warmup: 1, prompt_len: 16, output_len: 4}",
    ["int8=bnb-int8"],
    gates="{slo: {ttft_p95_ms: 5000}}",
)


def test_the_fp16_baseline_is_served_once_and_reused(assets: dict[str, Path], tmp_path: Path) -> None:
    """`server: vllm` (played by the stand-in as a `vllm` command on PATH): the FP16 model is served with the same
    trace, shown next to the variant, and a second run reuses both measurements instead of serving again."""
    import os

    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    vllm = bin_dir / "vllm"
    vllm.write_text(f'#!/bin/sh\nexec "{sys.executable}" "{ROOT / "tests" / "servestub.py"}" "$@"\n')
    vllm.chmod(0o755)
    env = {"PATH": f"{bin_dir}{os.pathsep}{os.environ['PATH']}", "STUB_TTFT": "0.02", "STUB_ITL": "0.005"}
    workdir(assets, tmp_path, VLLM_RECIPE)
    r = run_cli(["run", "recipe.yaml", "-o", "out"], cwd=tmp_path, env=env)
    assert r.returncode == 0, r.stderr
    data = json.loads((tmp_path / "out" / "report.json").read_text())
    base = data["baseline_serving"]
    assert base["server"]["kind"] == "vllm" and base["model"] == "model" and len(base["points"]) == 2
    assert data["variants"][0]["evaluation"]["serving"]["server"]["kind"] == "vllm"
    md = (tmp_path / "out" / "report.md").read_text()
    assert "| FP16 baseline | 2 req/s | 4/4 |" in md and "| int8 | 4 req/s | 4/4 |" in md
    again = run_cli(["run", "recipe.yaml", "-o", "out"], cwd=tmp_path, env=env)
    assert again.returncode == 0, again.stderr
    assert "FP16 baseline: serving measurement up to date" in again.stderr
    assert "int8: serving measurement up to date" in again.stderr
    assert json.loads((tmp_path / "out" / "report.json").read_text())["baseline_serving"] == base
