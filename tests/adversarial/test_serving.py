"""serve-bench as careless users and broken servers meet it: servers that never get ready, cannot load the model,
die mid-run or are left behind by Ctrl-C; ports in use, unreachable URLs, bad options. The llama.cpp server is
played by tests/servestub.py (LLMOPT_LLAMA_SERVER), a real HTTP server in a process of its own."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tests.helpers import run_cli
from tests.servestub import StubServer

ROOT = Path(__file__).resolve().parents[2]


def _alive(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().split(")")[-1].split()[0]
    except OSError:
        return False
    return state != "Z"


def _gone(pid: int, within: float = 10.0) -> bool:
    deadline = time.monotonic() + within
    while time.monotonic() < deadline:
        if not _alive(pid):
            return True
        time.sleep(0.1)
    return False


@pytest.fixture
def fake_llama(tmp_path: Path) -> dict[str, object]:
    """A folder to work from with a .gguf in it, and the environment that makes the stand-in its llama-server."""
    exe = tmp_path / "bin" / "llama-server"
    exe.parent.mkdir()
    exe.write_text(f'#!/bin/sh\nexec "{sys.executable}" "{ROOT / "tests" / "servestub.py"}" "$@"\n')
    exe.chmod(0o755)
    work = tmp_path / "work"
    work.mkdir()
    (work / "model.gguf").write_bytes(b"GGUF" + b"\0" * 64)
    pidfile = tmp_path / "server.pid"
    env = {"LLMOPT_LLAMA_SERVER": str(exe), "STUB_PIDFILE": str(pidfile), "STUB_TTFT": "0.02", "STUB_ITL": "0.005"}
    return {"work": work, "env": env, "pidfile": pidfile}


FAST = ["--rates", "4", "--requests", "4", "--warmup", "1", "--output-len", "4", "--prompt-len", "16"]


def test_a_started_server_is_measured_and_stopped(fake_llama: dict) -> None:
    """The whole lifecycle with a relative model path: free port, readiness, trace, logs kept in --out, stopped."""
    r = run_cli(
        ["serve-bench", "model.gguf", *FAST, "--rates", "4,8", "--out", "res", "--json", "-"],
        cwd=fake_llama["work"],
        env=fake_llama["env"],
    )
    assert r.returncode == 0, r.stderr
    data = json.loads(r.stdout)
    model = data["models"][0]
    assert model["server"]["kind"] == "llama.cpp" and model["points"][0]["ok"] == 4
    assert "--no-webui" in model["server"]["command"]
    assert model["server"]["command"][2] == str(fake_llama["work"] / "model.gguf")
    res = fake_llama["work"] / "res"
    assert "listening on" in (res / "server-model.log").read_text()
    assert len((res / "requests-model.jsonl").read_text().splitlines()) == 8  # 4 per rate, warm-up not kept
    assert (res / "serve-latency.png").stat().st_size > 1000 and (res / "serve-throughput.png").is_file()
    assert json.loads((res / "serve-bench.json").read_text())["models"][0]["points"][0]["ok"] == 4
    assert _gone(int(fake_llama["pidfile"].read_text()))


def test_a_server_that_never_gets_ready_times_out_with_its_log(fake_llama: dict) -> None:
    env = {**fake_llama["env"], "STUB_MODE": "never-healthy"}
    r = run_cli(["serve-bench", "model.gguf", *FAST, "--startup-timeout", "3"], cwd=fake_llama["work"], env=env)
    assert r.returncode == 4, r.stderr
    assert "did not become ready within 3 s" in r.stderr
    assert "stub server: listening on" in r.stderr  # its log tail
    assert "Traceback" not in r.stderr
    assert _gone(int(fake_llama["pidfile"].read_text()))


def test_a_model_the_server_cannot_load_shows_the_servers_own_words(fake_llama: dict) -> None:
    env = {**fake_llama["env"], "STUB_MODE": "exit-at-start"}
    r = run_cli(["serve-bench", "model.gguf", *FAST], cwd=fake_llama["work"], env=env)
    assert r.returncode == 4, r.stderr
    assert "stopped (exit code 1) before it was ready" in r.stderr
    assert "failed to load model 'broken.gguf'" in r.stderr


def test_a_port_in_use_is_refused_before_anything_starts(fake_llama: dict) -> None:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        s.listen()
        port = s.getsockname()[1]
        r = run_cli(
            ["serve-bench", "model.gguf", *FAST, "--port", str(port)], cwd=fake_llama["work"], env=fake_llama["env"]
        )
    assert r.returncode == 2, r.stderr
    assert f"port {port} on 127.0.0.1 is in use" in r.stderr
    assert not fake_llama["pidfile"].exists()


def test_an_unreachable_url(tmp_path: Path) -> None:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    r = run_cli(["serve-bench", "--url", f"http://127.0.0.1:{port}", *FAST], cwd=tmp_path)
    assert r.returncode == 4, r.stderr
    assert "nothing answers at" in r.stderr and "Traceback" not in r.stderr


def test_a_server_that_dies_mid_run_keeps_what_was_measured(fake_llama: dict) -> None:
    """The server exits after its 6th request: the run is marked failed (exit 4), the JSON has the points
    measured until then."""
    env = {**fake_llama["env"], "STUB_MODE": "die-after:6"}
    r = run_cli(
        [
            "serve-bench",
            "model.gguf",
            "--rates",
            "2,4",
            "--requests",
            "8",
            "--warmup",
            "0",
            "--output-len",
            "4",
            "--json",
            "out.json",
        ],
        cwd=fake_llama["work"],
        env=env,
    )
    assert r.returncode == 4, r.stderr
    assert "the run failed" in r.stderr and "the server exited during the run" in r.stderr
    data = json.loads((fake_llama["work"] / "out.json").read_text())
    model = data["models"][0]
    assert "the server exited during the run" in model["failed"]
    assert len(model["points"]) == 1 and model["points"][0]["ok"] == 6


def test_ctrl_c_leaves_no_server_behind(fake_llama: dict) -> None:
    env = {**os.environ, **fake_llama["env"], "PYTHONPATH": str(ROOT), "STUB_TTFT": "0.5"}
    proc = subprocess.Popen(
        [sys.executable, "-m", "llmopt", "serve-bench", "model.gguf", "--rates", "1", "--requests", "50"],
        cwd=fake_llama["work"],
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    pidfile = fake_llama["pidfile"]
    try:
        deadline = time.monotonic() + 60
        while not pidfile.exists() and time.monotonic() < deadline:
            time.sleep(0.1)
        time.sleep(3)  # into the timed requests
        pid = int(pidfile.read_text())
        assert _alive(pid)
        proc.send_signal(signal.SIGINT)
        _, err = proc.communicate(timeout=60)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == 130, err
    assert _gone(pid)


def test_killing_llmopt_takes_its_server_down(fake_llama: dict) -> None:
    """Even SIGKILL, which runs no cleanup: the server was started to die with its parent."""
    env = {**os.environ, **fake_llama["env"], "PYTHONPATH": str(ROOT)}
    proc = subprocess.Popen(
        [sys.executable, "-m", "llmopt", "serve-bench", "model.gguf", "--rates", "1", "--requests", "50"],
        cwd=fake_llama["work"],
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    pidfile = fake_llama["pidfile"]
    deadline = time.monotonic() + 60
    while not pidfile.exists() and time.monotonic() < deadline:
        time.sleep(0.1)
    time.sleep(1)
    proc.kill()
    proc.wait()
    assert _gone(int(pidfile.read_text()))


def test_the_slo_gate_exits_3_when_the_model_misses_it(tmp_path: Path) -> None:
    with StubServer(ttft=0.05, itl=0.005) as stub:
        miss = run_cli(["serve-bench", "--url", stub.url, *FAST, "--slo", "ttft_p95=5ms"], cwd=tmp_path)
        hold = run_cli(["serve-bench", "--url", stub.url, *FAST, "--slo", "ttft_p95=2s"], cwd=tmp_path)
    assert miss.returncode == 3, miss.stderr
    assert "SLO gate (ttft_p95<=5ms): failed" in miss.stdout and "ttft_p95_ms" in miss.stdout
    assert hold.returncode == 0, hold.stderr
    assert "SLO gate (ttft_p95<=2000ms): passed" in hold.stdout


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--rates", "4"], "give a MODEL to serve, or --url"),
        (["model.gguf", "--rates", "0"], "--rates '0': give positive numbers"),
        (["model.gguf", "--rates", "1", "--concurrency", "2"], "exclude each other"),
        (["model.gguf", "--slo", "ttft=5"], "--slo key 'ttft' is not known"),
        (["model.gguf", "--prompt-len", "lots"], "--prompt-len 'lots' is not a length distribution"),
        (["model.gguf", "--prefix-share", "0.5"], "a prefix share needs a prefix length"),
        (["model.gguf", "--prompts-file", "nope.txt"], "prompts file nope.txt does not exist"),
        (["model.gguf", "--server", "transformers"], "`transformers serve` loads Hugging Face model folders"),
        (["model.gguf", "--server", "tgi"], "--server 'tgi' is not known"),
        (["missing.gguf"], "missing.gguf does not exist"),
        (["model.gguf", "--out", "full"], "--out full exists and is not an empty folder"),
        (["model.gguf", "--slo", "ttft_p95=1s,at_rate=3", "--rates", "1,2"], "at_rate=3 is not among --rates"),
    ],
)
def test_bad_input_is_refused_before_any_server_starts(fake_llama: dict, args: list[str], message: str) -> None:
    (fake_llama["work"] / "full").mkdir()
    (fake_llama["work"] / "full" / "keep.txt").write_text("mine")
    r = run_cli(["serve-bench", *args], cwd=fake_llama["work"], env=fake_llama["env"])
    assert r.returncode == 2, r.stderr
    assert message in r.stderr, r.stderr
    assert "Traceback" not in r.stderr
    assert not fake_llama["pidfile"].exists()
    assert (fake_llama["work"] / "full" / "keep.txt").read_text() == "mine"


def _gguf_artifact(folder: Path, *names: str, manifest: str | None = None) -> Path:
    """A GGUF artifact folder as `llmopt quantize -m gguf` leaves it (tokenizer.json left out: no real one here)."""
    folder.mkdir()
    for name in names:
        (folder / name).write_bytes(b"GGUF" + b"\0" * 64)
    (folder / "chat_template.jinja").write_text("{{ messages }}")
    if manifest is not None:
        resolved = {"gguf_file": manifest, "imatrix": {"file": "imatrix.gguf"}}
        (folder / "llmopt.json").write_text(json.dumps({"format": "gguf", "options": {"_resolved": resolved}}))
    return folder


def test_an_artifact_made_with_an_importance_matrix_serves_its_model_file(fake_llama: dict) -> None:
    """`quantize -m gguf --imatrix auto` keeps imatrix.gguf beside the model file: the model file is served."""
    model = "smollm2-135m-instruct-Q4_K_M.gguf"
    _gguf_artifact(fake_llama["work"] / "q4_k_m", model, "imatrix.gguf", manifest=model)
    r = run_cli(["serve-bench", "q4_k_m", *FAST, "--json"], cwd=fake_llama["work"], env=fake_llama["env"])
    assert r.returncode == 0, r.stderr
    server = json.loads(r.stdout)["models"][0]["server"]
    assert server["kind"] == "llama.cpp"
    assert server["command"][2] == str(fake_llama["work"] / "q4_k_m" / model)
    assert _gone(int(fake_llama["pidfile"].read_text()))


def test_a_folder_with_two_model_files_is_refused_before_any_server_starts(fake_llama: dict) -> None:
    """Two model .gguf files and no manifest naming one: exit 2 with both names and what to pass instead, before
    even the baseline's server starts."""
    _gguf_artifact(fake_llama["work"] / "two", "m-Q4_K_M.gguf", "m-Q8_0.gguf", "imatrix.gguf")
    r = run_cli(
        ["serve-bench", "two", "--baseline", "model.gguf", *FAST], cwd=fake_llama["work"], env=fake_llama["env"]
    )
    assert r.returncode == 2, r.stderr
    assert "two holds 2 GGUF model files (m-Q4_K_M.gguf, m-Q8_0.gguf)" in r.stderr
    assert "Pass the file itself" in r.stderr
    assert "neither a .gguf file" not in r.stderr and "Traceback" not in r.stderr
    assert not fake_llama["pidfile"].exists()


def test_transformers_serve_without_its_serving_extra(assets: dict[str, Path], tmp_path: Path) -> None:
    """A plain transformers install has `transformers serve` but not fastapi/uvicorn/openai: exit 4, the install
    command, before any server starts."""
    import importlib.util

    if all(importlib.util.find_spec(m) for m in ("fastapi", "uvicorn", "openai")):
        pytest.skip("the serving extra is installed here")
    r = run_cli(["serve-bench", str(assets["model"]), *FAST], cwd=tmp_path)
    assert r.returncode == 4, r.stderr
    assert "`transformers serve` needs" in r.stderr and "transformers[serving]" in r.stderr
